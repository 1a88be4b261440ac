"""numba implementation of :mod:`plaid.search.kernels_cpu` (imported by it on first use only).

Every kernel is ``@njit(cache=True, nogil=True, fastmath=False)`` and compiles on its first call
for the argument types it gets. The inner loops work on 8 query tokens at a time through a small
vector type (``f32x8``: an LLVM ``<8 x float>``, lane-wise IEEE float32 operations, so results
equal numpy's scalar ones bit for bit); loads and stores are masked to the lanes that exist, so
no array needs padding. Nothing here reorders a float32 sum: see :mod:`plaid.search.kernels_cpu`
for the summation orders matched.

No kernel here recurses: numba's cache cannot load recursive functions (numba issue #6061,
segfault), so numpy's pairwise summation is written as a loop.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from . import params as _params

PRUNED_SCORE = np.float32(_params.PRUNED_SCORE)
#: Up to this ``ncells`` the k-th best score of a token is found with a small sorted buffer in one
#: pass over its scores; above, by a quickselect (:func:`nth_largest`). Same value either way.
KTH_BUFFER_MAX = 64

jit = numba.njit(cache=True, nogil=True, fastmath=False)

# ------------------------------------------------------------------------------------------------
# f32x8: 8 float32 lanes in one register
# ------------------------------------------------------------------------------------------------
_VTY = ir.VectorType(ir.FloatType(), 8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


class F32x8(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VTY)


def _f32_2d(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 2


def _intp(context, builder, sig, args, idx):
    return [context.cast(builder, args[i], sig.args[i], types.intp) for i in idx]


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _lanes_ptr_mask(context, builder, arrty, arrval, r, o, n):
    """(pointer to arr[r, o], mask of the lanes k < n)."""
    arr = context.make_array(arrty)(context, builder, arrval)
    ptr = cgutils.get_item_pointer2(context, builder, data=arr.data, shape=cgutils.unpack_tuple(builder, arr.shape),
                                    strides=cgutils.unpack_tuple(builder, arr.strides), layout=arrty.layout,
                                    inds=[r, o], wraparound=False, boundscheck=False)
    ptr = builder.bitcast(ptr, _VTY.as_pointer())
    v64 = ir.VectorType(_I64, 8)
    mask = builder.icmp_signed("<", ir.Constant(v64, list(range(8))), _splat(builder, n, v64))
    return ptr, mask


@intrinsic
def vsplat(typingctx, s):
    """f32x8 with every lane ``s`` (float32)."""
    if s != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], _VTY)

    return f32x8(s), codegen


@intrinsic
def vload(typingctx, arr, r, o, n):
    """Lanes ``k < n`` = ``arr[r, o + k]`` (float32 [., .], C order), the others 0; reads nothing else."""
    if not _f32_2d(arr) or arr.layout != "C":
        return None

    def codegen(context, builder, sig, args):
        rv, ov, nv = _intp(context, builder, sig, args, (1, 2, 3))
        ptr, mask = _lanes_ptr_mask(context, builder, sig.args[0], args[0], rv, ov, nv)
        fnty = ir.FunctionType(_VTY, [ptr.type, _I32, mask.type, _VTY])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v8f32.p0")
        return builder.call(fn, [ptr, ir.Constant(_I32, 4), mask, ir.Constant(_VTY, [0.0] * 8)])

    return f32x8(arr, r, o, n), codegen


@intrinsic
def vloadu(typingctx, arr, r, o):
    """Lanes ``k < 8`` = ``arr[r, o + k]`` (float32 [., .], C order): a plain 8-lane load, for rows
    known to hold ``o + 8`` columns (a masked load with a run-time mask is slower on some CPUs)."""
    if not _f32_2d(arr) or arr.layout != "C":
        return None

    def codegen(context, builder, sig, args):
        rv, ov = _intp(context, builder, sig, args, (1, 2))
        ptr, _ = _lanes_ptr_mask(context, builder, sig.args[0], args[0], rv, ov, rv)
        return builder.load(ptr, align=4)

    return f32x8(arr, r, o), codegen


_V8I8 = ir.VectorType(ir.IntType(8), 8)


@intrinsic
def vload_i8(typingctx, arr, r, o):
    """Lanes ``k < 8`` = ``float32(arr[r, o + k])`` (int8 [., .], C order; exact): a plain 8-byte
    load, for rows known to hold ``o + 8`` columns."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int8 and arr.ndim == 2 and arr.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        rv, ov = _intp(context, builder, sig, args, (1, 2))
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer2(context, builder, data=a.data, shape=cgutils.unpack_tuple(builder, a.shape),
                                        strides=cgutils.unpack_tuple(builder, a.strides), layout="C", inds=[rv, ov],
                                        wraparound=False, boundscheck=False)
        v = builder.load(builder.bitcast(ptr, _V8I8.as_pointer()), align=1)
        return builder.sitofp(v, _VTY)

    return f32x8(arr, r, o), codegen


@intrinsic
def vstoreu(typingctx, arr, r, o, val):
    """``arr[r, o + k] = val[k]`` for lanes ``k < 8``: a plain store, for rows known to hold
    ``o + 8`` columns."""
    if not _f32_2d(arr) or arr.layout != "C" or val != f32x8:
        return None

    def codegen(context, builder, sig, args):
        rv, ov = _intp(context, builder, sig, args, (1, 2))
        ptr, _ = _lanes_ptr_mask(context, builder, sig.args[0], args[0], rv, ov, rv)
        builder.store(args[3], ptr, align=4)
        return context.get_dummy_value()

    return types.void(arr, r, o, val), codegen


@intrinsic
def vstore(typingctx, arr, r, o, n, val):
    """``arr[r, o + k] = val[k]`` for lanes ``k < n``; writes nothing else."""
    if not _f32_2d(arr) or arr.layout != "C" or val != f32x8:
        return None

    def codegen(context, builder, sig, args):
        rv, ov, nv = _intp(context, builder, sig, args, (1, 2, 3))
        ptr, mask = _lanes_ptr_mask(context, builder, sig.args[0], args[0], rv, ov, nv)
        fnty = ir.FunctionType(ir.VoidType(), [_VTY, ptr.type, _I32, mask.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v8f32.p0")
        builder.call(fn, [args[4], ptr, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return types.void(arr, r, o, n, val), codegen


@intrinsic
def vadd(typingctx, a, b):
    """Lane-wise float32 ``a + b``."""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    """Lane-wise float32 ``a * b`` (rounded, never fused with a following add)."""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x8(a, b), codegen


def _shuffle(mask, doc):
    def impl(typingctx, a, b):
        if a != f32x8 or b != f32x8:
            return None

        def codegen(context, builder, sig, args):
            return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(_I32, 8), list(mask)))

        return f32x8(a, b), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


# lanes of a (0-7) and b (8-15): the AVX unpack / shuffle / permute2f128 steps of an 8x8 transpose
vunpacklo = _shuffle((0, 8, 1, 9, 4, 12, 5, 13), "unpcklps")
vunpackhi = _shuffle((2, 10, 3, 11, 6, 14, 7, 15), "unpckhps")
vshuf_lo = _shuffle((0, 1, 8, 9, 4, 5, 12, 13), "shufps 0x44")
vshuf_hi = _shuffle((2, 3, 10, 11, 6, 7, 14, 15), "shufps 0xEE")
vhalves_lo = _shuffle((0, 1, 2, 3, 8, 9, 10, 11), "vperm2f128 0x20")
vhalves_hi = _shuffle((4, 5, 6, 7, 12, 13, 14, 15), "vperm2f128 0x31")


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``llvm.readcyclecounter``: rdtsc on x86; 0 where the target has
    none): stage boundaries of :func:`search_query`, converted to seconds by the caller."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def popcount(typingctx, x):
    """Set bits of an int64 (``llvm.ctpop``: one instruction where the CPU has popcnt)."""

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, [_I64]), "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return types.int64(types.int64), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """Lane-wise fused ``a * b + c`` (one rounding: ``llvm.fma``), as a BLAS sgemm kernel adds
    each product of the dimensions' loop."""
    if a != f32x8 or b != f32x8 or c != f32x8:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VTY, [_VTY] * 3), "llvm.fma.v8f32")
        return builder.call(fn, args)

    return f32x8(a, b, c), codegen


@intrinsic
def vdivs(typingctx, a, s):
    """Lane-wise float32 ``a / s`` (IEEE division, as numpy's)."""
    if a != f32x8 or s != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], _splat(builder, args[1], _VTY))

    return f32x8(a, s), codegen


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise ``b if b > a else a`` (np.maximum for non-NaN values)."""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        a, b = args
        return builder.select(builder.fcmp_ordered(">", b, a), b, a)

    return f32x8(a, b), codegen


def _cmp_mask(op):
    def impl(typingctx, a, s):
        """Bit k set where lane k of ``a`` {op} ``s`` (float32), as an int64."""
        if a != f32x8 or s != types.float32:
            return None

        def codegen(context, builder, sig, args):
            bits = builder.fcmp_ordered(op, args[0], _splat(builder, args[1], _VTY))
            return builder.zext(builder.bitcast(bits, ir.IntType(8)), _I64)

        return types.int64(a, s), codegen

    return intrinsic(impl)


vgt_mask = _cmp_mask(">")
vge_mask = _cmp_mask(">=")


# ------------------------------------------------------------------------------------------------
# float32 sums in numpy's orders
# ------------------------------------------------------------------------------------------------
@jit
def _block_sum(a, lo, n):
    """numpy's pairwise_sum leaf (n <= 128): from 0 below 8 terms, else 8 interleaved partial sums."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@jit
def pairwise_sum(a, n):
    """float32 sum of ``a[:n]`` (1-D float32) in numpy's pairwise order (``np.add.reduce`` along a
    contiguous axis): leaves of at most 128 terms, split in halves rounded to multiples of 8 above,
    written as an explicit post-order walk of that tree."""
    if n <= 128:
        return _block_sum(a, 0, n)
    los = np.empty(128, np.int64)
    ns = np.empty(128, np.int64)
    state = np.zeros(128, np.int64)
    vals = np.empty(128, np.float32)
    sp = 1
    vp = 0
    los[0] = 0
    ns[0] = n
    while sp > 0:
        top = sp - 1
        cl = los[top]
        cn = ns[top]
        if cn <= 128:
            vals[vp] = _block_sum(a, cl, cn)
            vp += 1
            sp -= 1
            continue
        n2 = cn // 2
        n2 -= n2 % 8
        if state[top] == 0:
            state[top] = 1
            los[sp] = cl
            ns[sp] = n2
            state[sp] = 0
            sp += 1
        elif state[top] == 1:
            state[top] = 2
            los[sp] = cl + n2
            ns[sp] = cn - n2
            state[sp] = 0
            sp += 1
        else:
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            sp -= 1
    return vals[0]


@jit
def token_sum(a, m, pairwise):
    """Sum of ``a[:m]``: pairwise (numpy's ``sum`` along a contiguous axis) or sequential from 0
    (numpy's ``[m, n].sum(0)``, n >= 2)."""
    if pairwise:
        return pairwise_sum(a, m)
    res = np.float32(0.0)
    for i in range(m):
        res += a[i]
    return res


# ------------------------------------------------------------------------------------------------
# The query-centroid product
# ------------------------------------------------------------------------------------------------
#: Centroids per panel of :func:`scores_product`: the scoring rows are stored as panels of 48
#: columns, each panel's [dim, 48] int8 block contiguous (6 KB at dim 128, read as one sequential
#: stream, then widened to a 24 KB float32 block that stays in L1 while every 4-row group of the
#: batch passes over it; the [dim, C] row-major layout read dim separate streams per block, 3x
#: slower at 65,536 centroids where the matrix no longer fits the cache).
PRODUCT_BLOCK = 48
#: Above this many rows (two 4-row groups), :func:`scores_product` widens each int8 panel into a
#: float32 buffer once instead of at every load (a batch's product is bound by arithmetic).
WIDEN_ONCE_ROWS = 8


@jit
def _product_tile(Q, P, fac, out, i0, i1, i2, i3, base, c, co, n0, n1, n2):
    """``out[i, c:c + 24]`` for rows i0..i3 from int8 panel rows ``base .. base + dim`` at column
    ``co`` (4 x 3 registers of 8 lanes, each widened from 8 bytes as loaded), times ``fac[c:c +
    24]``; ``n*`` lanes written of each register (the panel holds all 24, zero past C)."""
    zero = vsplat(np.float32(0.0))
    a0 = zero
    a1 = zero
    a2 = zero
    b0 = zero
    b1 = zero
    b2 = zero
    e0 = zero
    e1 = zero
    e2 = zero
    f0 = zero
    f1 = zero
    f2 = zero
    for d in range(Q.shape[1]):
        x0 = vload_i8(P, base + d, co)
        x1 = vload_i8(P, base + d, co + 8)
        x2 = vload_i8(P, base + d, co + 16)
        q = vsplat(Q[i0, d])
        a0 = vfma(q, x0, a0)
        a1 = vfma(q, x1, a1)
        a2 = vfma(q, x2, a2)
        q = vsplat(Q[i1, d])
        b0 = vfma(q, x0, b0)
        b1 = vfma(q, x1, b1)
        b2 = vfma(q, x2, b2)
        q = vsplat(Q[i2, d])
        e0 = vfma(q, x0, e0)
        e1 = vfma(q, x1, e1)
        e2 = vfma(q, x2, e2)
        q = vsplat(Q[i3, d])
        f0 = vfma(q, x0, f0)
        f1 = vfma(q, x1, f1)
        f2 = vfma(q, x2, f2)
    g0 = vload(fac, 0, c, n0)
    g1 = vload(fac, 0, c + 8, n1)
    g2 = vload(fac, 0, c + 16, n2)
    vstore(out, i0, c, n0, vmul(a0, g0))
    vstore(out, i0, c + 8, n1, vmul(a1, g1))
    vstore(out, i0, c + 16, n2, vmul(a2, g2))
    vstore(out, i1, c, n0, vmul(b0, g0))
    vstore(out, i1, c + 8, n1, vmul(b1, g1))
    vstore(out, i1, c + 16, n2, vmul(b2, g2))
    vstore(out, i2, c, n0, vmul(e0, g0))
    vstore(out, i2, c + 8, n1, vmul(e1, g1))
    vstore(out, i2, c + 16, n2, vmul(e2, g2))
    vstore(out, i3, c, n0, vmul(f0, g0))
    vstore(out, i3, c + 8, n1, vmul(f1, g1))
    vstore(out, i3, c + 16, n2, vmul(f2, g2))


@jit
def _product_tile_f32(Q, B, out, i0, i1, i2, i3, c, co):
    """``out[i, c:c + 24]`` (unscaled) for rows i0..i3 from the widened panel ``B`` float32
    [dim, 48] at column ``co`` (all 24 columns; :func:`scores_product` for batches)."""
    zero = vsplat(np.float32(0.0))
    a0 = zero
    a1 = zero
    a2 = zero
    b0 = zero
    b1 = zero
    b2 = zero
    e0 = zero
    e1 = zero
    e2 = zero
    f0 = zero
    f1 = zero
    f2 = zero
    for d in range(Q.shape[1]):
        x0 = vloadu(B, d, co)
        x1 = vloadu(B, d, co + 8)
        x2 = vloadu(B, d, co + 16)
        q = vsplat(Q[i0, d])
        a0 = vfma(q, x0, a0)
        a1 = vfma(q, x1, a1)
        a2 = vfma(q, x2, a2)
        q = vsplat(Q[i1, d])
        b0 = vfma(q, x0, b0)
        b1 = vfma(q, x1, b1)
        b2 = vfma(q, x2, b2)
        q = vsplat(Q[i2, d])
        e0 = vfma(q, x0, e0)
        e1 = vfma(q, x1, e1)
        e2 = vfma(q, x2, e2)
        q = vsplat(Q[i3, d])
        f0 = vfma(q, x0, f0)
        f1 = vfma(q, x1, f1)
        f2 = vfma(q, x2, f2)
    vstoreu(out, i0, c, a0)
    vstoreu(out, i0, c + 8, a1)
    vstoreu(out, i0, c + 16, a2)
    vstoreu(out, i1, c, b0)
    vstoreu(out, i1, c + 8, b1)
    vstoreu(out, i1, c + 16, b2)
    vstoreu(out, i2, c, e0)
    vstoreu(out, i2, c + 8, e1)
    vstoreu(out, i2, c + 16, e2)
    vstoreu(out, i3, c, f0)
    vstoreu(out, i3, c + 8, f1)
    vstoreu(out, i3, c + 16, f2)


@jit
def scores_product(Q, P, fac, out, c_lo, c_hi):
    """``out[:, c_lo:c_hi] = (Q @ S[c_lo:c_hi].T) * fac[c_lo:c_hi]``: each score the fused
    multiply-adds of the dimensions in order d = 0, 1, ... from 0 (what a BLAS sgemm kernel
    computes for a row of a batch: bit-identical to torch's float32 product on MKL from 3-4 rows),
    then one rounded multiply by its centroid's factor. Q float32 [M, dim]; P int8
    [panels * dim, 48]: the scoring rows S in panels (``P[b * dim + d, j]`` is row ``48 b + j``'s
    coordinate d, zero past C); fac float32 [1, C]; out float32 [M, C]; c_lo a multiple of 48.
    A panel (6 KB) stays in L1 while every 4-row group of Q passes over it; its bytes are widened
    to float32 as they are loaded (widening each panel once into a float32 buffer measured 1.5x
    slower for a 7-token query). Disjoint column ranges can be filled by different threads."""
    M = Q.shape[0]
    dim = Q.shape[1]
    last = M - 1
    B = np.empty((dim if M > WIDEN_ONCE_ROWS else 1, PRODUCT_BLOCK), np.float32)
    for cb in range(c_lo, c_hi, PRODUCT_BLOCK):
        ce = min(cb + PRODUCT_BLOCK, c_hi)
        base = (cb // PRODUCT_BLOCK) * dim
        if M > WIDEN_ONCE_ROWS and ce - cb == PRODUCT_BLOCK:  # a batch: widen the panel once
            for d in range(dim):
                for j in range(0, PRODUCT_BLOCK, 8):
                    vstoreu(B, d, j, vload_i8(P, base + d, j))
            for i in range(0, M, 4):
                i1 = min(i + 1, last)
                i2 = min(i + 2, last)
                i3 = min(i + 3, last)
                for c in range(cb, ce, 24):
                    _product_tile_f32(Q, B, out, i, i1, i2, i3, c, c - cb)
            for i in range(M):
                for c in range(cb, ce, 8):
                    vstoreu(out, i, c, vmul(vloadu(out, i, c), vloadu(fac, 0, c)))
            continue
        for i in range(0, M, 4):  # a short last group repeats the last row (same values written)
            i1 = min(i + 1, last)
            i2 = min(i + 2, last)
            i3 = min(i + 3, last)
            for c in range(cb, ce, 24):
                r = ce - c
                _product_tile(Q, P, fac, out, i, i1, i2, i3, base, c, c - cb, min(8, r), min(8, max(0, r - 8)),
                              min(8, max(0, r - 16)))


# ------------------------------------------------------------------------------------------------
# Stage 1
# ------------------------------------------------------------------------------------------------
@jit
def _kth_largest(R, i, k, buf):
    """The k-th largest value of row ``R[i]`` (ties counted: the value ``torch.topk`` puts at
    position k - 1), k <= len(buf): one pass keeping the k best in ``buf``, descending."""
    C = R.shape[1]
    for j in range(k):
        buf[j] = -np.inf
    thr = buf[k - 1]
    for c0 in range(0, C, 8):
        ln = min(8, C - c0)
        bits = vgt_mask(vload(R, i, c0, ln), thr)
        if ln < 8:
            bits &= (1 << ln) - 1
        while bits:
            lane = 0
            while not (bits >> lane) & 1:
                lane += 1
            bits &= ~(1 << lane)
            v = R[i, c0 + lane]
            if v > buf[k - 1]:
                j = k - 1
                while j > 0 and buf[j - 1] < v:
                    buf[j] = buf[j - 1]
                    j -= 1
                buf[j] = v
        thr = buf[k - 1]
    return thr


@jit
def _radix_sort(a, n):
    """``a[:n]`` (int64 in [0, 2**32)) sorted ascending: 4 stable counting passes of 8 bits."""
    out = a[:n].copy()
    tmp = np.empty(n, np.int64)
    cnt = np.empty(257, np.int64)
    for shift in (0, 8, 16, 24):
        cnt[:] = 0
        for i in range(n):
            cnt[((out[i] >> shift) & 255) + 1] += 1
        for b in range(256):
            cnt[b + 1] += cnt[b]
        for i in range(n):
            v = out[i]
            b = (v >> shift) & 255
            tmp[cnt[b]] = v
            cnt[b] += 1
        out, tmp = tmp, out
    return out


#: A stage-1 scan records, per query token, up to this many centroids (times the cut's rank,
#: plus a margin) that may still be at or above its cut; more (many exact ties) and that token is
#: scanned again against its final cut.
PROBE_ROOM_PER_CELL = 4
PROBE_ROOM_MARGIN = 64
#: Stage 1 lists its sorted candidates by a scan of the N document flags when N is at most this
#: many times their number, else by a radix sort of the ids (measured crossing over at ~16-32
#: flags per candidate; a flag costs a branch, a sorted id four counting passes).
FLAG_SCAN_RATIO = 16


@jit
def _probe_row(R, i, k, buf, rec):
    """One pass over ``R[i]``: its k-th largest score (ties counted: the value ``torch.topk`` puts
    at position k - 1) and every centroid scoring at least it. Keeps the k best in ``buf``
    (descending) and records in ``rec`` each centroid at or above the running k-th best when
    seen (a superset of the final ones: the cut only rises), filtered at the end. Returns (cut,
    number of centroids in rec), the number -1 when rec overflowed (many exact ties: the caller
    scans the row again)."""
    C = R.shape[1]
    room = rec.shape[0]
    for j in range(k):
        buf[j] = -np.inf
    thr = buf[k - 1]
    n = 0
    for c0 in range(0, C, 8):
        ln = min(8, C - c0)
        bits = vge_mask(vload(R, i, c0, ln), thr)
        if ln < 8:
            bits &= (1 << ln) - 1
        lane = 0
        while bits:
            if bits & 1:
                c = c0 + lane
                if n == room:  # forget what has fallen below the cut
                    t = buf[k - 1]
                    w = 0
                    for p in range(n):
                        if R[i, rec[p]] >= t:
                            rec[w] = rec[p]
                            w += 1
                    n = w
                    if n == room:
                        return buf[k - 1], -1
                rec[n] = c
                n += 1
                v = R[i, c]
                if v > buf[k - 1]:
                    j = k - 1
                    while j > 0 and buf[j - 1] < v:
                        buf[j] = buf[j - 1]
                        j -= 1
                    buf[j] = v
            bits >>= 1
            lane += 1
        thr = buf[k - 1]
    w = 0
    for p in range(n):
        if R[i, rec[p]] >= thr:
            rec[w] = rec[p]
            w += 1
    return thr, w


@jit
def _cells_at_least(R, i, t, rec, n, seen):
    """Append to ``rec`` (from n) every centroid c with ``R[i, c] >= t`` not in ``seen`` yet."""
    C = R.shape[1]
    for c0 in range(0, C, 8):
        ln = min(8, C - c0)
        bits = vge_mask(vload(R, i, c0, ln), t)
        if ln < 8:
            bits &= (1 << ln) - 1
        lane = 0
        while bits:
            if bits & 1 and not seen[c0 + lane]:
                seen[c0 + lane] = True
                rec[n] = c0 + lane
                n += 1
            bits >>= 1
            lane += 1
    return n


@jit
def candidates(R, ncells, ivf, ivf_offsets, ivf_blocks, mark, kth, have_kth):
    """Stage 1: sorted distinct documents listed under the centroids that score at least some
    token's ``ncells``-th best score. R float32 [m, C]; ivf, ivf_offsets, ivf_blocks: the
    inverted file as :func:`plaid.search.stages.split_ids` holds it (list c's block h, positions
    ``ivf_blocks[c * H + h]:ivf_blocks[c * H + h + 1]``, lists documents ``h * 65536 + ivf[p]``; H = 1
    and ``ivf_blocks = ivf_offsets`` for whole ids); mark bool [N] scratch, all False (left
    all False); kth float32 [m]: each token's ``ncells``-th best score, given (``have_kth``)
    or found here (ncells <= KTH_BUFFER_MAX, in the same pass that finds the centroids; each
    token's minimum score when ncells >= C). Returns int64 [n]."""
    m, C = R.shape
    N = mark.shape[0]
    seen = np.zeros(C, np.bool_)
    cells = np.empty(C, np.int64)
    nc = 0
    if ncells >= C:
        for i in range(m):
            lo = np.float32(np.inf)
            for c in range(C):
                if R[i, c] < lo:
                    lo = R[i, c]
            kth[i] = lo
        for c in range(C):
            cells[c] = c
        nc = C
    elif have_kth:
        for i in range(m):
            nc = _cells_at_least(R, i, kth[i], cells, nc, seen)
    else:
        buf = np.empty(ncells, np.float32)
        rec = np.empty(PROBE_ROOM_PER_CELL * ncells + PROBE_ROOM_MARGIN, np.int64)
        for i in range(m):
            t, r = _probe_row(R, i, ncells, buf, rec)
            if r < 0:  # many ties at the cut: the cut is known, scan the row against it
                t = _kth_largest(R, i, ncells, buf)
                kth[i] = t
                nc = _cells_at_least(R, i, t, cells, nc, seen)
                continue
            kth[i] = t
            for p in range(r):
                c = rec[p]
                if not seen[c]:
                    seen[c] = True
                    cells[nc] = c
                    nc += 1
    listed = 0
    for p in range(nc):
        listed += ivf_offsets[cells[p] + 1] - ivf_offsets[cells[p]]
    found = np.empty(min(listed, N), np.int64)
    n = 0
    H = (ivf_blocks.shape[0] - 1) // C
    for p in range(nc):
        c = cells[p]
        for h in range(H):
            base = np.int64(h) << 16
            for q in range(ivf_blocks[c * H + h], ivf_blocks[c * H + h + 1]):
                d = base + np.int64(ivf[q])
                if not mark[d]:
                    mark[d] = True
                    found[n] = d
                    n += 1
    if N <= FLAG_SCAN_RATIO * n:  # a scan of the flags beats a sort
        out = np.empty(n, np.int64)
        k = 0
        for d in range(N):
            if mark[d]:
                out[k] = d
                mark[d] = False
                k += 1
        return out
    out = _radix_sort(found, n)
    for k in range(n):
        mark[out[k]] = False
    return out


@jit
def transpose_table(Re, T):
    """``T[c, i] = Re[i, c]``: Re float32 [m, C + 1] into T float32 [C + 1, >= m] (other columns
    untouched: no kernel reads them)."""
    m, C1 = Re.shape
    for c in range(C1):  # contiguous writes, m sequential read streams (measured 1.4-1.9x the
        for i in range(m):  # blocked order, faster than numpy's transposed copy)
            T[c, i] = Re[i, c]


@jit
def approx_docs(ReT, m, keep, use_keep, docs, dcells, dcell_offsets, out, covered):
    """Document side over the centroid-major table ``ReT`` [C + 1, >= m]."""
    C = ReT.shape[0] - 1
    n = docs.shape[0]
    W = (m + 7) // 8 * 8
    best = np.empty((1, W), np.float32)
    ninf = vsplat(np.float32(-np.inf))
    pairwise = n == 1
    for d in range(n):
        doc = docs[d]
        lo = dcell_offsets[doc]
        hi = dcell_offsets[doc + 1]
        cov = False
        for o in range(0, m, 8):
            ln = min(8, m - o)
            b1 = ninf
            b2 = ninf
            p = lo
            while p + 1 < hi:  # two independent max chains (max is exact: any order)
                c1 = dcells[p]
                c2 = dcells[p + 1]
                if use_keep:
                    if keep[c1]:
                        cov = True
                    else:
                        c1 = C
                    if keep[c2]:
                        cov = True
                    else:
                        c2 = C
                b1 = vmax(b1, vload(ReT, c1, o, ln))
                b2 = vmax(b2, vload(ReT, c2, o, ln))
                p += 2
            if p < hi:
                c1 = dcells[p]
                if use_keep:
                    if keep[c1]:
                        cov = True
                    else:
                        c1 = C
                b1 = vmax(b1, vload(ReT, c1, o, ln))
            vstore(best, 0, o, 8, vmax(b1, b2))
        covered[d] = cov if use_keep else hi > lo
        out[d] = token_sum(best[0], m, pairwise)


@jit
def approx_docs_strided(Re, keep, use_keep, docs, dcells, dcell_offsets, out, covered):
    """Document side over the token-major table ``Re`` [m, C + 1] (no transposed copy: for few
    entries per centroid)."""
    m = Re.shape[0]
    C = Re.shape[1] - 1
    n = docs.shape[0]
    pairwise = n == 1
    best = np.empty(m, np.float32)
    for d in range(n):
        doc = docs[d]
        for i in range(m):
            best[i] = -np.inf
        lo = dcell_offsets[doc]
        hi = dcell_offsets[doc + 1]
        cov = False
        for p in range(lo, hi):
            c = dcells[p]
            if use_keep and not keep[c]:
                c = C
            else:
                cov = True
            for i in range(m):
                v = Re[i, c]
                if v > best[i]:
                    best[i] = v
        covered[d] = cov
        out[d] = token_sum(best, m, pairwise)


@jit
def approx_ivf(Re, keep, docs, ivf, ivf_offsets, ivf_blocks, cell_counts, slot, out, covered):
    """Inverted-file side of stage 2; leaves ``slot`` all -1 as found."""
    C = Re.shape[1] - 1
    kept = np.empty(C, np.int64)
    nk = 0
    for c in range(C):
        if keep[c]:
            kept[nk] = c
            nk += 1
    _approx_ivf(Re, kept[:nk], docs, ivf, ivf_offsets, ivf_blocks, cell_counts, slot, out, covered)


@jit
def _approx_ivf(R, kept, docs, ivf, ivf_offsets, ivf_blocks, cell_counts, slot, out, covered):
    """:func:`approx_ivf` over the scores ``R`` (float32 [m, >= C], token-major) of the kept
    centroids ``kept`` (int64, ascending): each one's column is max-ed into its listed
    candidates' rows; ``PRUNED_SCORE`` for a candidate with fewer listed centroids than
    ``cell_counts``. ``docs`` ascending and distinct; ``slot``: only its length N is read.
    :func:`ivf_bits`, then :func:`ivf_accumulate` over every kept centroid, then
    :func:`ivf_finish` (a search on several threads gives each a part of ``kept``)."""
    m = R.shape[0]
    n = docs.shape[0]
    W = (m + 7) // 8 * 8
    bits, rank = ivf_bits(docs, slot.shape[0])
    best = np.full((n, W), -np.inf, np.float32)
    listed = np.zeros(n, np.int64)
    ivf_accumulate(R, kept, ivf, ivf_offsets, ivf_blocks, bits, rank, best, listed)
    ivf_finish(best, listed, cell_counts, m, out, covered)


@jit
def ivf_bits(docs, N):
    """The candidates ``docs`` (int64, ascending, distinct, < N) as a bitmap of N bits (int64
    words; L2-resident where an int32 [N] slot array is not: 4 MB at a million documents) and
    ``rank[w]``, the candidates before word w: a listed document's row is its rank among them (a
    popcount). Returns (bits int64 [ceil(N / 64)], rank int64 [ceil(N / 64)])."""
    nw = (N + 63) >> 6
    bits = np.zeros(nw, np.int64)
    for d in range(docs.shape[0]):
        x = docs[d]
        bits[x >> 6] |= np.int64(1) << (x & 63)
    rank = np.empty(nw, np.int64)
    r = 0
    for w in range(nw):
        rank[w] = r
        r += popcount(bits[w])
    return bits, rank


@jit
def ivf_accumulate(R, kept, ivf, ivf_offsets, ivf_blocks, bits, rank, best, listed):
    """Stage 2 from the inverted file's side (``ivf``, ``ivf_offsets``, ``ivf_blocks`` as
    :func:`candidates` reads them) for the kept centroids ``kept`` (int64): each one's
    scores ``R[:, c]`` are max-ed into the rows of ``best`` (float32 [n, W], W = m rounded up to
    8) of the candidates its list names, and ``listed`` (int64 [n]) counts them. Max and counts
    do not depend on the order: parts of ``kept`` can go to different threads, each with its own
    ``best`` and ``listed``, merged by max and sum (:func:`ivf_finish` reads the result).

    Each list is first compacted to its candidates without a branch (most listed documents are not
    candidates, and a branch on that mispredicts), then only those rows are updated: 2x fewer
    cycles per listed entry at 1M documents than a slot lookup per entry."""
    m = R.shape[0]
    W = best.shape[1]
    H = (ivf_blocks.shape[0] - 1) // (ivf_offsets.shape[0] - 1)
    longest = 0
    for q in range(kept.shape[0]):
        longest = max(longest, ivf_offsets[kept[q] + 1] - ivf_offsets[kept[q]])
    hits = np.empty(longest + 1, np.int64)  # one slot past the list: the branch-free store
    col = np.zeros((1, W), np.float32)
    for q in range(kept.shape[0]):
        c = kept[q]
        for i in range(m):
            col[0, i] = R[i, c]
        nh = 0
        for h in range(H):
            base = np.int64(h) << 16
            for p in range(ivf_blocks[c * H + h], ivf_blocks[c * H + h + 1]):
                x = base + np.int64(ivf[p])
                hits[nh] = x
                nh += (bits[x >> 6] >> (x & 63)) & 1
        for h in range(nh):
            x = hits[h]
            s = rank[x >> 6] + popcount(bits[x >> 6] & ((np.int64(1) << (x & 63)) - 1))
            listed[s] += 1
            for o in range(0, W, 8):
                vstore(best, s, o, 8, vmax(vload(best, s, o, 8), vload(col, 0, o, 8)))


@jit
def ivf_finish(best, listed, cell_counts, m, out, covered):
    """Stage 2's scores from :func:`ivf_accumulate`'s ``best`` and ``listed``: a candidate with
    fewer listed centroids than ``cell_counts`` had one pruned (each token scores at least
    ``PRUNED_SCORE``); out float32 [n] the per-token maxima summed, covered bool [n]."""
    n = best.shape[0]
    pairwise = n == 1
    for d in range(n):
        row = best[d]
        if listed[d] < cell_counts[d]:  # some centroid pruned: each token scores >= PRUNED_SCORE
            for i in range(m):
                if PRUNED_SCORE > row[i]:
                    row[i] = PRUNED_SCORE
        out[d] = token_sum(row, m, pairwise)
        covered[d] = listed[d] > 0


# ------------------------------------------------------------------------------------------------
# Stage 4
# ------------------------------------------------------------------------------------------------
@jit
def used_centroids(codes, doc_offsets, docs, num_centroids, slot):
    """Distinct centroid ids of the tokens of ``docs``, ascending, with ``slot[u[k]] = k``.
    Returns (u int64 [U], -1 or the position of a token whose id is out of range)."""
    used = np.zeros(num_centroids, np.bool_)
    for d in range(docs.shape[0]):
        doc = docs[d]
        for t in range(doc_offsets[doc], doc_offsets[doc + 1]):
            c = np.int64(codes[t])
            if c < 0 or c >= num_centroids:
                return np.empty(0, np.int64), t
            used[c] = True
    U = 0
    for c in range(num_centroids):
        if used[c]:
            U += 1
    u = np.empty(U, np.int64)
    k = 0
    for c in range(num_centroids):
        if used[c]:
            u[k] = c
            slot[c] = k
            k += 1
    return u, -1


#: 2**(e - 25) for float16 exponent field e (1..30; 0 reads 1: subnormals), so that a float16
#: with mantissa field f is exactly ``(f + 1024 * (e > 0)) * _HALF_SCALE[e]`` in float32.
_HALF_SCALE = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


@jit
def half_value(bits):
    """The float32 value of float16 bit pattern ``bits`` (exact, like ``np.float16.astype``;
    arithmetic, no 65536-entry table: a table lookup per token missed the cache)."""
    h = np.int64(bits)
    e = (h >> 10) & 31
    f = h & 1023
    v = np.float32(f + (1024 if e > 0 else 0)) * _HALF_SCALE[e]
    if e == 31:
        v = np.float32(np.inf) if f == 0 else np.float32(np.nan)
    return -v if h & 0x8000 else v


@jit
def token_norms(norm_mode, norm_codes, norm_values, norm_table, doc_offsets, docs, out):
    """The stored norms of the tokens of ``docs`` (in order) into ``out`` float32 [T]: the
    divisors of their stage-4 scores. The one place that reads norms: mode 1, one-byte codes
    looked up in a float32 table (``norm_table[norm_codes[t]]``); mode 2, float32
    ``norm_values[t]``; mode 3, float16 norms as little-endian bytes ``norm_codes[2t:2t+2]``
    (:func:`half_value`; ``norm_codes`` is uint8 in every mode: one compiled signature);
    mode 0 (the index keeps raw vectors): 1 (dividing by it changes nothing). Returns -1, or the
    position of the first token whose norm is not finite and positive (``checked_norms``).
    One loop per mode: a mode test per token cost 4x the loop."""
    k = 0
    for d in range(docs.shape[0]):
        lo = doc_offsets[docs[d]]
        hi = doc_offsets[docs[d] + 1]
        if norm_mode == 3:
            for t in range(lo, hi):
                out[k + t - lo] = half_value(np.int64(norm_codes[2 * t]) | (np.int64(norm_codes[2 * t + 1]) << 8))
        elif norm_mode == 1:
            for t in range(lo, hi):
                out[k + t - lo] = norm_table[np.int64(norm_codes[t])]
        elif norm_mode == 2:
            for t in range(lo, hi):
                out[k + t - lo] = norm_values[t]
        else:
            for t in range(lo, hi):
                out[k + t - lo] = 1.0
        for t in range(lo, hi):
            v = out[k + t - lo]
            if not (v > 0.0 and v < np.inf):
                return t
        k += hi - lo
    return -1


@jit
def centroid_dots(q, centroids, u, U, csT):
    """``csT[k, i] = sum_d q[i, d] * centroids[u[k], d]`` for k < U: float32 products added in
    order d = 0, 1, ... from 0, never fused (``numpy``: ``acc += Cu[:, d:d+1] * q[:, d]``, the
    fallback's order). q float32 [m, dim]; centroids float32 [C, dim]; u int64 [>= U]; csT float32
    [>= U, W], W = m rounded up to 8 (lanes i >= m get 0). Eight centroids at a time (eight
    independent add chains), eight query tokens per lane block."""
    m, dim = q.shape
    W = csT.shape[1]
    qT = np.zeros((dim, W), np.float32)
    for i in range(m):
        for d in range(dim):
            qT[d, i] = q[i, d]
    zero = vsplat(np.float32(0.0))
    last = U - 1
    for o in range(0, W, 8):
        k = 0
        while k < U:  # a short last group repeats the last centroid (same value written twice)
            c0 = u[k]
            c1 = u[min(k + 1, last)]
            c2 = u[min(k + 2, last)]
            c3 = u[min(k + 3, last)]
            c4 = u[min(k + 4, last)]
            c5 = u[min(k + 5, last)]
            c6 = u[min(k + 6, last)]
            c7 = u[min(k + 7, last)]
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            a4 = zero
            a5 = zero
            a6 = zero
            a7 = zero
            for d in range(dim):
                qv = vload(qT, d, o, 8)
                a0 = vadd(a0, vmul(qv, vsplat(centroids[c0, d])))
                a1 = vadd(a1, vmul(qv, vsplat(centroids[c1, d])))
                a2 = vadd(a2, vmul(qv, vsplat(centroids[c2, d])))
                a3 = vadd(a3, vmul(qv, vsplat(centroids[c3, d])))
                a4 = vadd(a4, vmul(qv, vsplat(centroids[c4, d])))
                a5 = vadd(a5, vmul(qv, vsplat(centroids[c5, d])))
                a6 = vadd(a6, vmul(qv, vsplat(centroids[c6, d])))
                a7 = vadd(a7, vmul(qv, vsplat(centroids[c7, d])))
            vstore(csT, k, o, 8, a0)
            vstore(csT, min(k + 1, last), o, 8, a1)
            vstore(csT, min(k + 2, last), o, 8, a2)
            vstore(csT, min(k + 3, last), o, 8, a3)
            vstore(csT, min(k + 4, last), o, 8, a4)
            vstore(csT, min(k + 5, last), o, 8, a5)
            vstore(csT, min(k + 6, last), o, 8, a6)
            vstore(csT, min(k + 7, last), o, 8, a7)
            k += 8


@jit
def _exact_core(table, csT, crow, divisor, residuals, doc_offsets, docs, out, m):
    """``out[d]`` = exact MaxSim of ``docs[d]``: per token and query token, the ``B`` table entries
    of its residual bytes added in order from 0, then its centroid's score (row ``crow[k]`` of
    ``csT``), then divided by ``divisor[k]`` (its norm, or 1); the max over the document's
    tokens; the sum over query tokens in numpy's pairwise order. ``k`` counts the candidates'
    tokens in order (``crow``, ``divisor``: one entry each, prepared by the caller, which also
    validated them). ``m`` query tokens: the table's columns, or its first ``m`` when it is padded
    to ``csT``'s width (then its rows are read with plain loads; the padding lanes are computed
    and dropped). Eight query tokens per lane block, four document tokens at a time
    (independent add chains); -inf without tokens."""
    B = residuals.shape[1]
    W = csT.shape[1]
    padded = table.shape[1] >= W
    best = np.empty((1, W), np.float32)
    zero = vsplat(np.float32(0.0))
    ninf = vsplat(np.float32(-np.inf))
    k0 = 0
    for d in range(docs.shape[0]):
        doc = docs[d]
        lo = doc_offsets[doc]
        hi = doc_offsets[doc + 1]
        if hi <= lo:
            out[d] = -np.inf
            continue
        last = hi - 1
        for o in range(0, W, 8):
            ln = min(8, m - o)
            b = ninf
            t0 = lo
            while t0 < hi:  # a short last group repeats the last token: max is idempotent
                t1 = min(t0 + 1, last)
                t2 = min(t0 + 2, last)
                t3 = min(t0 + 3, last)
                a0 = zero
                a1 = zero
                a2 = zero
                a3 = zero
                if padded:
                    for j in range(B):
                        r = j * 256
                        a0 = vadd(a0, vloadu(table, r + np.int64(residuals[t0, j]), o))
                        a1 = vadd(a1, vloadu(table, r + np.int64(residuals[t1, j]), o))
                        a2 = vadd(a2, vloadu(table, r + np.int64(residuals[t2, j]), o))
                        a3 = vadd(a3, vloadu(table, r + np.int64(residuals[t3, j]), o))
                else:
                    for j in range(B):
                        r = j * 256
                        a0 = vadd(a0, vload(table, r + np.int64(residuals[t0, j]), o, ln))
                        a1 = vadd(a1, vload(table, r + np.int64(residuals[t1, j]), o, ln))
                        a2 = vadd(a2, vload(table, r + np.int64(residuals[t2, j]), o, ln))
                        a3 = vadd(a3, vload(table, r + np.int64(residuals[t3, j]), o, ln))
                k = k0 + t0 - lo
                k1 = k0 + t1 - lo
                k2 = k0 + t2 - lo
                k3 = k0 + t3 - lo
                a0 = vdivs(vadd(a0, vload(csT, crow[k], o, 8)), divisor[k])
                a1 = vdivs(vadd(a1, vload(csT, crow[k1], o, 8)), divisor[k1])
                a2 = vdivs(vadd(a2, vload(csT, crow[k2], o, 8)), divisor[k2])
                a3 = vdivs(vadd(a3, vload(csT, crow[k3], o, 8)), divisor[k3])
                b = vmax(b, vmax(vmax(a0, a1), vmax(a2, a3)))
                t0 += 4
            vstore(best, 0, o, 8, b)
        out[d] = pairwise_sum(best[0], m)
        k0 += hi - lo


@jit
def exact(table, cs, slot, codes, residuals, norm_mode, norm_codes, norm_values, norm_table, doc_offsets, docs, out):
    """Stage 4 of ``docs`` (tokens ``doc_offsets[d]:doc_offsets[d + 1]`` of the token arrays) with
    the centroid scores given: table float32 [B * 256, m]; cs float32 [m, U]; slot int32 [C];
    norms as :func:`token_norms`. Returns -1, or the position of the first token with an invalid
    centroid id, slot or norm (then ``out`` is not written)."""
    m = table.shape[1]
    U = cs.shape[1]
    C = slot.shape[0]
    n = docs.shape[0]
    T = 0
    for d in range(n):
        T += doc_offsets[docs[d] + 1] - doc_offsets[docs[d]]
    crow = np.empty(T, np.int64)
    divisor = np.empty(T, np.float32)
    k = 0
    # validate every token read before scoring any (as checked_codes / checked_norms)
    for d in range(n):
        doc = docs[d]
        for t in range(doc_offsets[doc], doc_offsets[doc + 1]):
            c = np.int64(codes[t])
            if c < 0 or c >= C:
                return t
            u = slot[c]
            if u < 0 or u >= U:
                return t
            crow[k] = u
            k += 1
    bad = token_norms(norm_mode, norm_codes, norm_values, norm_table, doc_offsets, docs, divisor)
    if bad >= 0:
        return bad
    W = (m + 7) // 8 * 8
    csT = np.zeros((U, W), np.float32)  # centroid-major: one row per token's centroid
    for i in range(m):
        for k in range(U):
            csT[k, i] = cs[i, k]
    _exact_core(table, csT, crow, divisor, residuals, doc_offsets, docs, out, m)
    return -1


@jit
def stage4(R, cgain, q, table, centroids, codes, residuals, norm_mode, norm_codes, norm_values, norm_table,
           doc_offsets, docs, cslot, out):
    """All of stage 4 after the byte table: the candidates' distinct centroids (first-seen order,
    their ids and norms validated), their scores, the exact scores (:func:`_exact_core`) into
    ``out`` float32 [n]. The centroid scores: ``R[i, c] * cgain[c]`` (:func:`gained_terms`) when
    ``cgain`` float32 [C] is given (R float32 [m, C]: the query's stage-1 scores), else the float32
    products :func:`centroid_dots` (``cgain`` empty). cslot: int32 [C] scratch, all -1 (left so).
    Returns -1, or the position of the first token with an invalid centroid id or norm (then
    ``out`` is not written)."""
    m = q.shape[0]
    C = cslot.shape[0]
    n = docs.shape[0]
    T = 0
    for d in range(n):
        T += doc_offsets[docs[d] + 1] - doc_offsets[docs[d]]
    u = np.empty(min(C, T), np.int64)
    crow = np.empty(T, np.int64)
    divisor = np.empty(T, np.float32)
    U = 0
    k = 0
    bad = -1
    for d in range(n):
        doc = docs[d]
        for t in range(doc_offsets[doc], doc_offsets[doc + 1]):
            c = np.int64(codes[t])
            if c < 0 or c >= C:
                bad = t
                break
            if cslot[c] < 0:
                cslot[c] = U
                u[U] = c
                U += 1
            crow[k] = cslot[c]
            k += 1
        if bad >= 0:
            break
    if bad < 0:
        bad = token_norms(norm_mode, norm_codes, norm_values, norm_table, doc_offsets, docs, divisor)
    if bad < 0:
        W = (m + 7) // 8 * 8
        csT = np.empty((U, W), np.float32)
        if cgain.shape[0] > 0:
            gained_terms(R, cgain, u, U, csT)
        else:
            centroid_dots(q, centroids, u, U, csT)
        _exact_core(table, csT, crow, divisor, residuals, doc_offsets, docs, out, m)
    for k in range(U):
        cslot[u[k]] = -1
    return bad


@jit
def gained_terms(R, cgain, u, U, csT):
    """``csT[k, i] = R[i, u[k]] * cgain[u[k]]`` for k < U and i < m (one float32 multiply), lanes
    i >= m 0: stage 4's centroid scores from the query's stage-1 scores ``R`` float32 [m, C] (the
    int8 scoring rows' products times their factor) and ``cgain`` float32 [C] (the stored scale
    over that factor), equal to the raw centroids' products within float32 rounding."""
    m = R.shape[0]
    W = csT.shape[1]
    for k in range(U):
        c = u[k]
        g = cgain[c]
        for i in range(m):
            csT[k, i] = R[i, c] * g
        for i in range(m, W):
            csT[k, i] = 0.0


@jit
def centroid_terms(q, centroids, u):
    """float32 [m, U]: :func:`centroid_dots` of the centroids ``u`` (int64 [U]), query-token-major."""
    m = q.shape[0]
    U = u.shape[0]
    csT = np.empty((U, (m + 7) // 8 * 8), np.float32)
    centroid_dots(q, centroids, u, U, csT)
    cs = np.empty((m, U), np.float32)
    for k in range(U):
        for i in range(m):
            cs[i, k] = csT[k, i]
    return cs


# ------------------------------------------------------------------------------------------------
# One query, stages 1-4 (the pipeline's policy, compiled: see plaid.search.pipeline)
# ------------------------------------------------------------------------------------------------
widen = jit(_params.widen)


@jit
def nth_largest(vals, n):
    """The n-th largest of ``vals`` (float32 1-D, 1 <= n <= len; ties counted), by quickselect on
    a copy (written out: numba's np.partition took ~8 s to compile)."""
    a = vals.copy()
    lo = 0
    hi = a.shape[0] - 1
    k = n - 1  # position in descending order
    while lo < hi:
        mid = (lo + hi) >> 1  # median of three as the pivot
        x, y, z = a[lo], a[mid], a[hi]
        if (x >= y) == (y >= z):
            pivot = y
        elif (y >= x) == (x >= z):
            pivot = x
        else:
            pivot = z
        i = lo
        j = hi
        while i <= j:  # Hoare partition, descending
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@jit
def select_top(scores, n):
    """Indices (ascending) of the ``n`` largest ``scores`` (n < len), exact ties at the n-th kept
    by lower index: the set ``pipeline.top_n(scores, n)`` returns, sorted."""
    N = scores.shape[0]
    kth = nth_largest(scores, n)
    above = 0
    for i in range(N):
        if scores[i] > kth:
            above += 1
    ties = n - above
    out = np.empty(n, np.int64)
    k = 0
    for i in range(N):
        s = scores[i]
        if s > kth:
            out[k] = i
            k += 1
        elif s == kth and ties > 0:
            ties -= 1
            out[k] = i
            k += 1
    return out


#: Up to this many hits, :func:`rank_top` orders them by insertion; above, by radix sort.
RANK_INSERTION_MAX = 64


@jit
def rank_top(scores, n):
    """``pipeline.top_n(scores, n)``: indices of the ``n`` best, best first, ties by lower index.
    Each hit's key is its score's bits mapped to an ascending unsigned order (of -score, with
    -0.0 read as 0.0 as numpy compares them) above its index, so that sorting the keys is
    numpy's stable argsort of -scores."""
    idx = np.arange(scores.shape[0]) if n >= scores.shape[0] else select_top(scores, n)
    h = idx.shape[0]
    neg = np.empty(h, np.float32)
    for i in range(h):
        neg[i] = -scores[idx[i]] + np.float32(0.0)  # + 0.0: -0.0 -> 0.0
    bits = neg.view(np.int32)
    keys = np.empty(h, np.int64)
    for i in range(h):
        b = np.int64(bits[i])
        u = (~b) & 0xFFFFFFFF if b < 0 else b | 0x80000000  # float order as unsigned order
        keys[i] = (u << 31) | i  # h < 2**31
    if h <= RANK_INSERTION_MAX:
        for i in range(1, h):
            v = keys[i]
            j = i - 1
            while j >= 0 and keys[j] > v:
                keys[j + 1] = keys[j]
                j -= 1
            keys[j + 1] = v
    else:
        keys = _radix_sort64(keys, h)
    out = np.empty(h, np.int64)
    for i in range(h):
        out[i] = idx[keys[i] & 0x7FFFFFFF]
    return out


@jit
def _radix_sort64(a, n):
    """``a[:n]`` (int64 >= 0) sorted ascending: 8 stable counting passes of 8 bits (a pass whose
    byte is the same for all is skipped)."""
    out = a[:n].copy()
    tmp = np.empty(n, np.int64)
    cnt = np.empty(257, np.int64)
    for shift in range(0, 64, 8):
        cnt[:] = 0
        for i in range(n):
            cnt[((out[i] >> shift) & 255) + 1] += 1
        if cnt[((out[0] >> shift) & 255) + 1] == n:
            continue
        for b in range(256):
            cnt[b + 1] += cnt[b]
        for i in range(n):
            v = out[i]
            b = (v >> shift) & 255
            tmp[cnt[b]] = v
            cnt[b] += 1
        out, tmp = tmp, out
    return out


@jit
def transpose_colmax(R, T, colmax):
    """``T[c, i] = R[i, c]`` (row C all ``PRUNED_SCORE``: the table :func:`approx_docs` reads)
    and ``colmax[0, c] = R[:, c].max()`` (:func:`stages.surviving`'s column maxima) in one pass
    over R: blocks of 8 x 8 transposed in registers. R float32 [m, C]; T float32 [C + 1, W]
    (W = m rounded up to 8; lanes i >= m hold copies, never read); colmax float32 [1, C]."""
    m, C = R.shape
    last = m - 1
    for o in range(0, m, 8):
        for c0 in range(0, C, 8):
            ln = min(8, C - c0)
            r0 = vload(R, o, c0, ln)
            r1 = vload(R, min(o + 1, last), c0, ln)  # rows past m repeat the last one
            r2 = vload(R, min(o + 2, last), c0, ln)
            r3 = vload(R, min(o + 3, last), c0, ln)
            r4 = vload(R, min(o + 4, last), c0, ln)
            r5 = vload(R, min(o + 5, last), c0, ln)
            r6 = vload(R, min(o + 6, last), c0, ln)
            r7 = vload(R, min(o + 7, last), c0, ln)
            mx = vmax(vmax(vmax(r0, r1), vmax(r2, r3)), vmax(vmax(r4, r5), vmax(r6, r7)))
            if o > 0:
                mx = vmax(vload(colmax, 0, c0, ln), mx)
            vstore(colmax, 0, c0, ln, mx)
            t0 = vunpacklo(r0, r1)
            t1 = vunpackhi(r0, r1)
            t2 = vunpacklo(r2, r3)
            t3 = vunpackhi(r2, r3)
            t4 = vunpacklo(r4, r5)
            t5 = vunpackhi(r4, r5)
            t6 = vunpacklo(r6, r7)
            t7 = vunpackhi(r6, r7)
            u0 = vshuf_lo(t0, t2)
            u1 = vshuf_hi(t0, t2)
            u2 = vshuf_lo(t1, t3)
            u3 = vshuf_hi(t1, t3)
            u4 = vshuf_lo(t4, t6)
            u5 = vshuf_hi(t4, t6)
            u6 = vshuf_lo(t5, t7)
            u7 = vshuf_hi(t5, t7)
            vstore(T, c0, o, 8, vhalves_lo(u0, u4))
            if ln > 1:
                vstore(T, c0 + 1, o, 8, vhalves_lo(u1, u5))
            if ln > 2:
                vstore(T, c0 + 2, o, 8, vhalves_lo(u2, u6))
            if ln > 3:
                vstore(T, c0 + 3, o, 8, vhalves_lo(u3, u7))
            if ln > 4:
                vstore(T, c0 + 4, o, 8, vhalves_hi(u0, u4))
            if ln > 5:
                vstore(T, c0 + 5, o, 8, vhalves_hi(u1, u5))
            if ln > 6:
                vstore(T, c0 + 6, o, 8, vhalves_hi(u2, u6))
            if ln > 7:
                vstore(T, c0 + 7, o, 8, vhalves_hi(u3, u7))
    for i in range(m):
        T[C, i] = PRUNED_SCORE


@jit
def search_query(R, q, table, centroids, cgain, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, doc_offsets, codes,
                 residuals, norm_mode, norm_codes, norm_values, norm_table, alive, use_alive, k, ncells, threshold, n2, n3,
                 mark, slot, cslot, ticks):
    """Stages 1-4 of one query in one call: what ``pipeline.search_query`` decides (no subset),
    with the same results and trace.

    R float32 [m, C] the query's centroid scores; q float32 [m, dim]; table float32 [B * 256, m]
    (``codec.score_table(q)``); the index's arrays (centroids float32 [C, dim], cgain float32 [C] or
    empty (:func:`stage4`), the inverted file
    and its transpose, doc_offsets, the single segment's codes, residuals and norms as
    :func:`token_norms`); alive bool [N] (``use_alive``); budgets k, ncells, threshold (float64,
    compared in float32 as numpy does), n2, n3; scratch mark bool [N] all False, slot int32 [N]
    and cslot int32 [C] all -1 (left so); ticks int64 [5] receives the cycle counter at the
    start and after each stage. Returns (ids int64 [<= k], scores float32 [<= k], candidates int64 [n]
    sorted, final ncells, threshold used, stage-2 survivors and stage-3 survivors as sorted
    indices into the candidates, status: -1, or the position of an invalid token).
    :func:`query_head`, :func:`query_stages23`, :func:`stage4` and :func:`ranked` (which a
    search on several threads calls separately, scoring stage 2's inverted lists and stage 4's
    candidates in parts in between).
    """
    docs, nc, floor, ReT, colmax = query_head(R, ivf, ivf_offsets, ivf_blocks, alive, use_alive, ncells, n2, n3, mark,
                                              ticks)
    none = np.empty(0, np.int64)
    if docs.shape[0] == 0:
        ticks[2] = ticks[3] = ticks[4] = ticks[1]
        return none, np.empty(0, np.float32), docs, nc, threshold, none, none, -1
    thr, sel, sel3 = query_stages23(R, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, threshold, n2, n3, slot,
                                    ticks, docs, floor, ReT, colmax, np.empty(0, np.int64), 0,
                                    np.empty((0, 0, ReT.shape[1]), np.float32), np.empty((0, 0), np.int64), False,
                                    np.empty(0, np.bool_), np.empty(0, np.int64), -1, 0)
    d4 = docs[sel3]
    exact4 = np.empty(d4.shape[0], np.float32)
    bad = stage4(R, cgain, q, table, centroids, codes, residuals, norm_mode, norm_codes, norm_values, norm_table,
                 doc_offsets, d4, cslot, exact4)
    if bad >= 0:
        return none, np.empty(0, np.float32), docs, nc, thr, sel, sel3, bad
    top = ranked(exact4, k, ticks)
    return d4[top], exact4[top], docs, nc, thr, sel, sel3, -1


@jit
def ranked(exact4, k, ticks):
    """Stage 4's ranking: :func:`rank_top` of the exact scores (indices of the best k); ticks[4] set."""
    top = rank_top(exact4, k)
    ticks[4] = cycles()
    return top


@jit
def query_head(R, ivf, ivf_offsets, ivf_blocks, alive, use_alive, ncells, n2, n3, mark, ticks):
    """Stage 1 of :func:`search_query` (candidates, ncells widened while there are fewer than
    n2), and what stages 2-3 read: R centroid-major with a last row of ``PRUNED_SCORE`` (ReT
    float32 [C + 1, W]) and its column maxima (colmax float32 [1, C]), both empty when stages 2-3
    do not run (at most n3 candidates). Returns (candidates int64 [n] sorted, final ncells, floor:
    the lowest score among the probed cells, ReT, colmax); ticks[0], ticks[1] set."""
    m, C = R.shape
    ticks[0] = cycles()
    kth = np.empty(m, np.float32)
    nc = ncells
    while True:
        given = KTH_BUFFER_MAX < nc < C
        if given:
            for i in range(m):
                kth[i] = nth_largest(R[i], nc)
        docs = candidates(R, nc, ivf, ivf_offsets, ivf_blocks, mark, kth, given)
        if use_alive:
            n = 0
            for d in range(docs.shape[0]):
                if alive[docs[d]]:
                    docs[n] = docs[d]
                    n += 1
            docs = docs[:n]
        if docs.shape[0] >= n2 or nc >= C:
            break
        nc = widen(nc, C)
    floor = np.float64(kth.min())  # the lowest score among the probed cells (R.min() once all are)
    ticks[1] = cycles()
    W = (m + 7) // 8 * 8
    ReT = np.empty((0, W), np.float32)
    colmax = np.empty((1, 0), np.float32)
    if docs.shape[0] > n3:  # stage 2 or 3 runs: R centroid-major (the rows they read) and its column maxima
        ReT = np.empty((C + 1, W), np.float32)
        colmax = np.empty((1, C), np.float32)
        transpose_colmax(R, ReT, colmax)
    return docs, nc, floor, ReT, colmax


@jit
def kept_at(colmax, thr, keep, kept, ivf_offsets):
    """Stage 2's surviving centroids at threshold ``thr`` (float32): keep bool [C] and their ids
    ascending into kept int64 [>= C]. Returns (how many, the entries of their inverted lists)."""
    C = colmax.shape[1]
    listed = 0
    nk = 0
    for c in range(C):
        keep[c] = colmax[0, c] >= thr
        if keep[c]:
            kept[nk] = c
            nk += 1
            listed += ivf_offsets[c + 1] - ivf_offsets[c]
    return nk, listed


@jit
def candidate_entries(docs, dcell_offsets):
    """Stage 2's inputs from the candidates' side: counts int64 [n], each candidate's distinct
    centroids, and their total."""
    n = docs.shape[0]
    counts = np.empty(n, np.int64)
    total = 0
    for d in range(n):
        counts[d] = dcell_offsets[docs[d] + 1] - dcell_offsets[docs[d]]
        total += counts[d]
    return counts, total


@jit
def query_stages23(R, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, threshold, n2, n3, slot, ticks, docs, floor,
                   ReT, colmax, counts_in, total_in, pre_best, pre_listed, have_pre, keep_in, kept_in, nk_in, listed_in):
    """Stages 2-3 of :func:`search_query` after :func:`query_head` (``docs`` not empty): (the
    threshold used, stage-2 and stage-3 survivors as sorted indices into ``docs``); ticks[2],
    ticks[3] set.

    counts_in, total_in: :func:`candidate_entries` of ``docs`` when computed already (else
    counts_in is empty); keep_in bool [C], kept_in int64 [C], nk_in, listed_in: :func:`kept_at`
    at ``threshold`` when computed already (else nk_in < 0; keep_in and kept_in are then used as
    its scratch when they hold C entries). ``have_pre``: stage 2's first scoring, when it reads the inverted lists
    of the centroids surviving ``threshold``, was done already, in parts (:func:`ivf_accumulate`
    over parts of them, one per thread): pre_best float32 [parts, n, W] and pre_listed int64
    [parts, n], merged here by max and sum (the same scores: max and counts do not depend on
    the order). Whether that scoring happens at all is still decided here."""
    m, C = R.shape
    n = docs.shape[0]
    # -- stage 2: pruned approximate MaxSim, keep n2 (the fallback when too few are covered) ------
    thr = threshold
    if n <= n2:
        sel = np.arange(n)
    else:
        if counts_in.shape[0] == n:
            counts, total = counts_in, total_in
        else:
            counts, total = candidate_entries(docs, dcell_offsets)
        if keep_in.shape[0] == C and kept_in.shape[0] >= C:
            keep, kept = keep_in, kept_in
        else:
            keep = np.empty(C, np.bool_)
            kept = np.empty(C, np.int64)
        approx = np.empty(n, np.float32)
        covered = np.empty(n, np.bool_)
        scored = False
        for attempt in range(2):
            t32 = np.float32(thr)  # numpy compares float32 scores with the threshold in float32
            if attempt == 0 and nk_in >= 0:
                nk, listed = nk_in, listed_in
            else:
                nk, listed = kept_at(colmax, t32, keep, kept, ivf_offsets)
            if attempt == 0 and listed < n2:  # too few listed to cover n2: no need to score
                n_covered = listed
            else:
                if listed <= total:  # the shorter side: the kept centroids' lists
                    if attempt == 0 and have_pre:
                        best = pre_best[0]
                        lst = pre_listed[0]
                        for p in range(1, pre_best.shape[0]):
                            for d in range(n):
                                lst[d] += pre_listed[p, d]
                                for o in range(0, best.shape[1], 8):
                                    vstore(best, d, o, 8, vmax(vload(best, d, o, 8), vload(pre_best[p], d, o, 8)))
                        ivf_finish(best, lst, counts, m, approx, covered)
                    else:
                        _approx_ivf(R, kept[:nk], docs, ivf, ivf_offsets, ivf_blocks, counts, slot, approx, covered)
                else:  # the candidates' centroids
                    approx_docs(ReT, m, keep, True, docs, dcells, dcell_offsets, approx, covered)
                scored = True
                n_covered = 0
                for d in range(n):
                    if covered[d]:
                        n_covered += 1
            if attempt == 1 or n_covered >= n2:
                break
            lowered = min(thr, floor)
            redo = lowered < threshold or not scored
            thr = lowered
            if not redo:
                break
        sel = select_top(approx, n2)
    ticks[2] = cycles()
    # -- stage 3: approximate MaxSim over every centroid, keep n3 ---------------------------------
    if sel.shape[0] > n3:
        d3 = docs[sel]
        approx3 = np.empty(d3.shape[0], np.float32)
        covered3 = np.empty(d3.shape[0], np.bool_)
        approx_docs(ReT, m, _NO_KEEP, False, d3, dcells, dcell_offsets, approx3, covered3)
        sel3 = sel[select_top(approx3, n3)]
    else:
        sel3 = sel
    ticks[3] = cycles()
    return thr, sel, sel3


_NO_KEEP = np.zeros(1, np.bool_)


@jit
def search_many(R, starts, Q, tables, table_offsets, widths, centroids, cgain, ivf, ivf_offsets, ivf_blocks, dcells,
                dcell_offsets, doc_offsets, codes, residuals, norm_mode, norm_codes, norm_values, norm_table, alive, use_alive, k,
                ncells, threshold, n2, n3, mark, slot, cslot, ids, scores, counts):
    """:func:`search_query` for each query ``i < len(starts) - 1`` of a group, in one call: its rows
    ``starts[i]:starts[i + 1]`` of R (float32 [sum m, C]) and Q (float32 [sum m, dim]), its byte
    table ``tables[table_offsets[i]:table_offsets[i + 1]]`` (float32, flat) read as
    ``[rows, widths[i]]``. Hits into ids int64 [n, >= k] and scores float32 [n, >= k] (the first
    ``counts[i]`` of row i). Returns (-1, -1), or (query, position of its invalid token): then
    the later queries are not searched."""
    ticks = np.zeros(5, np.int64)
    for i in range(starts.shape[0] - 1):
        a = starts[i]
        b = starts[i + 1]
        lo = table_offsets[i]
        hi = table_offsets[i + 1]
        w = widths[i]
        table = tables[lo:hi].reshape(((hi - lo) // w, w))
        hid, hsc, docs, nc, thr, sel2, sel3, bad = search_query(
            R[a:b], Q[a:b], table, centroids, cgain, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, doc_offsets, codes,
            residuals, norm_mode, norm_codes, norm_values, norm_table, alive, use_alive, k, ncells, threshold, n2, n3, mark, slot,
            cslot, ticks)
        if bad >= 0:
            return i, bad
        counts[i] = hid.shape[0]
        for j in range(hid.shape[0]):
            ids[i, j] = hid[j]
            scores[i, j] = hsc[j]
    return -1, -1

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

PRUNED_SCORE = np.float32(-9999.0)  # stages.PRUNED_SCORE (not imported: keeps this module torch-free)

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
# Stages 2-3
# ------------------------------------------------------------------------------------------------
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


@jit
def candidates(R, ncells, ivf, ivf_offsets, mark, kth, have_kth):
    """Stage 1: sorted distinct documents listed under the centroids that score at least some
    token's ``ncells``-th best score. R float32 [m, C]; mark bool [N] scratch, all False (left
    all False); kth float32 [m]: each token's ``ncells``-th best score, given (``have_kth``)
    or found here (ncells <= 64; each token's minimum score when ncells >= C). Returns int64 [n]."""
    m, C = R.shape
    N = mark.shape[0]
    cells = np.zeros(C, np.bool_)
    if ncells >= C:
        for i in range(m):
            lo = np.float32(np.inf)
            for c in range(C):
                if R[i, c] < lo:
                    lo = R[i, c]
            kth[i] = lo
        cells[:] = True
    else:
        if not have_kth:
            buf = np.empty(ncells, np.float32)
            for i in range(m):
                kth[i] = _kth_largest(R, i, ncells, buf)
        for i in range(m):
            t = kth[i]
            for c0 in range(0, C, 8):
                ln = min(8, C - c0)
                bits = vge_mask(vload(R, i, c0, ln), t)
                if ln < 8:
                    bits &= (1 << ln) - 1
                lane = 0
                while bits:
                    if bits & 1:
                        cells[c0 + lane] = True
                    bits >>= 1
                    lane += 1
    listed = 0
    for c in range(C):
        if cells[c]:
            listed += ivf_offsets[c + 1] - ivf_offsets[c]
    found = np.empty(min(listed, N), np.int64)
    n = 0
    for c in range(C):
        if cells[c]:
            for p in range(ivf_offsets[c], ivf_offsets[c + 1]):
                d = ivf[p]
                if not mark[d]:
                    mark[d] = True
                    found[n] = d
                    n += 1
    if N <= 64 * n:  # a scan of the flags beats a sort
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
def approx_ivf(Re, keep, docs, ivf, ivf_offsets, cell_counts, slot, out, covered):
    """Inverted-file side of stage 2; leaves ``slot`` all -1 as found."""
    m = Re.shape[0]
    C = Re.shape[1] - 1
    n = docs.shape[0]
    W = (m + 7) // 8 * 8
    for d in range(n):
        slot[docs[d]] = d
    best = np.full((n, W), -np.inf, np.float32)
    listed = np.zeros(n, np.int64)
    col = np.zeros((1, W), np.float32)
    for c in range(C):
        if not keep[c]:
            continue
        for i in range(m):
            col[0, i] = Re[i, c]
        for p in range(ivf_offsets[c], ivf_offsets[c + 1]):
            s = slot[ivf[p]]
            if s >= 0:
                listed[s] += 1
                for o in range(0, W, 8):
                    vstore(best, s, o, 8, vmax(vload(best, s, o, 8), vload(col, 0, o, 8)))
    for d in range(n):
        slot[docs[d]] = -1
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


@jit
def exact(table, cs, slot, codes, residuals, norm_mode, norms16, norms32, lut, doc_offsets, docs, out):
    """Stage 4 of ``docs`` (tokens ``doc_offsets[d]:doc_offsets[d + 1]`` of the token arrays).

    table float32 [B * 256, m]; cs float32 [m, U]; slot int32 [C]; norm_mode 0 (no norms),
    1 (``norms16``: float16 bit patterns, ``lut`` their values), 2 (``norms32``) or 3
    (``norms16``: one-byte codes, ``lut`` their values, all valid). Returns -1,
    or the position of the first token with an invalid centroid id, slot or norm (then ``out``
    is not written).
    """
    m = table.shape[1]
    B = residuals.shape[1]
    U = cs.shape[1]
    C = slot.shape[0]
    n = docs.shape[0]
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
            if norm_mode == 1:
                bits = norms16[t]
                if bits == 0 or bits >= 0x7C00:  # +0, negative (sign bit), inf or NaN
                    return t
            elif norm_mode == 2:
                v = norms32[t]
                if not (v > 0.0 and v < np.inf):
                    return t
    W = (m + 7) // 8 * 8
    csT = np.zeros((U, W), np.float32)  # centroid-major: one row per token's centroid
    for i in range(m):
        for k in range(U):
            csT[k, i] = cs[i, k]
    best = np.empty((n, W), np.float32)
    if m <= 8:
        _exact_narrow(table, csT, slot, codes, residuals, norm_mode, norms16, norms32, lut, doc_offsets, docs, best)
    else:
        _exact_wide(table, csT, slot, codes, residuals, norm_mode, norms16, norms32, lut, doc_offsets, docs, best)
    for d in range(n):
        out[d] = pairwise_sum(best[d], m)
    return -1


@jit
def _exact_narrow(table, csT, slot, codes, residuals, norm_mode, norms16, norms32, lut, doc_offsets, docs, best):
    """Stage 4 for m <= 8 query tokens (one 8-lane block): two tokens at a time, independent add
    chains (each in order j = 0..B-1). Writes best[d, :8] (the per-token maxima of doc d)."""
    m = table.shape[1]
    B = residuals.shape[1]
    zero = vsplat(np.float32(0.0))
    ninf = vsplat(np.float32(-np.inf))
    for d in range(docs.shape[0]):
        doc = docs[d]
        hi = doc_offsets[doc + 1]
        t = doc_offsets[doc]
        b = ninf
        while t < hi:
            t2 = t + 1 if t + 1 < hi else t  # an odd last token counts twice: max is idempotent
            a1 = zero
            a2 = zero
            for j in range(B):
                a1 = vadd(a1, vload(table, j * 256 + np.int64(residuals[t, j]), 0, m))
                a2 = vadd(a2, vload(table, j * 256 + np.int64(residuals[t2, j]), 0, m))
            a1 = vadd(a1, vload(csT, slot[np.int64(codes[t])], 0, 8))
            a2 = vadd(a2, vload(csT, slot[np.int64(codes[t2])], 0, 8))
            if norm_mode == 1 or norm_mode == 3:
                a1 = vdivs(a1, lut[norms16[t]])
                a2 = vdivs(a2, lut[norms16[t2]])
            elif norm_mode == 2:
                a1 = vdivs(a1, norms32[t])
                a2 = vdivs(a2, norms32[t2])
            b = vmax(vmax(b, a1), a2)
            t += 2
        vstore(best, d, 0, 8, b)


@jit
def _exact_wide(table, csT, slot, codes, residuals, norm_mode, norms16, norms32, lut, doc_offsets, docs, best):
    """Stage 4 for m > 8: groups of 32 query tokens (four 8-lane blocks, masked where the group
    has fewer), one pass over the tokens per group (two at a time), each table row read whole."""
    m = table.shape[1]
    B = residuals.shape[1]
    W = best.shape[1]
    zero = vsplat(np.float32(0.0))
    ninf = vsplat(np.float32(-np.inf))
    for g in range(0, m, 32):
        l0 = min(8, max(0, m - g))
        l1 = min(8, max(0, m - g - 8))
        l2 = min(8, max(0, m - g - 16))
        l3 = min(8, max(0, m - g - 24))
        w1 = 8 if g + 8 < W else 0  # blocks beyond W: no lanes (nothing read or written)
        w2 = 8 if g + 16 < W else 0
        w3 = 8 if g + 24 < W else 0
        for d in range(docs.shape[0]):
            doc = docs[d]
            b0 = ninf
            b1 = ninf
            b2 = ninf
            b3 = ninf
            hi = doc_offsets[doc + 1]
            t = doc_offsets[doc]
            while t < hi:  # two tokens at a time: 8 independent add chains
                t2 = t + 1 if t + 1 < hi else t
                a0 = zero
                a1 = zero
                a2 = zero
                a3 = zero
                c0 = zero
                c1 = zero
                c2 = zero
                c3 = zero
                for j in range(B):
                    r = j * 256 + np.int64(residuals[t, j])
                    q = j * 256 + np.int64(residuals[t2, j])
                    a0 = vadd(a0, vload(table, r, g, l0))
                    a1 = vadd(a1, vload(table, r, g + 8, l1))
                    a2 = vadd(a2, vload(table, r, g + 16, l2))
                    a3 = vadd(a3, vload(table, r, g + 24, l3))
                    c0 = vadd(c0, vload(table, q, g, l0))
                    c1 = vadd(c1, vload(table, q, g + 8, l1))
                    c2 = vadd(c2, vload(table, q, g + 16, l2))
                    c3 = vadd(c3, vload(table, q, g + 24, l3))
                u = slot[np.int64(codes[t])]
                a0 = vadd(a0, vload(csT, u, g, 8))
                a1 = vadd(a1, vload(csT, u, g + 8, w1))
                a2 = vadd(a2, vload(csT, u, g + 16, w2))
                a3 = vadd(a3, vload(csT, u, g + 24, w3))
                u = slot[np.int64(codes[t2])]
                c0 = vadd(c0, vload(csT, u, g, 8))
                c1 = vadd(c1, vload(csT, u, g + 8, w1))
                c2 = vadd(c2, vload(csT, u, g + 16, w2))
                c3 = vadd(c3, vload(csT, u, g + 24, w3))
                if norm_mode != 0:
                    nv = norms32[t] if norm_mode == 2 else lut[norms16[t]]
                    a0 = vdivs(a0, nv)
                    a1 = vdivs(a1, nv)
                    a2 = vdivs(a2, nv)
                    a3 = vdivs(a3, nv)
                    nv = norms32[t2] if norm_mode == 2 else lut[norms16[t2]]
                    c0 = vdivs(c0, nv)
                    c1 = vdivs(c1, nv)
                    c2 = vdivs(c2, nv)
                    c3 = vdivs(c3, nv)
                b0 = vmax(vmax(b0, a0), c0)
                b1 = vmax(vmax(b1, a1), c1)
                b2 = vmax(vmax(b2, a2), c2)
                b3 = vmax(vmax(b3, a3), c3)
                t += 2
            vstore(best, d, g, 8, b0)
            vstore(best, d, g + 8, w1, b1)
            vstore(best, d, g + 16, w2, b2)
            vstore(best, d, g + 24, w3, b3)

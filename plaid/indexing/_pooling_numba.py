"""numba implementation of :func:`plaid.indexing.pooling.ward_pool_units` (imported on first use only).

The kernel is ``@njit(cache=True, nogil=True, fastmath=False)``: it compiles on its first call
(later processes load it from numba's cache) and releases the GIL, so several threads can pool
different documents at once. It performs, element for element, the float64 operations of the
numpy implementation in :mod:`plaid.indexing.pooling` in the same order (the Gram matrix summed
over dimensions 0..d-1, the Lance-Williams update written as the same expression, sums of a
cluster's rows in token order), so both give the same clusters and the same vectors, bit for bit;
``tests/test_pooling.py`` compares them with ``==``.
"""
from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True, fastmath=False)


@jit
def _row_nearest(D, m, n):
    """(index, value) of the smallest entry of row ``m`` of ``D[:n, :n]``; the first one on ties."""
    best = np.inf
    arg = -1
    for j in range(n):
        v = D[m, j]
        if v < best:
            best = v
            arg = j
    return arg, best


@jit
def _gram(xt, n, D):
    """Lower triangle of the Gram matrix of the columns ``xt[:, :n]`` into ``D``: each entry summed
    over t = 0..d-1 in order (the products of float32 values are exact in float64, so only the
    order of the sums matters)."""
    # accumulated in a buffer allocated here: LLVM then knows it aliases nothing and vectorises
    # the loop over j (4x faster than accumulating in D or in a buffer passed in)
    row = np.empty(n, np.float64)
    for i in range(n):
        for j in range(i + 1):
            row[j] = 0.0
        for t in range(xt.shape[0]):
            xi = xt[t, i]
            xr = xt[t]
            for j in range(i + 1):
                row[j] += xi * xr[j]
        for j in range(i + 1):
            D[i, j] = row[j]


@jit
def _ward_unit(x, start, n, k, renorm, out, o0, xt, D, size, nn, nnd, active, parent, rank, acc):
    """Pool rows ``x[start:start+n]`` into ``k < n`` cluster means written to ``out[o0:o0+k]``."""
    d = x.shape[1]
    for t in range(d):
        for j in range(n):
            xt[t, j] = np.float64(x[start + j, t])
    _gram(xt, n, D)
    # Ward's merge cost of two single tokens: ||xi - xj||^2 / 2 (inf on the diagonal)
    for i in range(n):
        size[i] = D[i, i]  # the squared norms, kept here until the costs are filled in
    for i in range(n):
        for j in range(i):
            v = 0.5 * ((size[i] + size[j]) - 2.0 * D[i, j])
            if v < 0.0:
                v = 0.0
            D[i, j] = v
            D[j, i] = v
        D[i, i] = np.inf
    for i in range(n):
        size[i] = 1.0
        active[i] = True
        parent[i] = i
    for i in range(n):
        a, v = _row_nearest(D, i, n)
        nn[i] = a
        nnd[i] = v
    for _ in range(n - k):
        # the globally cheapest merge: the first row holding the smallest nearest-neighbour cost
        i = -1
        best = np.inf
        for m in range(n):
            if active[m] and (i < 0 or nnd[m] < best):
                best = nnd[m]
                i = m
        j = nn[i]
        a = min(i, j)
        b = max(i, j)
        ni = size[a]
        nj = size[b]
        dab = D[a, b]
        for m in range(n):
            if active[m] and m != a and m != b:
                nm = size[m]
                v = ((ni + nm) * D[m, a] + (nj + nm) * D[m, b] - nm * dab) / (ni + nj + nm)
                D[m, a] = v
                D[a, m] = v
        for m in range(n):
            D[m, b] = np.inf
            D[b, m] = np.inf
        size[a] = ni + nj
        active[b] = False
        parent[b] = a
        for m in range(n):
            if not active[m] or m == a:
                continue
            if nn[m] == a or nn[m] == b:
                c, v = _row_nearest(D, m, n)
                nn[m] = c
                nnd[m] = v
            elif D[m, a] < nnd[m] or (D[m, a] == nnd[m] and a < nn[m]):
                nn[m] = a
                nnd[m] = D[m, a]
        c, v = _row_nearest(D, a, n)
        nn[a] = c
        nnd[a] = v
    # a cluster's root is its first token (a merge keeps the smaller index): number the clusters
    # in the order of their first tokens, and sum their rows in token order
    r = 0
    for i in range(n):
        if parent[i] == i:
            rank[i] = r
            r += 1
    for c in range(k):
        for t in range(d):
            acc[c, t] = 0.0
    for i in range(n):
        root = i
        while parent[root] != root:
            root = parent[root]
        c = rank[root]
        for t in range(d):
            acc[c, t] += xt[t, i]
    for i in range(n):
        if parent[i] != i:
            continue
        c = rank[i]
        s = size[i]
        for t in range(d):
            acc[c, t] = acc[c, t] / s
        if renorm:
            ss = 0.0
            for t in range(d):
                ss += acc[c, t] * acc[c, t]
            norm = np.sqrt(ss)
            if norm > 0.0:
                for t in range(d):
                    acc[c, t] = acc[c, t] / norm
        for t in range(d):
            out[o0 + c, t] = np.float32(acc[c, t])


@jit
def ward_pool_units(x, in_start, in_len, out_start, out_len, renorm, out):
    """See :func:`plaid.indexing.pooling.ward_pool_units` (same arguments, same results)."""
    d = x.shape[1]
    maxn = 1
    for u in range(len(in_len)):
        if in_len[u] > out_len[u] and in_len[u] > maxn:
            maxn = in_len[u]
    xt = np.empty((d, maxn), np.float64)
    D = np.empty((maxn, maxn), np.float64)
    size = np.empty(maxn, np.float64)
    nn = np.empty(maxn, np.int64)
    nnd = np.empty(maxn, np.float64)
    active = np.empty(maxn, np.bool_)
    parent = np.empty(maxn, np.int64)
    rank = np.empty(maxn, np.int64)
    acc = np.empty((maxn, d), np.float64)
    for u in range(len(in_len)):
        n = in_len[u]
        k = out_len[u]
        s = in_start[u]
        o = out_start[u]
        if k >= n:
            for i in range(n):
                for t in range(d):
                    out[o + i, t] = x[s + i, t]
        else:
            _ward_unit(x, s, n, k, renorm, out, o, xt, D, size, nn, nnd, active, parent, rank, acc)

"""numba kernels of :mod:`plaid.codecs`: the PQ encoder (:meth:`PQCodec.encode`) and the rotation
of query tokens (:meth:`PQCodec.query_layout`); imported on first use only.

``@njit(cache=True, nogil=True, fastmath=False)``: compiled on its first call (later processes
load it from numba's cache), releasing the GIL so the build's worker threads encode chunks at
once. Each token is encoded on its own, with float32 operations in a fixed order, so the codes
do not depend on how tokens are split into calls or threads.
"""
from __future__ import annotations

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True, fastmath=False)


@jit
def pq_encode(z, books_t, out):
    """Nearest sub-centroid of every sub-vector: ``out[i, j] = argmin_k sum_d (z[i, j * W + d] -
    books_t[j, d, k]) ** 2``, the squared differences added in order d = 0 .. W - 1 (float32,
    unfused), the first k on ties.

    z: float32 [n, m * W] (the codec's padded layout); books_t: float32 [m, W, 256] (the
    codebooks with the 256 sub-centroids last: the distance to all of them is one vectorisable
    loop per dimension); out: uint8 [n, m].
    """
    n = z.shape[0]
    m, W, K = books_t.shape
    dist = np.empty(K, np.float32)
    for i in range(n):
        for j in range(m):
            base = j * W
            v = z[i, base]
            for k in range(K):
                t = v - books_t[j, 0, k]
                dist[k] = t * t
            for d in range(1, W):
                v = z[i, base + d]
                for k in range(K):
                    t = v - books_t[j, d, k]
                    dist[k] += t * t
            best = dist[0]
            arg = 0
            for k in range(1, K):
                if dist[k] < best:
                    best = dist[k]
                    arg = k
            out[i, j] = arg


@jit
def rotate_rows(x, rot, out):
    """``out[i] = float32(x[i] @ rot)`` with the products and sums in float64, added in order
    k = 0 .. dim - 1 (unfused): rows do not depend on each other, and no BLAS thread runs.

    x: float32 [n, dim]; rot: float64 [dim, dim]; out: float32 [n, dim].
    """
    n, dim = x.shape
    acc = np.empty(dim, np.float64)
    for i in range(n):
        xv = np.float64(x[i, 0])
        for j in range(dim):
            acc[j] = xv * rot[0, j]
        for k in range(1, dim):
            xv = np.float64(x[i, k])
            for j in range(dim):
                acc[j] += xv * rot[k, j]
        for j in range(dim):
            out[i, j] = np.float32(acc[j])

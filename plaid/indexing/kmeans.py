"""Centroids: the centroid-count heuristic, sampling, k-means and nearest-centroid assignment.

Assigning tokens to their nearest centroid dominates build time (every token x every centroid x
dim multiply-adds). With many centroids, :class:`CentroidAssigner` first clusters the centroids
themselves into ~sqrt(C) groups and only compares a token with the centroids of its best groups
(a faiss ``IndexIVFFlat`` over the centroids). On msmarco-5k (393k tokens, 8,192 centroids,
2 cores) that is 2.3x faster than exact search and picks the exact nearest centroid for 98.8%
of tokens (measured with inner-product assignment: mean score loss 0.0013); the k-means loop below uses the same assigner per iteration.
"""
from __future__ import annotations

import math
from typing import Optional

import faiss
import numpy as np
from tqdm.auto import tqdm

__all__ = ["default_num_centroids", "sample_token_ids", "train_centroids", "CentroidAssigner"]

#: Below this many centroids, exact (flat) assignment is used: it is already cheap.
IVF_MIN_CENTROIDS = 2048


def default_num_centroids(num_tokens: int) -> int:
    """PLAID's heuristic ``2**floor(log2(16 * sqrt(num_tokens)))``, kept sensible for small corpora.

    The count is also capped so that every centroid gets at least 8 tokens on average
    (k-means with fewer points per centroid mostly fits noise); never below 1.
    393,138 tokens -> 8,192 centroids; 5M tokens -> 32,768; 1,000 tokens -> 64.
    """
    if num_tokens <= 0:
        raise ValueError("num_tokens must be positive")
    target = min(16.0 * math.sqrt(num_tokens), num_tokens / 8.0)
    if target < 1:
        return 1
    return 1 << int(math.floor(math.log2(target)))


def sample_token_ids(num_tokens: int, n: int, seed: int) -> np.ndarray:
    """``min(n, num_tokens)`` distinct token positions drawn uniformly, sorted (int64)."""
    if n >= num_tokens:
        return np.arange(num_tokens, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_tokens, size=n, replace=False)).astype(np.int64)


class CentroidAssigner:
    """Nearest centroid (L2, i.e. smallest residual) of token vectors.

    centroids: float32 [C, dim]. ``assign(x)`` maps float32 [n, dim] -> int64 [n].
    ``exact=None`` chooses exact search below :data:`IVF_MIN_CENTROIDS` centroids, else an IVF
    over the centroids with ``nlist ~ sqrt(C)`` groups and ``nprobe = nlist / 8`` (at least 8).
    """

    def __init__(self, centroids: np.ndarray, exact: Optional[bool] = None, seed: int = 0):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.centroids = centroids
        C, dim = centroids.shape
        if exact is None:
            exact = C < IVF_MIN_CENTROIDS
        if exact:
            self.index = faiss.IndexFlatL2(dim)
        else:
            nlist = 1 << int(round(math.log2(math.sqrt(C))))
            quantizer = faiss.IndexFlatL2(dim)
            self.index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            self.index.cp.seed = seed
            self.index.cp.niter = 10
            self.index.cp.min_points_per_centroid = 1
            self.index.train(centroids)
            self.index.nprobe = max(8, nlist // 8)
            self._quantizer = quantizer  # keep it alive next to the index
        self.index.add(centroids)

    def assign(self, x: np.ndarray) -> np.ndarray:
        _, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        ids = ids[:, 0]
        if (ids < 0).any():  # every probed group was empty: fall back to exact search
            bad = np.flatnonzero(ids < 0)
            flat = faiss.IndexFlatL2(self.centroids.shape[1])
            flat.add(self.centroids)
            ids[bad] = flat.search(np.ascontiguousarray(x[bad], dtype=np.float32), 1)[1][:, 0]
        return ids


def train_centroids(sample: np.ndarray, num_centroids: int, niter: int, seed: int,
                    show_progress: bool = False) -> np.ndarray:
    """Lloyd's k-means (L2) of float32 ``sample`` [n, dim].

    Initialised with ``num_centroids`` distinct sample points drawn with ``seed``; each iteration
    assigns with :class:`CentroidAssigner` and moves every centroid to the mean of its points;
    an emptied centroid is re-seeded with a random sample point. Returns float32
    [min(num_centroids, n), dim]. Deterministic for a given sample, seed and thread count.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    n, dim = x.shape
    k = min(num_centroids, n)
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    bar = tqdm(range(niter), desc="plaid: k-means", unit="iter", disable=not show_progress)
    for _ in bar:
        a = CentroidAssigner(centroids, seed=seed).assign(x)
        counts = np.bincount(a, minlength=k)
        sums = np.zeros((k, dim), np.float64)
        for lo in range(0, n, 1 << 16):  # per chunk: no second copy of the whole sample
            ac = a[lo : lo + (1 << 16)]
            order = np.argsort(ac, kind="stable")
            cells, starts = np.unique(ac[order], return_index=True)
            sums[cells] += np.add.reduceat(x[lo : lo + (1 << 16)][order], starts, axis=0)
        nonempty = np.flatnonzero(counts)
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            centroids[empty] = x[rng.choice(n, size=len(empty), replace=False)]
    bar.close()
    return centroids

"""Centroids: the centroid-count heuristic, sampling, k-means and nearest-centroid assignment.

Assigning tokens to their nearest centroid dominates build time: exactly, every token costs
``C x dim`` multiply-adds, so with PLAID's ``C ~ 16 sqrt(tokens)`` a build grows as tokens^1.5.
:class:`CentroidAssigner` makes the per-token cost (nearly) independent of ``C``: the centroids
are partitioned into groups of about :data:`GROUP_SIZE` by a small k-means over the centroids
themselves, and a token is compared with the group centres (one dense product) and then, exactly,
with the members of its :data:`PROBE_GROUPS` nearest groups only. The second step is batched by
group: all (token, group) pairs of a chunk that probe one group are scored in one dense product,
so both steps run at matrix-product speed rather than one distance at a time. Everything here is
numpy and faiss, whose thread count is a per-thread setting (``faiss.omp_set_num_threads``), so
encoding workers can run it single-threaded without touching other threads. A token costs
``C / GROUP_SIZE + PROBE_GROUPS x GROUP_SIZE`` distances (1,536 at C = 65,536 instead of
65,536). Measured figures (share of tokens given their exact nearest centroid, recall cost) are
in ``docs/SCALE.md``.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import faiss
import numpy as np
from tqdm.auto import tqdm

__all__ = ["default_num_centroids", "sample_token_ids", "train_centroids", "CentroidAssigner", "assign_all",
           "worker_pool", "single_threaded_worker", "num_workers",
           "APPROX_MIN_CENTROIDS", "GROUP_SIZE", "PROBE_GROUPS", "MAX_DEFAULT_CENTROIDS"]

#: Below this many centroids assignment is exact (faiss flat search): at most 1,024 distances per
#: token, about what the approximate assigner costs anyway.
APPROX_MIN_CENTROIDS = 1 << 11
#: Centroids per group of the approximate assigner (the coarse k-means has C / GROUP_SIZE centres).
GROUP_SIZE = 64
#: Groups whose members a token is compared with. More: closer to exact, linearly dearer.
PROBE_GROUPS = 8
#: From this many group centres (131,072 centroids), the centres are grouped in turn: a token is
#: scored against the centres of the COARSE_PROBE_GROUPS nearest groups of centres only.
GROUPED_CENTRES_MIN = 1 << 11
#: Groups of group centres scanned per token when the centres are grouped.
COARSE_PROBE_GROUPS = 4
#: k-means iterations of the coarse partition (over the centroids, cheap: C x C / GROUP_SIZE).
GROUP_KMEANS_NITER = 8
#: Sample points assigned per step of a k-means iteration.
KMEANS_CHUNK = 1 << 16
#: Tokens per step of grouped search: bounds its per-pair scratch (PROBE_GROUPS x 0.5 KB a token,
#: 32 MB a worker); 2^13 to 2^15 measured within noise of each other at C = 65,536.
GROUPED_BLOCK = 1 << 13
#: The default centroid count is capped here: centroid ids then fit uint16 (2 bytes per token on
#: disk and in the searcher's transposed inverted file instead of 4); see ``docs/SCALE.md``.
MAX_DEFAULT_CENTROIDS = 1 << 16


def num_workers() -> int:
    """Worker threads of the build's parallel steps: torch's thread count (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``), at least 1."""
    import torch  # plaid imports it anyway; not needed at this module's import

    return max(1, int(torch.get_num_threads()))


def single_threaded_worker() -> None:
    """Thread initializer: this thread's faiss kernels (and the OpenMP BLAS faiss calls) run on
    one thread. ``faiss.omp_set_num_threads`` is a per-thread setting: other threads keep theirs.
    (Not ``torch.set_num_threads``: besides the calling thread's count it changes process-wide
    MKL and thread-pool settings, and with them the rounding of other threads' products. The
    build runs no torch kernel in its workers.)"""
    faiss.omp_set_num_threads(1)


def worker_pool(workers: Optional[int] = None) -> ThreadPoolExecutor:
    """A pool of ``workers`` (default :func:`num_workers`) threads running single-threaded kernels.

    Work split into fixed blocks and mapped over such a pool gives the same bytes whatever the
    number of workers: each block is computed the same way by whichever thread runs it.
    """
    return ThreadPoolExecutor(workers or num_workers(), thread_name_prefix="plaid-build",
                              initializer=single_threaded_worker)


def assign_all(assigner: "CentroidAssigner", x: np.ndarray, pool: Optional[ThreadPoolExecutor] = None) -> np.ndarray:
    """``assigner.assign(x)`` in blocks of :data:`KMEANS_CHUNK` rows over a :func:`worker_pool`
    (``pool``, or a new one): int64 [n]. The same result for any number of workers."""
    n = len(x)
    if n <= KMEANS_CHUNK and pool is None:
        with worker_pool(1) as one:
            return one.submit(assigner.assign, x).result()
    own = pool is None
    pool = pool or worker_pool()
    try:
        parts = list(pool.map(assigner.assign, (x[lo : lo + KMEANS_CHUNK] for lo in range(0, n, KMEANS_CHUNK))))
    finally:
        if own:
            pool.shutdown()
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def default_num_centroids(num_tokens: int) -> int:
    """PLAID's heuristic ``2**floor(log2(16 * sqrt(num_tokens)))``, kept sensible for small and
    large corpora.

    The count is capped so that every centroid gets at least 8 tokens on average (k-means with
    fewer points per centroid mostly fits noise), and at :data:`MAX_DEFAULT_CENTROIDS` (uint16
    centroid ids; PLAID's heuristic passes it from 2**26 = 67M tokens); never below 1.
    393,138 tokens -> 8,192 centroids; 5M tokens -> 32,768; 78M tokens -> 65,536; 1,000 -> 64.
    """
    if num_tokens <= 0:
        raise ValueError("num_tokens must be positive")
    target = min(16.0 * math.sqrt(num_tokens), num_tokens / 8.0)
    if target < 1:
        return 1
    return min(1 << int(math.floor(math.log2(target))), MAX_DEFAULT_CENTROIDS)


def sample_token_ids(num_tokens: int, n: int, seed: int) -> np.ndarray:
    """``min(n, num_tokens)`` distinct token positions drawn uniformly, sorted (int64)."""
    if n >= num_tokens:
        return np.arange(num_tokens, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_tokens, size=n, replace=False)).astype(np.int64)


def _exact_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact nearest centroid (L2) of float32 ``x`` [n, dim] among float32 ``centroids`` [C, dim]:
    int64 [n] (faiss flat search)."""
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return flat.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0].astype(np.int64)


class _ExactKNN:
    """The ``k`` nearest of a few points (L2): faiss flat search (a dense product per block of
    queries, then a heap per query)."""

    def __init__(self, points: np.ndarray):
        points = np.ascontiguousarray(points, dtype=np.float32)
        self.index = faiss.IndexFlatL2(points.shape[1])
        self.index.add(points)
        self.cost = len(points)  # distances per query

    def search(self, x: np.ndarray, k: int) -> np.ndarray:
        """float32 [n, dim] -> int64 [n, k], nearest first."""
        return self.index.search(x, k)[1]


class _GroupedKNN:
    """The ``k`` nearest points (L2) among many, through groups of about :data:`GROUP_SIZE`.

    The points are grouped by a k-means over them (each joins its nearest centre); a query is
    matched with the ``probe`` nearest group centres (recursively through groups again when
    there are many centres: :func:`_knn_index`), then scored exactly against those groups'
    members. Scoring is batched by group: every (query, probed group) pair that names one group
    is scored in one dense product (faiss ``knn``). Each query's result depends only on the
    points, the seed and the probe counts, never on the other queries of the call.
    """

    def __init__(self, points: np.ndarray, seed: int, probe: int):
        points = np.ascontiguousarray(points, dtype=np.float32)
        G = len(points) // GROUP_SIZE
        centres = train_centroids(points, G, GROUP_KMEANS_NITER, seed, exact=True)
        group = assign_all(CentroidAssigner(centres, exact=True), points)
        G = len(centres)
        self.probe = int(min(max(1, probe), G))
        self.coarse = _knn_index(centres, seed + 1, COARSE_PROBE_GROUPS, GROUPED_CENTRES_MIN)
        order = np.argsort(group, kind="stable")  # point ids grouped, ascending within a group
        self.ids = order.astype(np.int64)
        self.goffs = np.zeros(G + 1, np.int64)
        np.cumsum(np.bincount(group, minlength=G), out=self.goffs[1:])
        self.members = np.ascontiguousarray(points[order])  # group after group
        self.cost = self.coarse.cost + self.probe * len(points) / G

    def search(self, x: np.ndarray, k: int) -> np.ndarray:
        """float32 [n, dim] -> int64 [n, k] point ids, nearest first (-1 where fewer were scored)."""
        if len(x) > GROUPED_BLOCK:
            return np.concatenate([self.search(x[lo : lo + GROUPED_BLOCK], k) for lo in range(0, len(x), GROUPED_BLOCK)])
        n, p = len(x), self.probe
        probes = self.coarse.search(x, p).reshape(-1)  # [n * p] group of each (query, probe) pair
        order = np.argsort(probes, kind="stable")      # pairs grouped by group
        starts = np.zeros(len(self.goffs), np.int64)
        np.cumsum(np.bincount(probes, minlength=len(self.goffs) - 1), out=starts[1:])
        xg = x[order // p]  # the pairs' queries, group after group: each group's rows are a slice
        best = np.full((n * p, k), np.inf, np.float32)
        where = np.full((n * p, k), -1, np.int64)
        for g in np.flatnonzero(np.diff(starts)).tolist():
            a, b = int(self.goffs[g]), int(self.goffs[g + 1])
            lo, hi = int(starts[g]), int(starts[g + 1])
            if b > a:
                kk = min(k, b - a)
                D, I = faiss.knn(xg[lo:hi], self.members[a:b], kk)
                best[lo:hi, :kk] = D
                where[lo:hi, :kk] = I + a
        # back to (query, probe) order, then per query the k best of its p * k candidates
        # (among equal distances: the nearer group first)
        best_q = np.empty_like(best)
        where_q = np.empty_like(where)
        best_q[order] = best
        where_q[order] = where
        best_q, where_q = best_q.reshape(n, p * k), where_q.reshape(n, p * k)
        if k == 1:
            pick = np.argmin(best_q, axis=1)[:, None]
        else:
            pick = np.argsort(best_q, axis=1, kind="stable")[:, :k]
        pos = np.take_along_axis(where_q, pick, 1)
        found = np.isfinite(np.take_along_axis(best_q, pick, 1)) & (pos >= 0)
        return np.where(found, self.ids[np.maximum(pos, 0)], -1)


def _knn_index(points: np.ndarray, seed: int, probe: int, min_grouped: int):
    """Exact search below ``min_grouped`` points, grouped search from there."""
    if len(points) < min_grouped or len(points) // GROUP_SIZE < 2:
        return _ExactKNN(points)
    return _GroupedKNN(points, seed, probe)


class CentroidAssigner:
    """Nearest centroid (L2, i.e. smallest residual) of token vectors.

    Parameters
    ----------
    centroids : float32 [C, dim]
    exact : bool or None, default None
        True: exact search (faiss flat). False: grouped search (below). None: exact below
        :data:`APPROX_MIN_CENTROIDS` centroids, grouped from there.
    seed : int, default 0
        Seed of the k-means that groups the centroids.
    probe : int, default :data:`PROBE_GROUPS`
        Groups scanned per token (grouped search only).

    ``assign(x)`` maps float32 [n, dim] -> int64 [n]. Grouped search: the centroids are split into
    ``C // GROUP_SIZE`` groups (each centroid joins its nearest centre of a k-means over the
    centroids); a token is matched with the group centres — all of them, or, with
    :data:`GROUPED_CENTRES_MIN` centres or more, those of the :data:`COARSE_PROBE_GROUPS`
    nearest groups of centres — then scored exactly against the members of its ``probe``
    nearest groups, and gets the best of those. ``cost`` is the number of distances computed
    per token (C for exact search). Each token is assigned on its own: the result does not
    depend on how tokens are split into calls, so chunks can be assigned in any order.
    """

    def __init__(self, centroids: np.ndarray, exact: Optional[bool] = None, seed: int = 0,
                 probe: int = PROBE_GROUPS):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.centroids = centroids
        C, dim = centroids.shape
        if exact is None:
            exact = C < APPROX_MIN_CENTROIDS
        self.exact = bool(exact) or C // GROUP_SIZE < 2
        if self.exact:
            self.index = faiss.IndexFlatL2(dim)
            self.index.add(centroids)
            self.cost = float(C)
        else:
            self.knn = _GroupedKNN(centroids, seed, probe)
            self.cost = float(self.knn.cost)

    def assign(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.exact:
            return self.index.search(x, 1)[1][:, 0].astype(np.int64)
        if len(x) == 0:
            return np.zeros(0, np.int64)
        out = self.knn.search(x, 1)[:, 0]
        lost = np.flatnonzero(out < 0)
        if len(lost):  # every probed group was empty (not expected: each centre has members)
            out[lost] = _exact_nearest(x[lost], self.centroids)
        return out


def train_centroids(sample: np.ndarray, num_centroids: int, niter: int, seed: int,
                    show_progress: bool = False, exact: Optional[bool] = None) -> np.ndarray:
    """Lloyd's k-means (L2) of float32 ``sample`` [n, dim].

    Initialised with ``num_centroids`` distinct sample points drawn with ``seed``; each iteration
    assigns with :class:`CentroidAssigner` (``exact`` as there) and moves every centroid to the mean of its points;
    an emptied centroid is re-seeded with a random sample point. Returns float32
    [min(num_centroids, n), dim]. Deterministic for a given sample and seed: the assignments run
    in fixed blocks on single-threaded workers (:func:`assign_all`), the sums in one thread.
    """
    x = np.ascontiguousarray(sample, dtype=np.float32)
    n, dim = x.shape
    k = min(num_centroids, n)
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    bar = tqdm(range(niter), desc="plaid: k-means", unit="iter", disable=not show_progress)
    with worker_pool() as pool:
        for _ in bar:
            a = assign_all(CentroidAssigner(centroids, seed=seed, exact=exact), x, pool)
            counts = np.bincount(a, minlength=k)
            sums = np.zeros((k, dim), np.float64)
            for lo in range(0, n, KMEANS_CHUNK):  # per chunk: no second copy of the whole sample
                ac = a[lo : lo + KMEANS_CHUNK]
                order = np.argsort(ac, kind="stable")
                cells, starts = np.unique(ac[order], return_index=True)
                sums[cells] += np.add.reduceat(x[lo : lo + KMEANS_CHUNK][order], starts, axis=0)
            nonempty = np.flatnonzero(counts)
            centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                centroids[empty] = x[rng.choice(n, size=len(empty), replace=False)]
    bar.close()
    return centroids

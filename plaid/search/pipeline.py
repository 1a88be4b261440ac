"""PLAID's four search stages, their policy written once (Santhanam et al., CIKM 2022).

For each query, with the budgets of :class:`plaid.search.params.Budgets`:

1. :func:`stage1_candidates` — the live documents listed under the ``ncells`` best centroids of
   each query token (ties at the cut kept), ``ncells`` widened (:func:`~plaid.search.params.widen`)
   while there are fewer than ``n2`` of them; restricted to the query's subset, if any;
2. :func:`stage2_prune` — approximate MaxSim from centroid scores alone, counting only the
   centroids that score at least the threshold for some query token (a token with none in a
   document contributes :data:`~plaid.search.params.PRUNED_SCORE`); keeps ``n2``. Pruning never
   decides alone: when fewer than ``n2`` candidates keep a surviving centroid (the others would
   all tie, and the lowest ids would win), the query is pruned at ``min(threshold, floor)``,
   ``floor`` being the lowest score among the cells stage 1 probed, so every candidate keeps the
   centroid it was found through;
3. :func:`stage3_rank` — the same without pruning, over stage 2's survivors; keeps ``n3``;
4. :func:`stage4_exact` — exact MaxSim on the decompressed vectors of the survivors; keeps ``k``.

A subset of at most ``small_subset`` documents skips stages 1-3 (exact within it). Ranks break
ties by the lower document id (:func:`top_n`), in every stage.

The CPU engine runs this sequence for a query without a subset in ONE compiled call
(``engine.search_one``, :func:`plaid.search.kernels_cpu.search_query`): a transcription of
these functions, needed so that a query's work holds no GIL and threads scale; it decides
exactly what they decide (tests/test_pipeline.py compares ids, scores, candidates, survivors,
threshold and ncells with these functions on the same engine). A change of policy here must be
made there too; the torch engine and the numpy fallback run the functions below.

The engines (:mod:`plaid.search.engine_cpu`, :mod:`plaid.search.engine_torch`) provide the
kernels — how a stage is computed — and never decide anything a stage decides. Arrays crossing
this module are numpy: ``R`` float32 [m, C] (one query's centroid scores, token-major), document
ids int64, scores float32.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Tuple

import numpy as np
import torch

from ..codecs import quantize_centroids
from .params import Budgets, widen

__all__ = ["Engine", "QueryScores", "CellCuts", "alive_mask", "scoring_centroids", "scoring_matrix", "Trace", "top_n", "stage1_candidates", "stage2_prune", "stage3_rank",
           "stage4_exact", "search_query", "search_batch", "probed_floor", "surviving"]

Hits = Tuple[np.ndarray, np.ndarray]  # (ids int64 [<= k], scores float32 [<= k]), best first


class Engine(Protocol):
    """The kernels a device provides over one committed generation (see the engine modules)."""

    num_documents: int
    num_centroids: int
    num_live: int
    alive: Optional[np.ndarray]  # bool [N] (None: nothing deleted)

    def centroid_scores(self, Qcat: np.ndarray, pool: Optional[ThreadPoolExecutor] = None,
                        threads: int = 1) -> np.ndarray:
        """float32 [sum_m, dim] query tokens -> float32 [sum_m, C] scores against the centroids
        (an engine may spread the product over ``threads`` tasks of ``pool``)."""

    def candidates(self, S: "QueryScores", cells: np.ndarray) -> np.ndarray:
        """Sorted distinct ids (int64) of the documents listed under ``cells`` (int64, sorted)."""

    def surviving_entries(self, keep: np.ndarray) -> int:
        """Entries of the inverted lists of the centroids in ``keep`` (bool [C])."""

    def pruned_scores(self, S: "QueryScores", keep: np.ndarray, docs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Stage 2: (approximate MaxSim over kept centroids float32 [n], covered bool [n])."""

    def full_scores(self, S: "QueryScores", docs: np.ndarray) -> np.ndarray:
        """Stage 3: approximate MaxSim over every centroid of ``docs``: float32 [n]."""

    def exact_scores(self, q: np.ndarray, docs: np.ndarray, R: Optional[np.ndarray] = None) -> np.ndarray:
        """Stage 4: exact MaxSim of query ``q`` float32 [m, dim] with ``docs``: float32 [n]. ``R``:
        the query's centroid scores [m, C], which an engine may take stage 4's centroid terms
        from (the CPU engine does when they are float32)."""

    # optional: ``independent_rows: bool``, True when a query's row of ``centroid_scores`` does
    # not depend on the other rows of the call (then the pipeline may group queries freely).
    # optional: ``wait_for_kernels()``, returning once kernels that the engine loads in the
    # background are loaded (until then its searches run slower kernels with the same results).
    # optional: ``search_one(q, R, b, trace, pool) -> Optional[Hits]``, all four stages of a query
    # without a subset at once, deciding exactly what this module's stages decide (the CPU
    # engine's compiled transcription of them, checked against them by tests/test_pipeline.py),
    # ``pool`` (or None) holding ``b.threads - 1`` idle workers it may spread the query over;
    # None: run the stages here.


def alive_mask(deleted: np.ndarray, num_documents: int) -> Optional[np.ndarray]:
    """bool [N]: False for deleted documents (never candidates), or None when none is deleted."""
    if not len(deleted):
        return None
    alive = np.ones(num_documents, bool)
    alive[deleted] = False
    return alive


def scoring_centroids(centroids: np.ndarray, normalized: bool,
                      quantized: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
    """What stages 1-3 score query tokens against: (rows int8 [C, dim], factor float32 [C]); a
    query token ``t`` scores ``(t . rows[c]) * factor[c]`` against centroid ``c``.

    The rows are the centroids quantized as the index stores them (int8 and a scale per row,
    :func:`plaid.codecs.quantize_centroids`): for an index whose centroids are stored so, exactly
    the stored rows. ``factor`` is the scale (within a float32 ulp of the stored one), or ``1 / |rows[c]|`` when the index holds unit
    vectors (stages 1-3 then score the unit centroids: cosine, the scale PLAID's thresholds are
    set in). Stage 4's centroid terms are the raw centroids' products: on the CPU engine taken
    from these scores times :func:`centroid_gain` when they are float32. A quarter of a float32
    copy's memory, which a single query's product at 65,536 centroids reads
    (:func:`plaid.search.kernels_cpu.scores_product`). ``quantized``: ``quantize_centroids(centroids)``
    when the caller has it already."""
    q = quantize_centroids(np.asarray(centroids, np.float32)) if quantized is None else quantized
    rows, scales = q["centroids"], q["centroid_scales"]
    if normalized:
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        factor = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
    else:
        factor = scales.astype(np.float32)
    return np.ascontiguousarray(rows), factor


def centroid_gain(centroids: np.ndarray, normalized: bool, quantized: Optional[dict] = None) -> Optional[np.ndarray]:
    """float32 [C]: what turns a query token's stage-1 score of centroid ``c`` (``R[i, c]``, the
    int8 row's product times its factor, :func:`scoring_centroids`) into its product with the raw
    centroid, stage 4's centroid term: the row's scale over its factor (``scale * |row|`` for an
    index of unit vectors, 1 otherwise). The term then equals the float32 product of the raw
    centroid within float32 rounding (~1e-7 relative), and stage 4 reads it from ``R`` instead
    of multiplying the candidates' centroids again. None when the raw centroids are not exactly
    their int8 rows times a scale (centroids stored as float16 or float32), or when a gain would
    not be a finite float32: then stage 4 multiplies them. ``quantized``: as :func:`scoring_centroids`."""
    c = np.asarray(centroids, np.float32)
    q = quantize_centroids(c) if quantized is None else quantized
    rows, scales = q["centroids"], np.asarray(q["centroid_scales"], np.float32)
    if not np.array_equal(rows.astype(np.float32) * scales[:, None], c):
        return None
    if not normalized:
        return np.ones(len(rows), np.float32)
    gain = scales.astype(np.float64) * np.linalg.norm(rows.astype(np.float64), axis=1)
    # |row| reaches 127 * sqrt(dim): a finite centroid's gain can overflow (a hostile scale near
    # float32's largest), where R * gain would give inf or NaN (0 * inf) for a finite product
    if not (np.abs(gain) <= np.finfo(np.float32).max).all():
        return None
    return gain.astype(np.float32)


def scoring_matrix(rows: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """float32 [C, dim]: the scoring centroids ``rows * factor`` (for products that do not apply
    the factor after summing: bfloat16 scores)."""
    return rows.astype(np.float32) * factor[:, None]


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest ``scores``, best first; ties keep the lower index first."""
    if n >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, n - 1)[:n]
    # argpartition breaks ties arbitrarily at the boundary: take every index tied with the n-th
    # score, then order stably so the lowest indices win.
    kth = scores[part].min()
    part = np.flatnonzero(scores >= kth)
    return part[np.argsort(-scores[part], kind="stable")][:n]


class QueryScores:
    """One query's centroid scores ``R`` float32 [m, C] (token-major, contiguous), its
    :class:`CellCuts`, and a cache where an engine keeps tables derived from ``R``."""

    def __init__(self, R: np.ndarray):
        self.R = R
        self.cuts = CellCuts(R)
        self.cache: dict = {}


class CellCuts:
    """The per-token score of the ``ncells``-th best centroid, for a growing ``ncells``.

    R: float32 [m, C] centroid scores. One ``torch.topk`` of at least 16 columns serves every
    ``ncells`` up to its width; torch.topk is an order of magnitude faster than np.partition
    along 8k columns here.
    """

    def __init__(self, R: np.ndarray):
        self.R = R
        self._top: Optional[np.ndarray] = None

    def kth(self, ncells: int) -> np.ndarray:
        """float32 [m]: each query token's ``ncells``-th best centroid score."""
        if ncells == 1:
            return self.R.max(1)
        if self._top is None or self._top.shape[1] < ncells:
            width = min(self.R.shape[1], max(16, 2 * ncells))
            self._top = torch.topk(torch.from_numpy(self.R), width, dim=1, sorted=True).values.numpy()
        return self._top[:, ncells - 1]

    def cells(self, ncells: int) -> np.ndarray:
        """Distinct ids (int64, sorted) of the centroids scoring at least the ``ncells``-th best
        score of some query token. Exact ties at the cut are all kept, so the result does not
        depend on a sort order."""
        C = self.R.shape[1]
        if ncells >= C:
            return np.arange(C)
        kth = self.kth(ncells)
        return np.flatnonzero(np.logical_or.reduce(self.R >= kth[:, None], axis=0))


def surviving(R: np.ndarray, threshold: float) -> np.ndarray:
    """bool [C]: the centroids that score at least ``threshold`` for some query token."""
    return R.max(0) >= threshold


def probed_floor(cuts: CellCuts, ncells: int) -> float:
    """The lowest score among the cells stage 1 probed: the minimum over query tokens of each
    token's ``ncells``-th best centroid score (the lowest score of ``R`` once every cell is
    probed). Every candidate has a centroid scoring at least this for some query token."""
    if ncells >= cuts.R.shape[1]:
        return float(cuts.R.min())
    return float(cuts.kth(int(ncells)).min())


@dataclass
class Trace:
    """What each stage kept for one query (filled when asked for; used by tests and profiles)."""

    candidates: Optional[np.ndarray] = None  # int64, sorted
    ncells: int = 0                          # after widening
    threshold: float = float("nan")          # after the fallback
    stage2: Optional[np.ndarray] = None      # int64 ids, sorted
    stage3: Optional[np.ndarray] = None      # int64 ids, sorted
    timings: dict = field(default_factory=dict)  # seconds per stage: the pipeline's own timers


def stage1_candidates(engine: Engine, S: QueryScores, b: Budgets, subset: Optional[np.ndarray],
                      ncells: int) -> Tuple[np.ndarray, int]:
    """Stage 1: (live candidate ids int64 sorted, the final ncells). ``subset``: sorted live ids."""
    nc = ncells
    while True:
        docs = engine.candidates(S, S.cuts.cells(nc))
        if engine.alive is not None:
            docs = docs[engine.alive[docs]]
        if subset is not None:
            docs = docs[np.isin(docs, subset, assume_unique=True)]
        if len(docs) >= b.n2 or nc >= engine.num_centroids:
            return docs, nc
        nc = widen(nc, engine.num_centroids)


def stage2_prune(engine: Engine, S: QueryScores, docs: np.ndarray, b: Budgets,
                 ncells: int) -> Tuple[np.ndarray, float]:
    """Stage 2: (indices into ``docs`` of the ``n2`` best by pruned approximate MaxSim, sorted;
    the threshold used). A no-op (every index) when there are at most ``n2`` candidates."""
    if len(docs) <= b.n2:
        return np.arange(len(docs)), b.threshold
    threshold = b.threshold
    keep = surviving(S.R, threshold)
    listed = engine.surviving_entries(keep)  # an upper bound of the covered candidates
    approx = None
    if listed >= b.n2:
        approx, covered = engine.pruned_scores(S, keep, docs)
        n_covered = int(covered.sum())
    else:
        n_covered = listed
    if n_covered < b.n2:  # the fallback: pruning never decides alone
        threshold = min(threshold, probed_floor(S.cuts, ncells))
        if threshold < b.threshold or approx is None:
            approx, _ = engine.pruned_scores(S, surviving(S.R, threshold), docs)
    return np.sort(top_n(approx, b.n2)), threshold


def stage3_rank(engine: Engine, S: QueryScores, docs: np.ndarray, sel: np.ndarray, b: Budgets) -> np.ndarray:
    """Stage 3: the ``n3`` of ``docs[sel]`` best by approximate MaxSim over all their centroids
    (indices into ``docs``, sorted). A no-op when ``sel`` holds at most ``n3``."""
    if len(sel) <= b.n3:
        return sel
    approx = engine.full_scores(S, docs[sel])
    return sel[np.sort(top_n(approx, b.n3))]


def stage4_exact(engine: Engine, q: np.ndarray, docs: np.ndarray, k: int, R: Optional[np.ndarray] = None) -> Hits:
    """Stage 4: the ``k`` best of ``docs`` (sorted, non-empty, live) by exact MaxSim (``R``: the
    query's centroid scores, see :meth:`Engine.exact_scores`)."""
    if len(docs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    exact = engine.exact_scores(q, docs, R)
    top = top_n(exact, k)
    return docs[top], exact[top]


def scaled_ncells(ncells: int, subset_size: int, num_live: int, num_centroids: int) -> int:
    """More cells for a selective subset, so that about as many candidates fall inside it."""
    live = max(1, num_live)
    return int(min(num_centroids, max(ncells, -(-ncells * live // max(1, subset_size)))))


def search_query(engine: Engine, q: np.ndarray, R: np.ndarray, b: Budgets, subset: Optional[np.ndarray] = None,
                 trace: Optional[Trace] = None, pool: Optional[ThreadPoolExecutor] = None) -> Hits:
    """All four stages for one query. q: float32 [m, dim]; R: float32 [m, C] its centroid scores;
    subset: sorted live non-empty ids the results must come from, or None; pool: idle workers
    (``b.threads - 1``) the engine's ``search_one`` may spread this query over, or None."""
    nc = b.ncells
    if subset is not None:
        if len(subset) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(subset) <= b.small_subset:  # small subset: exact within it
            return stage4_exact(engine, q, subset, b.k, R)
        nc = scaled_ncells(nc, len(subset), engine.num_live, engine.num_centroids)
    else:
        one = getattr(engine, "search_one", None)  # the same stages compiled into one call
        hits = (one(q, R, b, trace) if pool is None else one(q, R, b, trace, pool)) if one is not None else None
        if hits is not None:
            return hits
    clock = time.perf_counter
    t0 = clock()
    S = QueryScores(R)
    docs, nc = stage1_candidates(engine, S, b, subset, nc)
    if len(docs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    t1 = clock()
    sel, threshold = stage2_prune(engine, S, docs, b, nc)
    t2 = clock()
    sel3 = stage3_rank(engine, S, docs, sel, b)
    t3 = clock()
    hits = stage4_exact(engine, q, docs[sel3], b.k, R)
    if trace is not None:
        trace.candidates, trace.ncells, trace.threshold = docs, nc, threshold
        trace.stage2, trace.stage3 = docs[sel], docs[sel3]
        trace.timings.update(stage1_candidates=t1 - t0, stage2_prune=t2 - t1, stage3_rank=t3 - t2,
                             stage4_exact=clock() - t3)
    return hits


#: Queries a search thread takes at a time (their product is one call, their stages another): a
#: 7-token query's product alone reads every centroid for 7 rows; eight share that read (parts of 4, 8
#: and 16 measured 1.57x, 1.72x and 1.69x the one-thread throughput with two threads on msmarco-5k).
THREAD_CHUNK = 8
#: ... or fewer, so that each thread gets at least this many parts (a batch of fewer than
#: threads * 32 queries: parts of ceil(n / (4 * threads))): 50 queries in parts of 8 left one
#: thread a part alone at the end. Each thread holds its part's scores: 8 x m x C float32, 64 MiB
#: for 32-token queries at 65,536 centroids.
PARTS_PER_THREAD = 4


#: A call of more queries than this waits for an engine's compiled kernels still loading in the
#: background (the CPU engine's, for ~0.5-1 s after opening an index with numba's cache warm,
#: ~20 s cold), which its queries amortise; a call of one query does not wait and runs the
#: engine's other kernels meanwhile (the same results): a service answers its first query at
#: once. 1,000 queries in one call right after opening msmarco-5k's index took 0.6-1.0 s longer
#: than later when waiting, 0.8-2.0 s when not (numba's loading and the numpy kernels then
#: contend for the GIL).
WAIT_FOR_KERNELS_ABOVE = 1


def search_batch(engine: Engine, queries: List[np.ndarray], b: Budgets,
                 subsets: Optional[List[np.ndarray]] = None, traces: Optional[List[Trace]] = None,
                 pool: Optional[ThreadPoolExecutor] = None, batch_size: int = 32) -> List[Hits]:
    """Every query of a call. Returns one ``Hits`` per query; a query's results do not depend
    on the others or on the threads.

    Several queries with a ``pool`` and an engine whose product rows do not depend on the other
    rows of the call (``independent_rows``: the compiled CPU product): ``b.threads`` tasks, each
    taking the next :data:`THREAD_CHUNK` queries and running their product and stages (where the
    engine's ``search_many`` applies: the byte tables in Python, then one compiled call that
    releases the GIL for the part): no thread waits for a batch-wide product or for
    the end of a batch, and a query's scores are still in its core's cache when its stages read
    them. Otherwise, by batches of ``batch_size`` queries (it bounds the scores' memory): one
    product per batch (spread over the pool's threads where it is large: a single query at a
    million documents), then each query's stages, in ``b.threads`` tasks of ``pool`` when given
    (without a pool: the engine's ``search_many`` for the batch where it applies)."""
    n = len(queries)
    wait = getattr(engine, "wait_for_kernels", None)
    if wait is not None and n > WAIT_FOR_KERNELS_ABOVE:
        wait()
    if pool is not None and n > 1 and getattr(engine, "independent_rows", False):
        return _threaded_parts(engine, queries, b, subsets, traces, pool)
    out: List[Hits] = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        out += _batch(engine, queries[lo:hi], b, None if subsets is None else subsets[lo:hi],
                      None if traces is None else traces[lo:hi], pool)
    return out


def _product(engine: Engine, queries: List[np.ndarray], traces: Optional[List[Trace]],
             pool: Optional[ThreadPoolExecutor] = None, threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """One query-centroid product for ``queries``: (R float32 [sum m, C], starts int64 [n + 1],
    query i's rows ``starts[i]:starts[i + 1]``); its time shared out to ``traces`` by tokens."""
    starts = np.concatenate([[0], np.cumsum([len(q) for q in queries])]).astype(np.int64)
    t0 = time.perf_counter()
    R = engine.centroid_scores(np.concatenate(queries), pool, threads)
    if traces is not None:
        dt = time.perf_counter() - t0
        for q, t in zip(queries, traces):
            t.timings["centroid_scores"] = dt * len(q) / int(starts[-1])
    return R, starts


def _stages(engine: Engine, queries: List[np.ndarray], b: Budgets, subsets: Optional[List[np.ndarray]],
            traces: Optional[List[Trace]], R: np.ndarray, starts: np.ndarray, i: int,
            pool: Optional[ThreadPoolExecutor] = None) -> Hits:
    """:func:`search_query` of query ``i`` of a group whose product is ``R`` (:func:`_product`);
    ``pool``: idle workers the query may use (only when no other query runs meanwhile)."""
    return search_query(engine, queries[i], R[starts[i] : starts[i + 1]], b,
                        None if subsets is None else subsets[i], None if traces is None else traces[i], pool)


def _batch(engine: Engine, queries: List[np.ndarray], b: Budgets, subsets: Optional[List[np.ndarray]],
           traces: Optional[List[Trace]], pool: Optional[ThreadPoolExecutor]) -> List[Hits]:
    """One batch: one product, then each query's stages (see :func:`search_batch`)."""
    n = len(queries)
    if pool is None and traces is None and subsets is None and hasattr(engine, "search_many"):
        hits = engine.search_many(queries, b)
        if hits is not None:
            return hits
    R, starts = _product(engine, queries, traces, pool, b.threads)
    if n == 1:  # one query: it may spread its stages over the pool's idle workers too
        return [_stages(engine, queries, b, subsets, traces, R, starts, 0, pool)]
    if pool is None:
        return [_stages(engine, queries, b, subsets, traces, R, starts, i) for i in range(n)]
    return _in_tasks(pool, b.threads, n, lambda i: [_stages(engine, queries, b, subsets, traces, R, starts, i)], 1)


def _threaded_parts(engine: Engine, queries: List[np.ndarray], b: Budgets, subsets: Optional[List[np.ndarray]],
                    traces: Optional[List[Trace]], pool: ThreadPoolExecutor) -> List[Hits]:
    """Parts of :data:`THREAD_CHUNK` queries, each part's product and stages in one task at a time."""
    n = len(queries)
    step = max(1, min(THREAD_CHUNK, -(-n // (PARTS_PER_THREAD * b.threads))))
    compiled = traces is None and subsets is None and hasattr(engine, "search_many")

    def part(lo: int) -> List[Hits]:
        hi = min(n, lo + step)
        if compiled:
            hits = engine.search_many(queries[lo:hi], b)
            if hits is not None:
                return hits
        qs, sub, tr = queries[lo:hi], None if subsets is None else subsets[lo:hi], None if traces is None else traces[lo:hi]
        R, starts = _product(engine, qs, tr)
        return [_stages(engine, qs, b, sub, tr, R, starts, i) for i in range(len(qs))]

    return _in_tasks(pool, b.threads, n, part, step)


def _in_tasks(pool: ThreadPoolExecutor, threads: int, n: int, part, step: int) -> list:
    """``part(lo)`` (a list of ``min(step, n - lo)`` results) for every ``lo`` in ``range(0, n,
    step)``, in ``threads`` tasks of ``pool`` that each take the next ``lo`` until none is left (a
    task per part cost a queue hand-off and two context switches each); results in order."""
    out: list = [None] * n
    order = iter(range(0, n, step))  # next() on it holds the GIL: each part is taken once
    stop = []  # non-empty once a task failed or the caller stopped waiting: take no more parts

    def worker() -> None:
        try:
            for lo in order:
                if stop:
                    return
                out[lo : lo + step] = part(lo)
        except BaseException:
            stop.append(True)
            raise

    tasks = [pool.submit(worker) for _ in range(min(threads, -(-n // step)))]
    try:
        for t in tasks:
            t.result()
    finally:  # an exception here or in a task (or an interrupt): the other tasks end after their part
        stop.append(True)
    return out

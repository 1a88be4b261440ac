"""FROZEN REFERENCE (tests only): a copy of plaid.search.stages as it was before the one-pipeline
rewrite, used by tests/reference_search.py to check that the new pipeline returns the same results.

PLAID's four search stages for one query on the CPU (numpy), after Santhanam et al., CIKM 2022.

1. :func:`candidates` — the documents listed under the ``ncells`` best centroids of each query
   token, from the centroid scores ``R = Q·Cᵀ``;
2. :func:`pruned_maxsim` (or :func:`approximate_maxsim` over :func:`pruned_cells`) —
   approximate MaxSim from centroid scores alone, counting only centroids that score ≥
   ``centroid_score_threshold`` for some query token (a query token with no such centroid in a
   document contributes :data:`PRUNED_SCORE`). Pruning never decides alone: when fewer
   candidates keep a surviving centroid than stage 2 keeps, the threshold drops to
   :func:`probed_floor` (the fallback, see :func:`fallback_threshold`);
3. the same without pruning, over stage 2's survivors only;
4. :func:`maxsim_scores` over :func:`adc_scores` — exact MaxSim on the decompressed vectors of
   the survivors, computed without decompressing them (below).

Stages 2-3 read each document's *distinct* centroids (:func:`doc_cells`, the transpose of the
inverted file) rather than its tokens' centroids: MaxSim over centroid scores depends only on
that set, and it is half as long (0.50 entries per token on msmarco-5k).

Stage 4 scores a token ``x̂ = (c + r) / ‖c + r‖`` against the query as
``(<q, c> + <q, r>) / ‖c + r‖``: ``<q, c>`` is the token's centroid score, ``<q, r>`` a sum of
``code_bytes`` entries of the codec's per-query table (asymmetric distance computation, one
``embedding_bag`` call), and ``‖c + r‖`` is stored at indexing time. No vector is decoded
(measured 4x faster than decoding + a product for the 5.6k tokens of 64 documents).

Every function is vectorised over documents and tokens (no Python loop over either). The
matrix products are done with torch by the caller: mixing numpy's multi-threaded BLAS with
torch's thread pool in one process costs milliseconds per switch on 2 cores (measured again:
8.2 ms per query instead of 1.8 with Q·Cᵀ in numpy), so this module does none. (The codecs'
tiny stacked per-query tables use ``np.matmul``: single-threaded at that size, and measured
faster than ``torch.bmm``.) Centroid
scores are token-major, ``R`` [m, C] (per-token best cells, the pruning mask: reductions along
contiguous rows are ~30x faster than across columns), and gathered from ``Re`` [m, C + 1], ``R``
with a last column of :data:`PRUNED_SCORE` where pruned centroids point.
:mod:`plaid.search.stages_torch` has the same stages batched over queries in torch (GPU path).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PRUNED_SCORE", "expand_ranges", "top_n", "CellCuts", "best_cells", "candidates", "doc_cells", "centroid_table",
           "document_cells", "surviving", "pruned_cells", "covered_documents", "approximate_maxsim", "pruned_maxsim",
           "probed_floor", "fallback_threshold", "adc_scores", "maxsim_scores"]

#: Contribution of a query token none of whose document centroids survives pruning (as PLAID).
PRUNED_SCORE = -9999.0


def expand_ranges(starts: np.ndarray, lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate ``range(starts[i], starts[i] + lens[i])`` for all i.

    starts, lens: int64 [n]. Returns (positions int64 [sum(lens)], offsets int64 [n + 1]);
    segment i is ``positions[offsets[i]:offsets[i + 1]]``.
    """
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    positions = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
    return positions, offsets


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


def segment_max_sum(vals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``sum_i max_{rows r in segment} vals[r, i]`` for each segment; vals float32 [t, m],
    offsets int64 [n + 1] of non-empty segments. Returns float32 [n]."""
    return np.maximum.reduceat(vals, offsets[:-1], axis=0).sum(1, dtype=np.float32)


class CellCuts:
    """The per-token score of the ``ncells``-th best centroid, for growing ``ncells``.

    R: float32 [m, C] centroid scores. One ``torch.topk`` of at least 16 columns serves every
    ``ncells`` up to its width (the searcher probes more cells for queries with few candidates);
    torch.topk is an order of magnitude faster than np.partition along 8k columns here.
    """

    def __init__(self, R: np.ndarray):
        self.R = R
        self._top: np.ndarray | None = None

    def kth(self, ncells: int) -> np.ndarray:
        """float32 [m]: each query token's ``ncells``-th best centroid score."""
        if ncells == 1:
            return self.R.max(1)
        if self._top is None or self._top.shape[1] < ncells:
            width = min(self.R.shape[1], max(16, 2 * ncells))
            self._top = torch.topk(torch.from_numpy(self.R), width, dim=1, sorted=True).values.numpy()
        return self._top[:, ncells - 1]


def best_cells(R: np.ndarray, ncells: int, cuts: CellCuts | None = None) -> np.ndarray:
    """Distinct ids of the centroids scoring at least the ``ncells``-th best score of some query
    token, sorted.

    R: float32 [m, C] centroid scores, one contiguous row per query token; ``cuts``: a
    :class:`CellCuts` of ``R`` to reuse across calls. Exact ties at the cut are all kept (a few
    extra cells when bfloat16 rounding makes scores tie), so the result does not depend on a
    sort order and both engines probe the same cells.
    """
    C = R.shape[1]
    if ncells >= C:
        return np.arange(C)
    kth = (cuts or CellCuts(R)).kth(ncells)
    return np.flatnonzero(np.logical_or.reduce(R >= kth[:, None], axis=0))


def candidates(R: np.ndarray, ncells: int, ivf: np.ndarray, ivf_offsets: np.ndarray,
               cuts: CellCuts | None = None, mark: np.ndarray | None = None) -> np.ndarray:
    """Stage 1: sorted distinct ids of the documents in the ``ncells`` best centroids of each token.

    R: float32 [m, C] centroid scores (token-major); ivf: int32 [P] document ids grouped by
    centroid, ivf_offsets: int64 [C + 1]; cuts: see :func:`best_cells`; mark: optional bool [N]
    scratch, all False (left all False), which replaces a sort by a scan of N flags when the
    lists are long enough to pay for it. Returns int64 [n_candidates].
    """
    cells = best_cells(R, ncells, cuts)
    starts = ivf_offsets[cells]
    pos, _ = expand_ranges(starts, ivf_offsets[cells + 1] - starts)
    listed = ivf[pos]
    if mark is None or len(mark) > 64 * len(listed):
        return np.unique(listed).astype(np.int64)
    try:
        mark[listed] = True
        return np.flatnonzero(mark)
    finally:
        mark[listed] = False


def doc_cells(ivf: np.ndarray, ivf_offsets: np.ndarray, num_documents: int) -> Tuple[np.ndarray, np.ndarray]:
    """Transpose of the inverted file: the distinct centroids of every document, ascending.

    ivf: int32 [P] documents grouped by centroid; ivf_offsets: int64 [C + 1]. Returns
    (cells int32 [P], offsets int64 [num_documents + 1]); document d's centroids are
    ``cells[offsets[d]:offsets[d + 1]]`` (empty for empty documents).
    """
    C = len(ivf_offsets) - 1
    order = np.argsort(ivf, kind="stable")  # ivf is ascending within each cell: runs merge fast
    cells = np.repeat(np.arange(C, dtype=np.int32), np.diff(ivf_offsets))[order]
    offsets = np.zeros(num_documents + 1, np.int64)
    np.cumsum(np.bincount(ivf, minlength=num_documents), out=offsets[1:])
    return cells, offsets


def centroid_table(R: np.ndarray) -> np.ndarray:
    """Scores for gathering: float32 [m, C + 1] = ``R`` plus a last column of
    :data:`PRUNED_SCORE` (index ``C``, where :func:`pruned_cells` sends pruned centroids)."""
    m, C = R.shape
    Re = np.empty((m, C + 1), np.float32)
    Re[:, :C] = R
    Re[:, C] = PRUNED_SCORE
    return Re


def document_cells(docs: np.ndarray, cells: np.ndarray, offsets: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct centroids of ``docs`` (input of stages 2 and 3).

    docs: int64 [n] non-empty documents; cells, offsets: from :func:`doc_cells`. Returns
    (offsets int64 [n + 1] delimiting each document's entries, centroid ids int32 [e]).
    """
    starts = offsets[docs]
    pos, offs = expand_ranges(starts, offsets[docs + 1] - starts)
    return offs, cells[pos]


def surviving(R: np.ndarray, threshold: float) -> np.ndarray:
    """bool [C]: the centroids that score at least ``threshold`` for some query token (stage 2
    counts only these). R: float32 [m, C]."""
    return R.max(0) >= threshold


def pruned_cells(cells: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Stage 2's pruning on the document side: ``cells`` with every centroid not in ``keep``
    (:func:`surviving`) replaced by ``C`` (the :data:`PRUNED_SCORE` column of
    :func:`centroid_table`)."""
    return np.where(keep[cells], cells, np.int32(len(keep)))


def covered_documents(cells: np.ndarray, keep: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """bool [n]: the documents that keep at least one centroid through stage 2's pruning.

    cells, offsets: the documents' distinct centroids from :func:`document_cells` (non-empty
    documents); keep: bool [C] from :func:`surviving`. A document that is not covered scores
    ``m * PRUNED_SCORE`` in stage 2, a tie with every other uncovered one.
    """
    return np.logical_or.reduceat(keep[cells], offsets[:-1]) if len(cells) else np.zeros(len(offsets) - 1, bool)


def approximate_maxsim(Re: np.ndarray, cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stages 2-3: per-document sum over query tokens of the best centroid score.

    Re: float32 [m, C + 1] from :func:`centroid_table`; cells, offsets: the documents' centroids
    from :func:`document_cells` (or :func:`pruned_cells`). Returns float32 [n]. Gathers and
    reduces along contiguous rows, one per query token (faster than a [e, m] layout here).
    """
    vals = Re.take(cells, axis=1)  # [m, e]
    return np.maximum.reduceat(vals, offsets[:-1], axis=1).sum(0, dtype=np.float32)


def pruned_maxsim(keep: np.ndarray, Re: np.ndarray, docs: np.ndarray, ivf: np.ndarray, ivf_offsets: np.ndarray,
                  cell_counts: np.ndarray, slot: np.ndarray, return_covered: bool = False):
    """Stage 2 from the inverted file's side: the same scores as :func:`approximate_maxsim` over
    :func:`pruned_cells`, reading only the lists of the centroids that survive pruning.

    A centroid below the threshold for every query token contributes nothing, so a document's
    pruned score depends only on the surviving centroids it has; those are few (4.8% of the
    candidates' (centroid, document) entries on a 50k-document corpus at threshold 0.5: 5x
    faster than the document side there), and their inverted lists name their documents.
    keep: bool [C] from :func:`surviving`; Re: from :func:`centroid_table`; docs: int64 [n]
    sorted candidates; cell_counts: int64 [n], each candidate's number of distinct centroids;
    slot: int32 [N] scratch, all -1 (left all -1). Returns float32 [n]; with ``return_covered``,
    also bool [n], :func:`covered_documents` (the candidates listed under a surviving centroid).
    """
    kept = np.flatnonzero(keep)
    starts = ivf_offsets[kept]
    lens = ivf_offsets[kept + 1] - starts
    pos, _ = expand_ranges(starts, lens)
    try:
        slot[docs] = np.arange(len(docs), dtype=np.int32)
        where = slot[ivf[pos]]  # candidate index of each (surviving centroid, document) entry, or -1
    finally:
        slot[docs] = -1
    hit = where >= 0
    where = where[hit]
    m = Re.shape[0]
    vals = Re.take(np.repeat(kept, lens)[hit], axis=1)  # [m, e]
    best = torch.full((m, len(docs)), -np.inf)
    best.scatter_reduce_(1, torch.from_numpy(where.astype(np.int64)).expand(m, -1), torch.from_numpy(vals),
                         reduce="amax")
    best = best.numpy()
    # a document with a pruned centroid scores at least PRUNED_SCORE per token, as on the other side
    listed = np.bincount(where, minlength=len(docs))
    some_pruned = listed < cell_counts
    np.maximum(best, np.float32(PRUNED_SCORE), out=best, where=some_pruned[None, :])
    scores = best.sum(0, dtype=np.float32)  # the same reduction as approximate_maxsim's
    return (scores, listed > 0) if return_covered else scores


def probed_floor(cuts: CellCuts, ncells: int) -> float:
    """The lowest score among the cells stage 1 probed: the minimum over query tokens of each
    token's ``ncells``-th best centroid score (``ncells`` capped at C: then the lowest score of
    ``R``). Every candidate of :func:`candidates` has a centroid scoring at least this for some
    query token (the one it was found through), so none is pruned away at this threshold."""
    if ncells >= cuts.R.shape[1]:  # every cell probed (the value topk would give, without its cost)
        return float(cuts.R.min())
    return float(cuts.kth(int(ncells)).min())


def fallback_threshold(threshold: float, covered: int, n_keep: int, floor: float) -> float:
    """Stage 2's pruning threshold for one query, after the fallback.

    ``covered``: the number of candidates that keep at least one centroid at ``threshold``
    (:func:`covered_documents`; an upper bound below ``n_keep`` decides the same); ``n_keep``: how many stage 2 keeps, ``min(len(candidates),
    max(ndocs, k))``; ``floor``: :func:`probed_floor`. When fewer than ``n_keep`` candidates are
    covered, the uncovered ones would all tie at ``m * PRUNED_SCORE`` and the lowest document
    ids would fill the rest, whatever their tokens: the threshold drops to ``min(threshold,
    floor)``, so every candidate keeps the centroid it was found through and stage 2 ranks
    them all by approximate MaxSim. Otherwise ``threshold`` is returned unchanged.
    """
    return min(threshold, floor) if covered < n_keep else threshold


def adc_scores(table: torch.Tensor, residual_codes: np.ndarray) -> np.ndarray:
    """``<q_i, decoded residual of token t>`` for every token and query token, without decoding.

    table: float32 [code_bytes * 256, m] from the codec's ``score_table``; residual_codes: uint8
    [t, code_bytes]. Returns float32 [t, m] (one fused gather-and-sum: ``embedding_bag``).
    """
    B = residual_codes.shape[1]
    idx = torch.from_numpy(residual_codes).to(torch.int32)  # torch: 4x faster than numpy's casting add
    idx += torch.arange(0, 256 * B, 256, dtype=torch.int32)
    return F.embedding_bag(idx, table, mode="sum").numpy()


def maxsim_scores(sims: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stage 4: exact MaxSim per document from token-query similarities.

    sims: float32 [t, m] = decompressed document tokens · query tokens; offsets: int64 [n + 1]
    delimiting each (non-empty) document's tokens. Returns float32 [n].
    """
    return segment_max_sum(sims, offsets)

"""The numpy kernels of the CPU engine (:mod:`plaid.search.engine_cpu`), after PLAID
(Santhanam et al., CIKM 2022). What each stage keeps is decided in :mod:`plaid.search.pipeline`.

* stage 1: the documents listed under the probed cells (the engine, over the inverted file);
* stages 2-3: :func:`approximate_maxsim` — per document, the sum over query tokens of the best
  score among its distinct centroids (:func:`doc_cells`, the transpose of the inverted file:
  MaxSim over centroid scores depends only on that set, half as long as the tokens: 0.50 entries
  per token on msmarco-5k); with pruning, centroids not kept read :data:`PRUNED_SCORE`
  (:func:`pruned_cells`), or :func:`pruned_maxsim` reads only the kept centroids' inverted lists
  (identical scores; 4.8% of the entries at threshold 0.5 on 50k documents);
* stage 4: :func:`maxsim_scores` over :func:`adc_scores` — a token ``x̂ = (c + r) / ‖c + r‖``
  scores ``(<q, c> + <q, r>) / ‖c + r‖`` against the query: ``<q, c>`` is its centroid's score,
  ``<q, r>`` a sum of ``code_bytes`` entries of the codec's per-query table (asymmetric distance
  computation, one ``embedding_bag`` call), ``‖c + r‖`` is stored at indexing time. No vector
  is decoded (measured 4x faster than decoding + a product for the 5.6k tokens of 64 documents).

Every function is vectorised over documents and tokens. The matrix products are done with torch
by the engine: mixing numpy's multi-threaded BLAS with torch's thread pool costs milliseconds per
switch on 2 cores (8.2 ms per query instead of 1.8 with Q·Cᵀ in numpy). Centroid scores are
token-major, ``R`` [m, C], gathered from ``Re`` [m, C + 1] (``R`` with a last column of
:data:`PRUNED_SCORE`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .params import PRUNED_SCORE

__all__ = ["PRUNED_SCORE", "expand_ranges", "segment_max_sum", "doc_cells", "split_ids", "list_entries",
           "centroid_table", "document_cells", "pruned_cells", "covered_documents", "approximate_maxsim",
           "pruned_maxsim", "adc_scores", "maxsim_scores"]


def expand_ranges(starts: np.ndarray, lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate ``range(starts[i], starts[i] + lens[i])`` for all i.

    starts, lens: int64 [n]. Returns (positions int64 [sum(lens)], offsets int64 [n + 1]);
    segment i is ``positions[offsets[i]:offsets[i + 1]]``.
    """
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    positions = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
    return positions, offsets


def segment_max_sum(vals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``sum_i max_{rows r in segment} vals[r, i]`` for each segment; vals float32 [t, m],
    offsets int64 [n + 1] of non-empty segments. Returns float32 [n]."""
    return np.maximum.reduceat(vals, offsets[:-1], axis=0).sum(1, dtype=np.float32)


#: Inverted-file entries transposed per step by :func:`doc_cells` (bounds its scratch memory:
#: ~20 bytes an entry, instead of a sort of the whole inverted file).
TRANSPOSE_BLOCK = 1 << 20
#: Centroid ids fit uint16 up to this many centroids (the store's bound for uint16 codes).
NARROW_CELLS_MAX = 1 << 16


def doc_cells(ivf: np.ndarray, ivf_offsets: np.ndarray, num_documents: int,
              narrow: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Transpose of the inverted file: the distinct centroids of every document, ascending.

    ivf: int32 [P] documents grouped by centroid; ivf_offsets: int64 [C + 1]. Returns
    (cells [P], offsets int64 [num_documents + 1]); document d's centroids are
    ``cells[offsets[d]:offsets[d + 1]]`` (empty for empty documents). ``cells`` is int32, or
    uint16 when ``narrow`` and C <= 65,536 (half the memory: the transposed file is, with ``ivf``,
    the largest thing a searcher holds). A stable counting sort by document, block by block: its
    scratch is bounded by :data:`TRANSPOSE_BLOCK`, not by P.
    """
    C = len(ivf_offsets) - 1
    dtype = np.uint16 if narrow and C <= NARROW_CELLS_MAX else np.int32
    counts = np.bincount(ivf, minlength=num_documents)
    offsets = np.zeros(num_documents + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    cells = np.empty(len(ivf), dtype)
    fill = offsets[:-1].copy()
    for lo in range(0, len(ivf), TRANSPOSE_BLOCK):
        hi = min(lo + TRANSPOSE_BLOCK, len(ivf))
        d = ivf[lo:hi]
        order, dest = _scatter(d, fill)  # by document, cells ascending within one
        cells[dest] = _cell_of(ivf_offsets, lo, hi)[order]
    return cells, offsets


def _scatter(key: np.ndarray, fill: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One block of a stable counting sort: (order int64 [n]: the block's entries by ``key``,
    stably; dest int64 [n]: where each goes), ``fill`` (int64, the next free position per key)
    advanced past them."""
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    runs = np.diff(np.append(first, len(ks)))
    dest = fill[ks] + (np.arange(len(ks)) - np.repeat(first, runs))
    fill[ks[first]] += runs
    return order, dest


#: Documents per block of :func:`split_ids`: ids within a block fit 16 bits.
ID_BLOCK = 1 << 16


def split_ids(ivf: np.ndarray, ivf_offsets: np.ndarray, num_documents: int) -> Tuple[np.ndarray, np.ndarray]:
    """The inverted file as the CPU engine holds it: document ids in 16 bits (half of int32).

    ivf: int32 [P] documents (ids < num_documents, checked by the store) grouped by centroid;
    ivf_offsets: int64 [C + 1]. Returns (low uint16
    [P], blocks int64 [C * H + 1]), H = ceil(num_documents / 65,536) (at least 1): entries
    ``blocks[c * H + h]:blocks[c * H + h + 1]`` are centroid c's documents of block h, each
    ``h * 65536 + low[p]``; ``blocks[c * H] == ivf_offsets[c]``, so list c keeps its positions
    (with one block, ``blocks`` equals ``ivf_offsets`` and ``low`` the ids). A list's documents
    are ascending as written, hence already grouped by block; a list that is not (a file not
    written so) is regrouped, each block's documents in their order, which changes no score.
    Works through :data:`TRANSPOSE_BLOCK` entries at a time (bounded scratch).
    """
    C = len(ivf_offsets) - 1
    H = max(1, -(-int(num_documents) // ID_BLOCK))
    P = len(ivf)
    low = np.empty(P, np.uint16)
    if H == 1:
        low[:] = ivf
        return low, np.ascontiguousarray(ivf_offsets, np.int64).copy()
    counts = np.zeros(C * H, np.int64)
    grouped, last = True, -1
    spans = []
    for lo in range(0, P, TRANSPOSE_BLOCK):
        hi = min(lo + TRANSPOSE_BLOCK, P)
        d = np.asarray(ivf[lo:hi], np.int64)
        key = _cell_of(ivf_offsets, lo, hi) * H + (d >> 16)
        counts += np.bincount(key, minlength=C * H)
        if grouped and (key[0] < last or bool((key[1:] < key[:-1]).any())):
            grouped = False
        last = int(key[-1])
        low[lo:hi] = d & 0xFFFF
        spans.append((lo, hi))
    blocks = np.zeros(C * H + 1, np.int64)
    np.cumsum(counts, out=blocks[1:])
    if not grouped:  # a stable counting sort by (centroid, block), as doc_cells sorts by document
        fill = blocks[:-1].copy()
        for lo, hi in spans:
            d = np.asarray(ivf[lo:hi], np.int64)
            order, dest = _scatter(_cell_of(ivf_offsets, lo, hi) * H + (d >> 16), fill)
            low[dest] = d[order] & 0xFFFF
    return low, blocks


def _cell_of(ivf_offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """int64 [hi - lo]: the centroid listing each inverted-file entry lo .. hi-1."""
    C = len(ivf_offsets) - 1
    c0, c1 = np.searchsorted(ivf_offsets, [lo, hi], side="right") - 1
    c1 = min(int(c1), C - 1)
    lens = np.minimum(ivf_offsets[c0 + 1 : c1 + 2], hi) - np.maximum(ivf_offsets[c0 : c1 + 1], lo)
    return np.repeat(np.arange(c0, c1 + 1, dtype=np.int64), np.maximum(lens, 0))


def list_entries(ivf: np.ndarray, ivf_offsets: np.ndarray, ivf_blocks: np.ndarray,
                 cells: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The documents listed under ``cells`` (int64 [n] centroid ids), list after list, from the
    inverted file as :func:`split_ids` holds it (``ivf_blocks`` may be ``ivf_offsets`` for whole
    ids). Returns (documents int64 [e], lens int64 [n]: how many each cell lists)."""
    cells = np.asarray(cells, np.int64)
    C = len(ivf_offsets) - 1
    H = (len(ivf_blocks) - 1) // max(1, C)
    b = (cells[:, None] * H + np.arange(H)).ravel()
    starts = ivf_blocks[b]
    lens = ivf_blocks[b + 1] - starts
    pos, _ = expand_ranges(starts, lens)
    docs = ivf[pos].astype(np.int64)
    if H > 1:
        docs += np.repeat(np.tile(np.arange(H, dtype=np.int64) << 16, len(cells)), lens)
    return docs, lens.reshape(len(cells), H).sum(1)


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
                  cell_counts: np.ndarray, slot: np.ndarray, return_covered: bool = False,
                  ivf_blocks: Optional[np.ndarray] = None):
    """Stage 2 from the inverted file's side: the same scores as :func:`approximate_maxsim` over
    :func:`pruned_cells`, reading only the lists of the centroids that survive pruning.

    A centroid below the threshold for every query token contributes nothing, so a document's
    pruned score depends only on the surviving centroids it has; those are few (4.8% of the
    candidates' (centroid, document) entries on a 50k-document corpus at threshold 0.5: 5x
    faster than the document side there), and their inverted lists name their documents.
    keep: bool [C] from :func:`surviving`; Re: from :func:`centroid_table`; docs: int64 [n]
    sorted candidates; ivf, ivf_offsets, ivf_blocks: :func:`list_entries`' (``ivf_blocks`` None:
    whole ids); cell_counts: int64 [n], each candidate's number of distinct centroids;
    slot: int32 [N] scratch, all -1 (left all -1). Returns float32 [n]; with ``return_covered``,
    also bool [n], :func:`covered_documents` (the candidates listed under a surviving centroid).
    """
    kept = np.flatnonzero(keep)
    listed_docs, lens = list_entries(ivf, ivf_offsets, ivf_offsets if ivf_blocks is None else ivf_blocks, kept)
    try:
        slot[docs] = np.arange(len(docs), dtype=np.int32)
        where = slot[listed_docs]  # candidate index of each (surviving centroid, document) entry, or -1
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

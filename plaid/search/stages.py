"""PLAID's four search stages for one query on the CPU (numpy), after Santhanam et al., CIKM 2022.

1. :func:`candidates` — the documents listed under the ``ncells`` best centroids of each query
   token, from the centroid scores ``S = C·Qᵀ``;
2. :func:`approximate_maxsim` over :func:`pruned_scores` — approximate MaxSim from centroid
   scores alone, counting only tokens whose centroid scores ≥ ``centroid_score_threshold`` for
   some query token (a query token with no such document token contributes :data:`PRUNED_SCORE`);
3. the same without pruning, over stage 2's survivors only;
4. :func:`maxsim_scores` — exact MaxSim on the decompressed vectors of the survivors.

Every function is vectorised over documents and tokens (no Python loop over either). The
matrix products are done with torch by the caller: mixing numpy's BLAS with torch's thread pool
in one process costs ~10 ms per switch on 2 cores (measured), so this module does none. Centroid
scores come in two layouts: ``R`` [m, C] (token-major, for the per-token best cells and the
pruning mask: reductions along contiguous rows are ~30x faster than across columns) and
``St`` [C, m] (centroid-major, for gathering the scores of document tokens' centroids).
:mod:`plaid.search.stages_torch` has the same stages batched over queries in torch (GPU path).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["PRUNED_SCORE", "expand_ranges", "top_n", "best_cells", "candidates", "token_centroids",
           "pruned_scores", "approximate_maxsim", "maxsim_scores"]

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


def best_cells(R: np.ndarray, ncells: int) -> np.ndarray:
    """Distinct ids of the centroids scoring at least the ``ncells``-th best score of some query
    token, sorted.

    R: float32 [m, C] centroid scores, one contiguous row per query token. Exact ties at the cut
    are all kept (a few extra cells when bfloat16 rounding makes scores tie), so the result does
    not depend on a sort order and both engines probe the same cells.
    """
    C = R.shape[1]
    if ncells >= C:
        return np.arange(C)
    if ncells == 1:
        kth = R.max(1)
    else:  # torch.topk: an order of magnitude faster than np.partition along 8k columns here
        kth = torch.topk(torch.from_numpy(R), ncells, dim=1, sorted=True).values[:, -1].numpy()
    return np.flatnonzero(np.logical_or.reduce(R >= kth[:, None], axis=0))


def candidates(R: np.ndarray, ncells: int, ivf: np.ndarray, ivf_offsets: np.ndarray) -> np.ndarray:
    """Stage 1: sorted distinct ids of the documents in the ``ncells`` best centroids of each token.

    R: float32 [m, C] centroid scores (token-major); ivf: int32 [P] document ids grouped by
    centroid, ivf_offsets: int64 [C + 1]. Returns int64 [n_candidates].
    """
    cells = best_cells(R, ncells)
    starts = ivf_offsets[cells]
    pos, _ = expand_ranges(starts, ivf_offsets[cells + 1] - starts)
    return np.unique(ivf[pos]).astype(np.int64)


def token_centroids(docs: np.ndarray, doc_offsets: np.ndarray, codes) -> Tuple[np.ndarray, np.ndarray]:
    """Offsets and centroid ids of every token of ``docs`` (input of stages 2 and 3).

    docs: int64 [n] non-empty documents; doc_offsets: int64 [N + 1]; codes: uint16/int32 [T]
    centroid of every token (may be a memory map). Returns (offsets int64 [n + 1] delimiting each
    document's tokens, centroid ids [t]).
    """
    starts = doc_offsets[docs]
    pos, offs = expand_ranges(starts, doc_offsets[docs + 1] - starts)
    return offs, codes[pos]


def pruned_scores(St: np.ndarray, R: np.ndarray, threshold: float) -> np.ndarray:
    """Stage 2's score table: ``St`` [C, m] with the rows of centroids that score below
    ``threshold`` for every query token set to :data:`PRUNED_SCORE`.

    R: the same scores token-major [m, C]. Pruning the [C, m] table once costs C·m; pruning the
    gathered [t, m] values would cost a pass over every candidate token.
    """
    keep = R.max(0) >= threshold
    return np.where(keep[:, None], St, np.float32(PRUNED_SCORE))


def approximate_maxsim(St: np.ndarray, cc: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stages 2-3: per-document sum over query tokens of the best centroid score.

    St: float32 [C, m] centroid scores (centroid-major; :func:`pruned_scores` for stage 2);
    cc, offsets: the documents' token centroids and offsets from :func:`token_centroids`.
    Returns float32 [n].
    """
    return segment_max_sum(St.take(cc, axis=0), offsets)


def maxsim_scores(sims: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stage 4: exact MaxSim per document from token-query similarities.

    sims: float32 [t, m] = decompressed document tokens · query tokens; offsets: int64 [n + 1]
    delimiting each (non-empty) document's tokens. Returns float32 [n].
    """
    return segment_max_sum(sims, offsets)

"""PLAID's four stages in torch, vectorised over a whole batch of queries: the GPU path.

A batch of ``nq`` queries is padded to ``[nq, m, dim]`` (zero rows past each query's length,
``qmask`` marks real tokens). Candidates are (query, document) *pairs*, kept sorted by query then
document, so every stage is vectorised over the whole batch:

1. :func:`centroid_scores` and :func:`candidate_pairs` — ``S = Q·Cᵀ``; the documents listed under the
   ``ncells`` best centroids of each query token;
2. :func:`approximate_scores` with pruning — MaxSim over centroid scores only, counting just the
   tokens whose centroid scores ≥ ``centroid_score_threshold`` for some query token;
   :func:`top_pairs` keeps ``ndocs`` per query. When fewer of a query's candidates keep a
   surviving centroid than stage 2 keeps, that query's threshold drops to :func:`probed_floor`
   (the fallback of :func:`plaid.search.stages.fallback_threshold`, the same in both engines);
3. the same without pruning; keep ``ndocs / 4``;
4. :func:`exact_scores` — decompress the survivors' vectors and compute exact MaxSim.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

from ..maxsim import segment_max

__all__ = [
    "PRUNED_SCORE",
    "expand_ranges",
    "centroid_scores",
    "candidate_pairs",
    "prune_centroid_scores",
    "surviving",
    "probed_floor",
    "approximate_scores",
    "top_pairs",
    "exact_scores",
]

#: Contribution of a query token none of whose document centroids survives pruning (as PLAID).
PRUNED_SCORE = -9999.0


def expand_ranges(starts: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``range(starts[i], starts[i] + lens[i])`` for all i.

    starts, lens: int64 [n]. Returns (positions int64 [sum(lens)], offsets int64 [n + 1]) where
    segment i occupies ``positions[offsets[i]:offsets[i + 1]]``.
    """
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long, device=lens.device)
    torch.cumsum(lens, 0, out=offsets[1:])
    total = int(offsets[-1])
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens, output_size=total)
    positions = torch.arange(total, device=lens.device) + (starts - offsets[:-1])[owner]
    return positions, offsets


def centroid_scores(Q: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Stage 1 scores: float32 Q [nq, m, dim] x centroids [C, dim] -> float32 [nq, m, C]."""
    return torch.matmul(Q, centroids.T)


def candidate_pairs(S: torch.Tensor, qmask: torch.Tensor, ncells, ivf: torch.Tensor,
                    ivf_offsets: torch.Tensor, num_docs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 candidates: documents in the ``ncells`` best centroids of each real query token.

    S: float [nq, m, C]; qmask: bool [nq, m]; ncells: int, or int64 [nq] (one per query);
    ivf: int [P] document ids grouped by centroid, ``ivf_offsets`` int64 [C + 1]. Returns
    (pair_q, pair_doc), int64 [npairs], sorted by query then document, without duplicates.
    """
    nq, m, C = S.shape
    nc = torch.as_tensor(ncells, device=S.device).long().clamp(1, C).expand(nq).reshape(nq, 1, 1)
    # every centroid scoring at least the ncells-th best score, ties included (the rule of the
    # numpy stages: both engines probe the same cells)
    top = S.topk(int(nc.max()), dim=2).values  # [nq, m, max ncells]
    kth = top.gather(2, (nc - 1).expand(nq, m, 1))  # [nq, m, 1]
    take = (S >= kth) & qmask.unsqueeze(2)
    qi, _, cell = torch.nonzero(take, as_tuple=True)
    key = torch.unique(qi * C + cell)  # distinct (query, cell)
    kq, kc = key // C, key % C
    starts = ivf_offsets[kc]
    lens = ivf_offsets[kc + 1] - starts
    pos, offs = expand_ranges(starts, lens)
    docs = ivf[pos].long()
    owner_q = torch.repeat_interleave(kq, lens, output_size=pos.numel())
    pair = torch.unique(owner_q * num_docs + docs)
    return pair // num_docs, pair % num_docs


def _per_query(threshold, S: torch.Tensor):
    """A float threshold, or a [nq] tensor of them shaped [nq, 1, 1] to broadcast against S."""
    if isinstance(threshold, torch.Tensor):
        return threshold.to(device=S.device, dtype=S.dtype).reshape(-1, 1, 1)
    return threshold


def prune_centroid_scores(S: torch.Tensor, qmask: torch.Tensor, threshold) -> torch.Tensor:
    """Stage 2 score table: centroids whose best score over the query's tokens is below
    ``threshold`` are dropped (their entries become :data:`PRUNED_SCORE`); padded query rows are 0.

    S: float [nq, m, C]; qmask: bool [nq, m]; threshold: float, or float [nq] (one per query).
    Returns float [nq, m, C].
    """
    best = S.masked_fill(~qmask.unsqueeze(2), float("-inf")).amax(1, keepdim=True)  # [nq, 1, C]
    out = S.masked_fill(best < _per_query(threshold, S), PRUNED_SCORE)
    return out.masked_fill_(~qmask.unsqueeze(2), 0.0)


def surviving(S: torch.Tensor, qmask: torch.Tensor, threshold) -> torch.Tensor:
    """bool [nq, C]: the centroids that score at least ``threshold`` for some real token of
    each query (those :func:`prune_centroid_scores` keeps). threshold: float or float [nq]."""
    best = S.masked_fill(~qmask.unsqueeze(2), float("-inf")).amax(1, keepdim=True)  # [nq, 1, C]
    return (best >= _per_query(threshold, S)).squeeze(1)


def probed_floor(S: torch.Tensor, qmask: torch.Tensor, ncells) -> torch.Tensor:
    """float [nq]: the lowest score among the cells :func:`candidate_pairs` probed for each query,
    the minimum over its real tokens of the token's ``ncells``-th best centroid score (as
    :func:`plaid.search.stages.probed_floor`). ncells: int, or int64 [nq]."""
    nq, m, C = S.shape
    nc = torch.as_tensor(ncells, device=S.device).long().clamp(1, C).expand(nq).reshape(nq, 1, 1)
    top = S.topk(int(nc.max()), dim=2).values  # [nq, m, max ncells]
    kth = top.gather(2, (nc - 1).expand(nq, m, 1)).squeeze(2)  # [nq, m]
    return kth.masked_fill(~qmask, float("inf")).amin(1)


def approximate_scores(table: torch.Tensor, pair_q: torch.Tensor, pair_doc: torch.Tensor,
                       doc_offsets: torch.Tensor, take_codes: Callable[[torch.Tensor], torch.Tensor],
                       covered_by: torch.Tensor | None = None):
    """Stages 2-3: MaxSim of each (query, document) pair from centroid scores alone.

    table: float [nq, C, m] — centroid scores per query, centroid-major (pruned for stage 2,
    raw with padded rows zeroed for stage 3); doc_offsets: int64 [N + 1]; ``take_codes`` maps
    int64 token positions to their int64 centroid ids. Returns float [npairs]; with
    ``covered_by`` (bool [nq, C], from :func:`surviving`), also bool [npairs]: the pairs whose
    document has at least one of those centroids.
    """
    nq, C, m = table.shape
    starts = doc_offsets[pair_doc]
    pos, offs = expand_ranges(starts, doc_offsets[pair_doc + 1] - starts)
    owner_q = torch.repeat_interleave(pair_q, offs[1:] - offs[:-1], output_size=pos.numel())
    rows = owner_q * C + take_codes(pos)
    vals = table.reshape(nq * C, m)[rows]  # [tokens, m]
    scores = segment_max(vals, offs).sum(1)
    if covered_by is None:
        return scores
    seen = torch.zeros(pos.numel() + 1, dtype=torch.long, device=table.device)
    torch.cumsum(covered_by.reshape(-1)[rows].long(), 0, out=seen[1:])  # covered tokens so far
    return scores, seen[offs[1:]] > seen[offs[:-1]]


def top_pairs(scores: torch.Tensor, pair_q: torch.Tensor, nq: int, n: int) -> torch.Tensor:
    """Indices of the ``n`` best pairs of every query (pairs sorted by query).

    Returns int64 [nq, n'] with ``n' = min(n, most pairs of any query)``; -1 where a query has
    fewer pairs. Ties keep the lower document id first.
    """
    counts = torch.bincount(pair_q, minlength=nq)
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return torch.full((nq, 0), -1, dtype=torch.long, device=scores.device)
    starts = torch.zeros(nq, dtype=torch.long, device=scores.device)
    torch.cumsum(counts[:-1], 0, out=starts[1:])
    col = torch.arange(pair_q.numel(), device=scores.device) - starts[pair_q]
    grid = torch.full((nq, width), float("-inf"), dtype=scores.dtype, device=scores.device)
    grid[pair_q, col] = scores
    n = min(n, width)
    # stable: among equal scores the lower document id wins (same rule as the numpy stages)
    idx = torch.argsort(grid, dim=1, descending=True, stable=True)[:, :n]
    filled = torch.arange(width, device=scores.device).unsqueeze(0) < counts.unsqueeze(1)  # [nq, width]
    valid = torch.gather(filled, 1, idx)
    return torch.where(valid, starts.unsqueeze(1) + idx, torch.full_like(idx, -1))


def exact_scores(Q: torch.Tensor, pair_q: torch.Tensor, pair_doc: torch.Tensor,
                 doc_offsets: torch.Tensor, decompress: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
    """Stage 4: exact MaxSim of each (query, document) pair on decompressed vectors.

    Q: float [nq, m, dim] (zero rows past each query's length contribute 0);
    ``decompress`` maps int64 token positions [t] to float32 vectors [t, dim].
    Returns float [npairs].
    """
    nq, m, dim = Q.shape
    starts = doc_offsets[pair_doc]
    pos, offs = expand_ranges(starts, doc_offsets[pair_doc + 1] - starts)
    D = decompress(pos)  # [t, dim]
    if nq == 1:
        sims = D @ Q[0].T  # [t, m]
    else:
        tq = torch.repeat_interleave(pair_q, offs[1:] - offs[:-1], output_size=pos.numel())
        counts = torch.bincount(tq, minlength=nq)
        tstart = torch.zeros(nq, dtype=torch.long, device=D.device)
        torch.cumsum(counts[:-1], 0, out=tstart[1:])
        col = torch.arange(pos.numel(), device=D.device) - tstart[tq]
        padded = D.new_zeros((nq, int(counts.max()), dim))
        padded[tq, col] = D
        sims = torch.bmm(padded, Q.transpose(1, 2))[tq, col]  # [t, m]
    return segment_max(sims, offs).sum(1)

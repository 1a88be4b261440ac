"""Search parameters: one frozen value, validated once, with defaults by ``k``.

Every budget of the four stages is derived here, each from a named constant with its reason, so
the pipeline (:mod:`plaid.search.pipeline`) and both engines read the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InvalidInputError
from ..store.manifest import check_search_depth

__all__ = ["SearchParams", "Budgets", "default_search_params", "PRUNED_SCORE", "STAGE3_DIVISOR",
           "SMALL_SUBSET_FACTOR", "widen"]

#: Contribution of a query token none of whose document centroids survives pruning (PLAID's value:
#: far below any real score, so the number of matched tokens dominates a pruned score).
PRUNED_SCORE = -9999.0
#: Stage 3 keeps ``ndocs // STAGE3_DIVISOR`` candidates (at least k), as PLAID: stage 2 only
#: narrows with pruned scores, stage 3 re-ranks its survivors with every centroid.
STAGE3_DIVISOR = 4
#: A subset of at most ``max(ndocs, SMALL_SUBSET_FACTOR * k)`` documents goes straight to stage 4
#: (exact within it): scoring that many exactly costs about what the pipeline would.
SMALL_SUBSET_FACTOR = 4


def widen(ncells: int, num_centroids: int) -> int:
    """The next ``ncells`` while a query has fewer candidates than stage 2 keeps: x1.5 (at least +1),
    capped at the number of centroids. Short queries probe few cells per token; this finds them
    enough candidates in a few steps without probing every cell at once."""
    return min(num_centroids, ncells + max(1, ncells // 2))


def default_search_params(k: int, depth: int = 1) -> dict:
    """Default search parameters by ``k``: ncells, centroid_score_threshold, ndocs.

    k <= 10: 2 / 0.5 / 256; k <= 100: 2 / 0.45 / 1024; larger: 4 / 0.4 / max(4k, 4096).
    These are PLAID's, except ncells=2 (PLAID: 1) for k <= 10: on msmarco-5k one cell per query
    token kept 96.6% of the exact top-10 among the candidates, two cells 99.0%.
    ``ncells`` is a minimum: the pipeline probes more cells (:func:`widen`) while a query has
    fewer than ``max(ndocs, k)`` candidates. PLAID's counts assume ColBERT's 32-token queries;
    shorter queries probe far fewer cells (7-token msmarco-5k queries: recall@100 0.79 with a
    fixed ncells=2, 0.94 with this rule; the ceiling of the index is 0.95).

    ``depth`` (an index's ``search.depth``, recorded by its preset: 3 for "balanced", 4 for
    "accurate") multiplies
    ``ndocs``: stages 2-4 keep ``depth`` times as many candidates. A faithful codec makes the
    centroid-only stages 2-3 the limit of recall; a deeper search lifts it at the cost of stage 4.
    """
    if k <= 10:
        d = {"ncells": 2, "centroid_score_threshold": 0.5, "ndocs": 256}
    elif k <= 100:
        d = {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024}
    else:
        d = {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(4 * k, 4096)}
    d["ndocs"] *= check_search_depth(depth, "search depth")
    return d


def _positive_int(name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class Budgets:
    """What one search of an index actually uses (from :meth:`SearchParams.budgets`).

    k: results per query (capped at the number of documents); ncells: cells probed per token
    (a minimum); threshold: stage-2 pruning threshold; n2 / n3: candidates kept by stages 2 / 3;
    small_subset: a subset up to this size is scored exhaustively; threads: worker threads.
    """

    k: int
    ncells: int
    threshold: float
    n2: int
    n3: int
    small_subset: int
    threads: int


@dataclass(frozen=True)
class SearchParams:
    """Parameters of a search, validated once.

    Parameters
    ----------
    k : int, default 10
        Results per query. A k above the index's number of documents is capped at it (the
        results are then ``[nq, num_documents]``).
    ncells : int or None, default None
        Centroids probed per query token in stage 1; a minimum (see :func:`widen`). None: by
        ``k`` (:func:`default_search_params`).
    centroid_score_threshold : float or None, default None
        Stage-2 pruning: only centroids scoring at least this for some query token count
        (with the fallback of :mod:`plaid.search.pipeline`). None: by ``k``.
    ndocs : int or None, default None
        Candidates kept by stage 2 (at least ``k``); stage 3 keeps ``ndocs // 4`` (at least
        ``k``). None: by ``k``, times the index's search depth (``search_depth``, recorded by
        the preset the index was built with: 3 for "balanced", the default; 4 for "accurate";
        1 for "compact" and for indexes built before the presets recorded one; a balanced index
        built before its preset's depth became 3 records 1).
    threads : int or None, default None
        Threads of the search: they share the batch's query-centroid product, then run stages
        1-4 of different queries in parallel (a single query on a large index: its stage 2
        and stage 4 in parts, :func:`plaid.search.kernels_cpu.search_query`). None: the
        searcher's setting
        (``Searcher(num_threads=...)``, by default torch's thread count).

    Raises :class:`InvalidInputError` naming the field for a value out of range (ncells < 1,
    ndocs < k, a NaN or infinite threshold, threads < 1, ...).
    """

    k: int = 10
    ncells: Optional[int] = None
    centroid_score_threshold: Optional[float] = None
    ndocs: Optional[int] = None
    threads: Optional[int] = None

    def __post_init__(self):
        if self.k is None:
            raise InvalidInputError("k must be a positive integer, got None")
        k = _positive_int("k", self.k)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "ncells", _positive_int("ncells", self.ncells))
        object.__setattr__(self, "ndocs", _positive_int("ndocs", self.ndocs))
        object.__setattr__(self, "threads", _positive_int("threads", self.threads))
        t = self.centroid_score_threshold
        if t is not None:
            if isinstance(t, bool):
                raise InvalidInputError(f"centroid_score_threshold must be a number, got {t!r}")
            try:
                t = float(t)
            except (TypeError, ValueError):
                raise InvalidInputError(f"centroid_score_threshold must be a number, got {t!r}") from None
            if not math.isfinite(t):
                raise InvalidInputError(f"centroid_score_threshold must be a finite number, got {t!r}")
            object.__setattr__(self, "centroid_score_threshold", t)
        if self.ndocs is not None and self.ndocs < k:
            raise InvalidInputError(f"ndocs ({self.ndocs}) must be at least k ({k}): stage 2 keeps ndocs candidates")

    def budgets(self, num_documents: int, default_threads: int = 1, depth: int = 1) -> Budgets:
        """The budgets of a search over an index of ``num_documents`` documents: k is capped at
        it and the defaults are those of the capped k (so a huge k allocates nothing for itself).
        ``depth``: the index's search depth (:func:`default_search_params`; an explicit ``ndocs``
        is used as given)."""
        k = max(1, min(self.k, int(num_documents)))
        d = default_search_params(k, depth)
        ncells = self.ncells if self.ncells is not None else d["ncells"]
        threshold = self.centroid_score_threshold if self.centroid_score_threshold is not None \
            else d["centroid_score_threshold"]
        ndocs = self.ndocs if self.ndocs is not None else d["ndocs"]
        return Budgets(k=k, ncells=ncells, threshold=float(threshold), n2=max(ndocs, k),
                       n3=max(ndocs // STAGE3_DIVISOR, k), small_subset=max(ndocs, SMALL_SUBSET_FACTOR * k),
                       threads=self.threads or max(1, int(default_threads)))

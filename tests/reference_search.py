"""FROZEN REFERENCE (tests only): the numpy engine's per-query search as it was before the
one-pipeline rewrite (same policy: widening, small subsets, tombstones, budgets, the pruning
fallback, ties), written as one plain function over an opened index snapshot. The new pipeline
must return the same ids and scores (tests/test_pipeline.py).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

import reference_stages as stages


class RefIndex:
    """The arrays the reference reads, from a store snapshot of the index at ``path``."""

    def __init__(self, path: str):
        from plaid.store import open_snapshot

        snap = open_snapshot(path)
        m = snap.manifest
        self.num_documents, self.num_centroids, self.normalized = m.num_documents, m.num_centroids, m.normalized
        self.codec = snap.codec
        self.centroids = snap.centroids
        self.ivf, self.ivf_offsets, self.doc_offsets = snap.ivf, snap.ivf_offsets, snap.doc_offsets
        self.ivf_lens = np.diff(self.ivf_offsets)
        self.dcells, self.dcell_offsets = stages.doc_cells(self.ivf, self.ivf_offsets, self.num_documents)
        self.codes = snap.codes(load=True).concatenated()
        self.residuals = snap.residuals(load=True).concatenated()
        self.norms = snap.norms(load=True).concatenated() if self.normalized else None
        if self.norms is not None and snap.norm_quantizer is not None:  # format 3: one-byte codes -> values
            self.norms = snap.norm_quantizer.values[self.norms]
        deleted = snap.deleted
        self.alive = None
        if len(deleted):
            self.alive = np.ones(self.num_documents, bool)
            self.alive[deleted] = False
        self.num_live = snap.num_live
        # stages 1-3 score the centroids' int8 rows times a factor per centroid (the scale, or
        # 1 / |row| for unit vectors): the definition since the int8 product (was: float32 unit
        # centroids, which differ from it by float32 rounding)
        from plaid.codecs import quantize_centroids

        qc = quantize_centroids(self.centroids)
        rows = qc["centroids"].astype(np.float32)
        if self.normalized:
            norms = np.linalg.norm(rows.astype(np.float64), axis=1)
            self.factor = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
        else:
            self.factor = qc["centroid_scales"].astype(np.float32)
        self.scoring = torch.from_numpy(np.ascontiguousarray(rows))


def _exact(ix: RefIndex, q, docs, k):
    starts = ix.doc_offsets[docs]
    pos, offs = stages.expand_ranges(starts, ix.doc_offsets[docs + 1] - starts)
    sims = stages.adc_scores(ix.codec.score_table(q), ix.residuals[pos])
    cc = ix.codes[pos]
    used = np.zeros(ix.num_centroids, bool)
    used[cc] = True
    u = np.flatnonzero(used)
    slot = np.empty(ix.num_centroids, np.int32)
    slot[u] = np.arange(len(u), dtype=np.int32)
    cs = (torch.from_numpy(q) @ torch.from_numpy(np.take(ix.centroids, u, axis=0)).T).numpy()
    sims += cs.take(slot[cc], axis=1).T
    if ix.normalized:
        sims /= torch.from_numpy(ix.norms[pos]).float().numpy()[:, None]
    exact = stages.maxsim_scores(sims, offs)
    top = stages.top_n(exact, k)
    return docs[top], exact[top]


def _pruned(ix, keep, Re, docs, counts, listed):
    if listed <= counts.sum():
        slot = np.full(ix.num_documents, -1, np.int32)
        return stages.pruned_maxsim(keep, Re, docs, ix.ivf, ix.ivf_offsets, counts, slot, return_covered=True)
    offs, cells = stages.document_cells(docs, ix.dcells, ix.dcell_offsets)
    return (stages.approximate_maxsim(Re, stages.pruned_cells(cells, keep), offs),
            stages.covered_documents(cells, keep, offs))


def reference_search(ix: RefIndex, queries: List[np.ndarray], k: int, ncells: int, threshold: float, ndocs: int,
                     subsets: Optional[List[np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """ids int64 [nq, k], scores float32 [nq, k] (float32 centroid scores); k <= num_documents."""
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    S_all = (torch.from_numpy(np.concatenate(queries)) @ ix.scoring.T).numpy() * ix.factor[None, :]
    row = 0
    for qi, q in enumerate(queries):
        m = q.shape[0]
        R = S_all[row : row + m]
        row += m
        sub = None if subsets is None else subsets[qi]
        nc = ncells
        res = None
        if sub is not None:
            if len(sub) == 0:
                continue
            if len(sub) <= max(ndocs, 4 * k):
                res = _exact(ix, q, sub, k)
            else:
                live = max(1, ix.num_live)
                nc = int(min(ix.num_centroids, max(ncells, math.ceil(ncells * live / max(1, len(sub))))))
        if res is None:
            target = max(ndocs, k)
            cuts = stages.CellCuts(R)
            while True:
                docs = stages.candidates(R, nc, ix.ivf, ix.ivf_offsets, cuts, None)
                if ix.alive is not None:
                    docs = docs[ix.alive[docs]]
                if sub is not None:
                    docs = docs[np.isin(docs, sub, assume_unique=True)]
                if len(docs) >= target or nc >= ix.num_centroids:
                    break
                nc = min(ix.num_centroids, nc + max(1, nc // 2))
            if len(docs) == 0:
                continue
            Re = stages.centroid_table(R)
            sel = np.arange(len(docs))
            n2, n3 = max(ndocs, k), max(ndocs // 4, k)
            if len(docs) > n2:
                counts = ix.dcell_offsets[docs + 1] - ix.dcell_offsets[docs]
                keep = stages.surviving(R, threshold)
                listed = int(ix.ivf_lens[keep].sum())
                approx = None
                if listed >= n2:
                    approx, covered = _pruned(ix, keep, Re, docs, counts, listed)
                    n_covered = int(covered.sum())
                else:
                    n_covered = listed
                if n_covered < n2:
                    thr = stages.fallback_threshold(threshold, n_covered, n2, stages.probed_floor(cuts, nc))
                    if thr < threshold or approx is None:
                        keep = stages.surviving(R, thr)
                        approx, _ = _pruned(ix, keep, Re, docs, counts, int(ix.ivf_lens[keep].sum()))
                sel = np.sort(stages.top_n(approx, n2))
            if len(sel) > n3:
                offs, cells = stages.document_cells(docs[sel], ix.dcells, ix.dcell_offsets)
                approx = stages.approximate_maxsim(Re, cells, offs)
                sel = sel[np.sort(stages.top_n(approx, n3))]
            res = _exact(ix, q, docs[sel], k)
        ids[qi, : len(res[0])] = res[0]
        scores[qi, : len(res[1])] = res[1]
    return ids, scores

"""The torch engine: the same per-query kernels as :mod:`plaid.search.engine_cpu`, on any torch
device (the GPU path; on the CPU it is the cross-check of the numpy engine).

What each stage decides is in :mod:`plaid.search.pipeline`. The whole index lives on the device
in compact arrays: centroid ids int32 [T], residual codes uint8 [T, code_bytes], norms float16 [T],
the inverted file and its transpose int32 [P] (offsets int64), centroids float32 [C, dim]: about
``code_bytes + 6`` bytes per token plus 8 per (centroid, document) pair. Stage 4 scores tokens by
centroid score + the codec's byte table (ADC, ``embedding_bag``) on the device, decoding nothing.
Only small per-query arrays (candidate ids, scores) cross to the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..maxsim import segment_max
from ..store import Snapshot, checked_codes, checked_norms
from . import stages
from .params import PRUNED_SCORE
from .pipeline import QueryScores, alive_mask, scoring_centroids, scoring_matrix

__all__ = ["TorchEngine", "expand_ranges"]


def expand_ranges(starts: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``range(starts[i], starts[i] + lens[i])``: (positions int64 [sum(lens)], offsets
    int64 [n + 1])."""
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long, device=lens.device)
    torch.cumsum(lens, 0, out=offsets[1:])
    total = int(offsets[-1])
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens, output_size=total)
    return torch.arange(total, device=lens.device) + (starts - offsets[:-1])[owner], offsets


def _sum_tokens(best: torch.Tensor) -> torch.Tensor:
    """float32 [n, m] -> [n]: the sum over query tokens in token order (the numpy engine's order,
    so both give the same float32 value)."""
    acc = best[:, 0].clone()
    for i in range(1, best.shape[1]):
        acc += best[:, i]
    return acc


class TorchEngine:
    """Kernels of the four stages in torch on ``device`` (see :class:`plaid.search.pipeline.Engine`)."""

    name = "torch"

    def __init__(self, snap: Snapshot, device: torch.device, precision: str = "float32"):
        m = snap.manifest
        dev = self.device = torch.device(device)
        self.snapshot = snap
        self.num_documents, self.num_centroids, self.normalized = m.num_documents, m.num_centroids, m.normalized
        self.codec = snap.codec
        self.codec.to(dev)
        centroids = snap.centroids
        ivf, ivf_offsets = snap.ivf, snap.ivf_offsets
        dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, self.num_documents)
        self.ivf_lens = np.diff(ivf_offsets)
        codes = snap.codes(load=True).concatenated()
        checked_codes(codes, self.num_centroids, f"{snap.path}: index files {snap.token_files('codes')}")
        norms = snap.norms(load=True)
        self.centroids_t = torch.from_numpy(centroids).to(dev)
        self.ivf_t = torch.from_numpy(np.ascontiguousarray(ivf, np.int32)).to(dev)
        self.ivf_offsets_t = torch.from_numpy(ivf_offsets).to(dev)
        self.dcells_t = torch.from_numpy(dcells).to(dev)
        self.dcell_offsets_t = torch.from_numpy(dcell_offsets).to(dev)
        self.doc_offsets_t = torch.from_numpy(snap.doc_offsets).to(dev)
        self.codes_t = torch.from_numpy(codes.astype(np.int32)).to(dev)
        self.residuals_t = torch.from_numpy(np.ascontiguousarray(snap.residuals(load=True).concatenated())).to(dev)
        self.norms_t = None  # uint8 codes into norm_values_t (format 3), or float16 values (format 2)
        self.norm_values_t = None
        if norms is not None:
            n = norms.concatenated()
            nq = snap.norm_quantizer
            if nq is not None:
                self.norm_values_t = torch.from_numpy(nq.values).to(dev)
            else:
                checked_norms(n, f"{snap.path}: index files {snap.token_files('norms')}")
            self.norms_t = torch.from_numpy(n).to(dev)
        self.shift_t = torch.arange(0, 256 * m.code_bytes, 256, dtype=torch.int32, device=dev)
        self.alive = alive_mask(snap.deleted, self.num_documents)
        self.num_live = snap.num_live
        rows, factor = scoring_centroids(centroids, self.normalized)
        if precision == "bfloat16":  # the product with rows * factor rounded to bfloat16 (as the CPU engine's)
            self.scoring_t = torch.from_numpy(scoring_matrix(rows, factor)).to(dev).to(torch.bfloat16)
            self.scoring_factor_t = None
        else:  # float32: the int8 rows' product times each centroid's factor (as the CPU engine's)
            self.scoring_t = torch.from_numpy(rows.astype(np.float32)).to(dev)
            self.scoring_factor_t = torch.from_numpy(factor).to(dev)

    def _norms(self, pos: torch.Tensor) -> torch.Tensor:
        """float32 [t]: the stored norms of the tokens at ``pos`` (on the device)."""
        n = self.norms_t[pos]
        return self.norm_values_t[n.long()] if self.norm_values_t is not None else n.float()

    # -- stage 1 ---------------------------------------------------------------------------------
    def centroid_scores(self, Qcat: np.ndarray, pool=None, threads: int = 1) -> np.ndarray:
        Q = torch.from_numpy(np.ascontiguousarray(Qcat, np.float32)).to(self.device)
        R = (Q.to(self.scoring_t.dtype) @ self.scoring_t.T).float()
        if self.scoring_factor_t is not None:
            R = R * self.scoring_factor_t
        return R.cpu().numpy()

    def candidates(self, S: QueryScores, cells: np.ndarray) -> np.ndarray:
        cells_t = torch.from_numpy(np.asarray(cells, np.int64)).to(self.device)
        starts = self.ivf_offsets_t[cells_t]
        pos, _ = expand_ranges(starts, self.ivf_offsets_t[cells_t + 1] - starts)
        return torch.unique(self.ivf_t[pos]).cpu().numpy().astype(np.int64)

    # -- stages 2 and 3 --------------------------------------------------------------------------
    def _table(self, S: QueryScores) -> torch.Tensor:
        """[C + 1, m] on the device: R transposed, plus a row of PRUNED_SCORE (index C)."""
        t = S.cache.get("Re_t")
        if t is None:
            R = torch.from_numpy(S.R).to(self.device)
            t = torch.cat([R.T, torch.full((1, R.shape[0]), PRUNED_SCORE, device=self.device)]).contiguous()
            S.cache["Re_t"] = t
        return t

    def _doc_cells(self, docs: np.ndarray):
        d = torch.from_numpy(docs).to(self.device)
        starts = self.dcell_offsets_t[d]
        pos, offs = expand_ranges(starts, self.dcell_offsets_t[d + 1] - starts)
        return self.dcells_t[pos].long(), offs

    def surviving_entries(self, keep: np.ndarray) -> int:
        return int(self.ivf_lens[keep].sum())

    def pruned_scores(self, S: QueryScores, keep: np.ndarray, docs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        cells, offs = self._doc_cells(docs)
        kept = torch.from_numpy(keep).to(self.device)[cells]
        pruned = torch.where(kept, cells, torch.full_like(cells, self.num_centroids))
        best = segment_max(self._table(S)[pruned], offs)  # [n, m]
        covered = segment_max(kept.to(torch.float32).unsqueeze(1), offs)[:, 0] > 0
        return _sum_tokens(best).cpu().numpy(), covered.cpu().numpy()

    def full_scores(self, S: QueryScores, docs: np.ndarray) -> np.ndarray:
        cells, offs = self._doc_cells(docs)
        return _sum_tokens(segment_max(self._table(S)[cells], offs)).cpu().numpy()

    # -- stage 4 ---------------------------------------------------------------------------------
    def token_sims(self, q: np.ndarray, pos: torch.Tensor) -> torch.Tensor:
        """float32 [t, m] on the device: decompressed tokens at ``pos`` · ``q``, by ADC (no decoding)."""
        table = self.codec.score_table(q).to(self.device)  # [code_bytes * 256, m]
        idx = self.residuals_t[pos].to(torch.int32) + self.shift_t
        sims = F.embedding_bag(idx, table, mode="sum")
        cc = self.codes_t[pos].long()
        u, slot = torch.unique(cc, return_inverse=True)
        qt = torch.from_numpy(q).to(self.device)
        cs = qt @ self.centroids_t[u].T  # [m, u]
        sims += cs.T[slot]
        if self.normalized:
            sims /= self._norms(pos).unsqueeze(1)
        return sims

    def exact_scores(self, q: np.ndarray, docs: np.ndarray, R: Optional[np.ndarray] = None) -> np.ndarray:
        # R (stage 1's scores) is not used: the centroid terms are the raw centroids' products
        d = torch.from_numpy(docs).to(self.device)
        starts = self.doc_offsets_t[d]
        pos, offs = expand_ranges(starts, self.doc_offsets_t[d + 1] - starts)
        return segment_max(self.token_sims(q, pos), offs).sum(1).float().cpu().numpy()

    def decompress(self, pos: np.ndarray) -> np.ndarray:
        """Reconstructed vectors of the tokens at ``pos`` -> float32 [t, dim] (numpy)."""
        p = torch.from_numpy(np.asarray(pos, np.int64)).to(self.device)
        D = self.centroids_t[self.codes_t[p].long()] + self.codec.decode(self.residuals_t[p])
        if self.normalized:
            D = D / self._norms(p).unsqueeze(1)
        return D.cpu().numpy()

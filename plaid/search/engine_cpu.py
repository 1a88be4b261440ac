"""The CPU engine: per-query kernels over one committed generation (compiled, :mod:`kernels_cpu`;
numpy and torch under its fallback). What each stage decides is in :mod:`plaid.search.pipeline`;
this module only computes. With the compiled kernels a query without a subset on a one-segment
index runs stages 1-4 in one call (:meth:`CPUEngine.search_one`); otherwise the pipeline calls
the per-stage methods below.

State prepared from the store's snapshot: centroids (float32 [C, dim]) and the scoring rows of
stages 1-3 (int8 [C, dim] and a float32 factor per centroid; a bfloat16 matrix where asked), the
inverted file (16-bit document ids, uint16 [P], with int64 [C + 1] offsets and int64 [C * H + 1]
block starts: :func:`plaid.search.stages.split_ids`) and its transpose (each
document's distinct centroids: uint16 [P] up to 65,536 centroids, else int32; int64 [N + 1]),
document offsets, tombstones, the norm table (format 3: float32 [256]); the per-token arrays
(centroid ids, residual codes, norms) stay memory-mapped unless ``load_all``.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..codecs import quantize_centroids
from ..embeddings import advise_random
from ..errors import IndexCorruptError
from ..store import Snapshot, checked_codes, checked_norms
from . import kernels_cpu as K
from . import stages
from .params import Budgets
from .pipeline import Hits, QueryScores, Trace, alive_mask, centroid_gain, scoring_centroids, scoring_matrix

__all__ = ["CPUEngine"]

#: Stage 1 replaces a sort of the listed ids by a scan of N flags when the lists hold at least
#: N / FLAG_SCAN_RATIO entries (a scan of 64 flags costs about one element of a sort).
FLAG_SCAN_RATIO = 64


#: The query-centroid product is split over the search's threads only in parts of at least this
#: many multiply-adds (about 0.5 ms on one core): measured on a 7-token query, two threads made
#: the product slower than one at 8,192 centroids (7.3M) and faster at 65,536 (58.7M).
MIN_SPLIT_MACS = 1 << 24
#: The fallback's torch (MKL) product of float32 scores is padded to a multiple of this many rows:
#: then every row's scores equal the compiled product's bits (measured for 1-32 rows on msmarco-5k
#: sizes; unpadded, 1-3 rows differed in 88% of the scores, 5-9 rows in 10-38%).
BLAS_ROWS = 4


class _Scratch(threading.local):
    """Per-thread scratch arrays of one entry per document, reused across queries (allocating and
    clearing them per query would cost O(documents)); kernels leave them as found."""

    def marks(self, n: int) -> np.ndarray:
        buf = self.__dict__.get("mark")
        if buf is None or len(buf) != n:
            buf = self.__dict__["mark"] = np.zeros(n, bool)
        return buf

    def slots(self, n: int) -> np.ndarray:
        buf = self.__dict__.get("slot")
        if buf is None or len(buf) != n:
            buf = self.__dict__["slot"] = np.full(n, -1, np.int32)
        return buf

    def cslots(self, n: int) -> np.ndarray:
        """int32 [C] all -1: stage 4's centroid -> column map."""
        buf = self.__dict__.get("cslot")
        if buf is None or len(buf) != n:
            buf = self.__dict__["cslot"] = np.full(n, -1, np.int32)
        return buf


class CPUEngine:
    """Kernels of the four stages on the CPU (see :class:`plaid.search.pipeline.Engine`)."""

    name = "numpy"

    def __init__(self, snap: Snapshot, load_all: bool = False, precision: str = "float32"):
        m = snap.manifest
        self.snapshot = snap
        self.num_documents, self.num_centroids, self.normalized = m.num_documents, m.num_centroids, m.normalized
        self.codec = snap.codec
        self.centroids = snap.centroids
        self.ivf_offsets, self.doc_offsets = snap.ivf_offsets, snap.doc_offsets
        self.ivf_lens = np.diff(self.ivf_offsets)
        # stages 2-3 read each document's distinct centroids (the inverted file transposed: 2 B per
        # (centroid, document) pair up to 65,536 centroids, else 4, + 8 B per document, in memory)
        self.dcells, self.dcell_offsets = stages.doc_cells(snap.ivf, self.ivf_offsets, self.num_documents,
                                                           narrow=True)
        # the inverted file itself with 16-bit ids (2 B an entry instead of 4; + 8 B per centroid
        # and block of 65,536 documents): the snapshot's int32 copy is dropped
        self.ivf, self.ivf_blocks = stages.split_ids(snap.ivf, self.ivf_offsets, self.num_documents)
        self.ivf_blocks.flags.writeable = False  # checked once by the kernels' wrappers (K.ivf_args)
        self.ivf_offsets = self.ivf_offsets.view()
        self.ivf_offsets.flags.writeable = False
        snap.forget("ivf")
        self.codes_file = snap.token_files("codes")
        self.norms_file = snap.token_files("norms") if self.normalized else ""
        self.codes, self.residuals, self.norms = snap.codes(load_all), snap.residuals(load_all), snap.norms(load_all)
        # one-byte norms (format 3) are codes into this table; float16 norms (format 2) are values
        nq = snap.norm_quantizer
        self.norm_values: Optional[np.ndarray] = nq.values if nq is not None else None
        if load_all:  # in memory anyway: check every token's centroid id and float16 norm once, here
            for a in self.codes.parts:
                checked_codes(a, self.num_centroids, f"{snap.path}: index files {self.codes_file}")
            if self.norm_values is None:
                for a in (self.norms.parts if self.norms is not None else []):
                    checked_norms(a, f"{snap.path}: index files {self.norms_file}")
        else:  # searches touch scattered rows: no readahead (measured: cold-cache resident residual
            for rows in (self.codes, self.residuals, self.norms):  # pages after 50 queries on 50k
                for a in (rows.parts if rows is not None else []):  # documents 119 MB -> 25 MB)
                    advise_random(a)
        self.alive: Optional[np.ndarray] = alive_mask(snap.deleted, self.num_documents)
        self.num_live = snap.num_live
        # stages 1-3 score int8 rows times a factor per centroid (pipeline.scoring_centroids)
        quantized = quantize_centroids(self.centroids)  # once, for both (80 ms at 65,536 centroids)
        self.scoring_rows, self.scoring_factor = scoring_centroids(self.centroids, self.normalized, quantized)
        self.precision = "bfloat16" if precision == "bfloat16" else "float32"
        # stage 4 takes its centroid terms from stage 1's float32 scores (R * gain, equal to the
        # raw centroids' products within float32 rounding); bfloat16 scores are too coarse for it
        self.centroid_gain: Optional[np.ndarray] = \
            centroid_gain(self.centroids, self.normalized, quantized) if self.precision == "float32" else None
        self._scoring_bf16: Optional[torch.Tensor] = None  # the bfloat16 product's matrix (made on first use)
        self._scoring_f32: Optional[torch.Tensor] = None  # the fallback's float32 rows (while it runs)
        self._scratch = _Scratch()
        self._scoring_t: Optional[np.ndarray] = None  # the kernel's product reads it (K.product_panels)
        # numba's start-up and the kernels a search runs load in the background meanwhile: with one
        # segment the one-call query kernels, with several the per-stage ones
        one_segment = len(self.codes.parts) == 1
        K.warmup(self.codes.dtype, background=True, search_only=one_segment, one_call=one_segment)
        # stages 1-4 of a query in one compiled call read one segment's token arrays in place
        self.query_arrays: Optional[K.QueryArrays] = None
        if len(self.codes.parts) == 1:
            self.query_arrays = K.QueryArrays(
                self.centroids, self.ivf, self.ivf_offsets, self.dcells, self.dcell_offsets, self.doc_offsets,
                self.codes.parts[0], self.residuals.parts[0], self.norms.parts[0] if self.norms is not None else None,
                self.alive, self.norm_values, self.ivf_blocks, self.centroid_gain)

    # -- stages 1-4 in one call ------------------------------------------------------------------
    def search_one(self, q: np.ndarray, R: np.ndarray, b: Budgets, trace: Optional[Trace],
                   pool: Optional[ThreadPoolExecutor] = None) -> Optional[Hits]:
        """The whole pipeline for one query (no subset) in one compiled call that releases the GIL
        (:func:`kernels_cpu.search_query`: the same decisions, ids, scores and trace as the
        pipeline's stages), or None where it does not apply (several segments, the numpy
        fallback): then the pipeline runs its stages on this engine's kernels. ``pool``: idle
        workers for ``b.threads - 1`` more threads (the caller's is one), over which a large stage 2
        is split (:func:`kernels_cpu.search_query`); None: this thread alone."""
        if self.query_arrays is None:
            return None
        clock = time.perf_counter
        t0 = clock()
        q = np.ascontiguousarray(q, np.float32)
        # the byte table padded to whole 8-lane blocks of query tokens (zero tokens: zero columns),
        # so stage 4 reads its rows with plain loads
        pad = -len(q) % 8
        table = self.codec.score_table(np.concatenate([q, np.zeros((pad, q.shape[1]), np.float32)]) if pad else q)
        table = table.numpy()
        sc = self._scratch
        t1 = clock()
        try:
            r = K.search_query(R, q, table, self.query_arrays, b.k, b.ncells, b.threshold, b.n2, b.n3,
                               sc.marks(self.num_documents), sc.slots(self.num_documents), sc.cslots(self.num_centroids),
                               pool, b.threads, sc)
        except IndexCorruptError as e:
            raise self._named(e) from None
        if r is None:
            return None
        ids, scores, docs, nc, threshold, sel2, sel3, ticks = r
        if trace is not None and len(docs):
            t2 = clock()
            trace.candidates, trace.ncells, trace.threshold = docs, int(nc), float(threshold)
            trace.stage2, trace.stage3 = docs[sel2], docs[sel3]
            # the kernel's cycle counts, scaled to the call's wall time; the byte table is stage 4's
            span = int(ticks[4] - ticks[0])
            per = (t2 - t1) / span if span > 0 else 0.0
            d = np.diff(ticks) * per
            trace.timings.update(stage1_candidates=float(d[0]), stage2_prune=float(d[1]), stage3_rank=float(d[2]),
                                 stage4_exact=float(d[3]) + (t1 - t0))
        return ids, scores

    def search_many(self, queries: List[np.ndarray], b: Budgets) -> Optional[List[Hits]]:
        """:meth:`search_one` for a group of queries (no subsets, no traces): their byte tables
        (each query's ``codec.score_table``, padded with zero tokens to whole 8-lane blocks as in
        :meth:`search_one`, all in one stacked product), then their query-centroid product and
        stages 1-4 of each in ONE compiled call (:func:`kernels_cpu.search_many`, the GIL released
        once for the group). None where it does not apply (several segments, the numpy fallback,
        an empty query): then search them one by one."""
        if self.query_arrays is None or not self.independent_rows or any(len(q) == 0 for q in queries):
            return None
        lens = np.array([len(q) for q in queries], np.int64)
        starts = np.zeros(len(queries) + 1, np.int64)
        np.cumsum(lens, out=starts[1:])
        widths = -(-lens // 8) * 8
        dim = queries[0].shape[1]
        Q = np.empty((int(starts[-1]), dim), np.float32)
        padded = np.zeros((int(widths.sum()), dim), np.float32)  # each query + zero tokens
        row = 0
        for i, q in enumerate(queries):
            Q[starts[i] : starts[i + 1]] = q
            padded[row : row + len(q)] = q
            row += int(widths[i])
        table_offsets = np.zeros(len(queries) + 1, np.int64)
        np.cumsum(self.codec.code_bytes * 256 * widths, out=table_offsets[1:])
        tables = np.empty(int(table_offsets[-1]), np.float32)
        self.codec.score_tables(padded, widths, tables)
        R = self.centroid_scores(Q)
        sc = self._scratch
        try:
            r = K.search_many(R, starts, Q, tables, table_offsets, widths, self.query_arrays, b.k, b.ncells,
                              b.threshold, b.n2, b.n3, sc.marks(self.num_documents), sc.slots(self.num_documents),
                              sc.cslots(self.num_centroids))
        except IndexCorruptError as e:
            raise self._named(e) from None
        if r is None:
            return None
        ids, scores, counts = r
        return [(ids[i, : counts[i]], scores[i, : counts[i]]) for i in range(len(queries))]

    def _named(self, e: IndexCorruptError) -> IndexCorruptError:
        """A compiled query's invalid-token error, naming the index files it read."""
        return IndexCorruptError(f"{self.snapshot.path}: index files {self.codes_file}"
                                 f"{', ' + self.norms_file if self.norms_file else ''}: {e}")

    def wait_for_kernels(self) -> None:
        """Return once the compiled kernels that opening the index started loading in the
        background are loaded (at once when nothing is loading); meanwhile searches run the numpy
        kernels (:func:`kernels_cpu.ready`)."""
        K.wait()

    @property
    def independent_rows(self) -> bool:
        """True when a query's row of :meth:`centroid_scores` does not depend on the other rows
        of the call (the compiled float32 product; a BLAS product blocks by the number of rows),
        so the pipeline may score queries in any grouping."""
        return self.precision == "float32" and K.ready()

    # -- stage 1 ---------------------------------------------------------------------------------
    def centroid_scores(self, Qcat: np.ndarray, pool: Optional[ThreadPoolExecutor] = None,
                        threads: int = 1) -> np.ndarray:
        """float32 [sum_m, dim] -> float32 [sum_m, C] (one product for the whole batch): each
        token's products with the int8 scoring rows, times each centroid's factor
        (:func:`plaid.search.pipeline.scoring_centroids`).

        float32 scores come from the compiled kernel (:func:`kernels_cpu.scores_product`), its
        column range split over ``threads`` tasks of ``pool``: the search's threads compute the
        product too (torch's own thread count plays no part). Under the numpy fallback they come
        from torch's float32 product with the same rows and factors (equal bits where its BLAS
        sums in order, as MKL does for whole groups of :data:`BLAS_ROWS` rows: the product is
        padded to them). bfloat16 scores come from torch's product with ``rows * factor``
        rounded to bfloat16."""
        Q = np.ascontiguousarray(Qcat, np.float32)
        if self.precision == "bfloat16":
            if self._scoring_bf16 is None:
                self._scoring_bf16 = torch.from_numpy(scoring_matrix(self.scoring_rows, self.scoring_factor)).to(
                    torch.bfloat16)
            return (torch.from_numpy(Q).to(torch.bfloat16) @ self._scoring_bf16.T).float().numpy()
        if K.ready():
            self._scoring_f32 = None  # the loading window's fallback copy, no longer needed
            if self._scoring_t is None:
                self._scoring_t = K.product_panels(self.scoring_rows)
            C = self.num_centroids
            out = np.empty((len(Q), C), np.float32)
            # a part per thread, each worth handing over (the pool's wake-up costs more than
            # half of a small product: msmarco-5k's 7-token query by 8,192 centroids)
            work = len(Q) * C * Q.shape[1]
            parts = 1 if pool is None else max(1, min(int(threads), -(-C // K.PRODUCT_ALIGN), work // MIN_SPLIT_MACS))
            step = -(-C // (parts * K.PRODUCT_ALIGN)) * K.PRODUCT_ALIGN
            ranges = [(lo, min(lo + step, C)) for lo in range(0, C, step)]
            fac = self.scoring_factor
            # the first range here, the others on the pool's workers (or here, where none takes them)
            done = K.in_parts(pool, lambda p: K.scores_product(Q, self._scoring_t, fac, out, *ranges[p]), len(ranges)) \
                if len(ranges) > 1 else [K.scores_product(Q, self._scoring_t, fac, out, *ranges[0])]
            if all(done):
                return out
        S = self._scoring_f32  # (dropped again once the compiled kernels are in use)
        if S is None:
            S = self._scoring_f32 = torch.from_numpy(self.scoring_rows.astype(np.float32))
        # padded with zero rows to whole groups of BLAS_ROWS: MKL's sgemm then sums each row in
        # order, as the compiled kernel does (a short group takes another code path, whose bits
        # differ for ~40-90% of the scores)
        padded = np.zeros((-(-len(Q) // BLAS_ROWS) * BLAS_ROWS, Q.shape[1]), np.float32)
        padded[: len(Q)] = Q
        R = (torch.from_numpy(padded) @ S.T).numpy()[: len(Q)]
        return np.multiply(R, self.scoring_factor[None, :], out=R)

    def candidates(self, S: QueryScores, cells: np.ndarray) -> np.ndarray:
        listed, _ = stages.list_entries(self.ivf, self.ivf_offsets, self.ivf_blocks, cells)
        mark = self._scratch.marks(self.num_documents)
        if len(mark) > FLAG_SCAN_RATIO * len(listed):
            return np.unique(listed).astype(np.int64)
        try:
            mark[listed] = True
            return np.flatnonzero(mark)
        finally:
            mark[listed] = False

    # -- stages 2 and 3 ----------------------------------------------------------------------------
    def _table(self, S: QueryScores) -> np.ndarray:
        Re = S.cache.get("Re")
        if Re is None:
            Re = S.cache["Re"] = stages.centroid_table(S.R)
        return Re

    def surviving_entries(self, keep: np.ndarray) -> int:
        return int(self.ivf_lens[keep].sum())

    def _table_t(self, S: QueryScores, entries: int) -> Optional[np.ndarray]:
        """The centroid-major copy of the table (kernels_cpu.centroid_table_t), built once per query
        when the candidates hold at least C / 2 centroid entries (below, the copy does not pay)."""
        ReT = S.cache.get("ReT")
        if ReT is None and 2 * entries >= self.num_centroids:
            ReT = S.cache["ReT"] = K.centroid_table_t(self._table(S))
        return ReT

    def pruned_scores(self, S: QueryScores, keep: np.ndarray, docs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        Re = self._table(S)
        counts = self.dcell_offsets[docs + 1] - self.dcell_offsets[docs]
        total = int(counts.sum())
        # read whichever side is shorter (same scores): the surviving centroids' inverted lists,
        # or the candidates' centroids (a low threshold keeps many centroids)
        if self.surviving_entries(keep) <= total:
            slot = self._scratch.slots(self.num_documents)
            return K.approx_maxsim_ivf(Re, keep, docs, self.ivf, self.ivf_offsets, counts, slot, self.ivf_blocks)
        return K.approx_maxsim_docs(Re, keep, docs, self.dcells, self.dcell_offsets, ReT=self._table_t(S, total),
                                    return_covered=True)

    def full_scores(self, S: QueryScores, docs: np.ndarray) -> np.ndarray:
        total = int((self.dcell_offsets[docs + 1] - self.dcell_offsets[docs]).sum())
        return K.approx_maxsim_docs(self._table(S), None, docs, self.dcells, self.dcell_offsets,
                                    ReT=self._table_t(S, total))

    # -- stage 4 -----------------------------------------------------------------------------------
    def token_codes(self, pos: np.ndarray) -> np.ndarray:
        """Centroid ids of the tokens at ``pos`` (int64 [t], ascending), checked against C."""
        return checked_codes(self.codes.take(pos), self.num_centroids,
                             f"{self.snapshot.path}: index files {self.codes_file}")

    def token_norms(self, pos: np.ndarray) -> np.ndarray:
        """Stored norms of the tokens at ``pos``: float32 [t] from one-byte codes (format 3), or
        float16 [t] (format 2) checked finite and positive."""
        if self.norm_values is not None:
            return self.norm_values[self.norms.take(pos)]
        return checked_norms(self.norms.take(pos), f"{self.snapshot.path}: index files {self.norms_file}")

    def token_sims(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """float32 [t, m]: the decompressed tokens at ``pos`` · query tokens ``q`` [m, dim], with no
        vector decoded: centroid score + the codec's byte-table sum (ADC), divided by the norm.

        The centroid terms come from a float32 product of this query with the raw centroids the
        tokens use, never from stage 1's scores (a search's stage 4 takes them from its float32
        stage-1 scores, :meth:`exact_scores` with ``R``: within float32 rounding of these).
        """
        sims = stages.adc_scores(self.codec.score_table(q), self.residuals.take(pos))
        cc = self.token_codes(pos)
        used = np.zeros(self.num_centroids, bool)
        used[cc] = True
        u = np.flatnonzero(used)
        slot = np.empty(self.num_centroids, np.int32)
        slot[u] = np.arange(len(u), dtype=np.int32)
        cs = K.centroid_terms(q, self.centroids, u)  # [m, U], in the kernels' fixed order
        sims += cs.take(slot[cc], axis=1).T
        if self.normalized:  # float16 -> float32 through torch: 4x faster than numpy's cast
            sims /= torch.from_numpy(self.token_norms(pos)).float().numpy()[:, None]
        return sims

    def exact_scores(self, q: np.ndarray, docs: np.ndarray, R: Optional[np.ndarray] = None) -> np.ndarray:
        """Stage 4 by the compiled kernel: one pass over each candidate's tokens (centroid score +
        byte-table sum, / norm, max per query token, sum), reading a single segment's token
        arrays in place and several segments' gathered. The centroid scores come from ``R``
        (float32 [m, C], the query's stage-1 scores, :meth:`centroid_scores`) times
        :attr:`centroid_gain` when both are there, as the compiled query takes them; else from
        float32 products of the raw centroids, identical to :meth:`token_sims` +
        ``stages.maxsim_scores``. (The numpy fallback's R is a BLAS product padded to equal the
        compiled one's bits where the BLAS sums in order, as MKL does: then its final scores
        are the compiled query's too; elsewhere they may differ in the last bits, as its
        stages 1-3 scores may.)"""
        gain = self.centroid_gain if R is not None else None
        try:
            if len(self.codes.parts) == 1:
                norms = self.norms.parts[0] if self.norms is not None else None
                return K.exact_scores(q, self.codec, self.centroids, self.codes.parts[0], self.residuals.parts[0],
                                      norms, self.doc_offsets, docs, self._scratch.cslots(self.num_centroids),
                                      self.norm_values, R=R if gain is not None else None, centroid_gain=gain)
            starts = self.doc_offsets[docs]
            pos, offs = stages.expand_ranges(starts, self.doc_offsets[docs + 1] - starts)
            cc = self.token_codes(pos)
            norms = self.token_norms(pos) if self.normalized else None  # values: float32 or float16
            u, slot = K.used_centroids(cc, offs, np.arange(len(docs), dtype=np.int64), self.num_centroids)
            table = self.codec.score_table(q).numpy()
            cs = K.gained_terms(R, gain, u) if gain is not None else K.centroid_terms(q, self.centroids, u)
            return K.exact_maxsim(table, cs, slot, cc, self.residuals.take(pos), norms, offs)
        except IndexCorruptError as e:
            raise IndexCorruptError(f"{self.snapshot.path}: index files {self.codes_file}"
                                    f"{', ' + self.norms_file if self.norms_file else ''}: {e}") from None

    def decompress(self, pos: np.ndarray) -> np.ndarray:
        """Reconstructed vectors of the tokens at ``pos`` (int64 [t], ascending) -> float32 [t, dim]."""
        D = self.codec.decode_numpy(self.residuals.take(pos))
        D += self.centroids.take(self.token_codes(pos), axis=0)
        if self.normalized:
            D /= self.token_norms(pos)[:, None]
        return D

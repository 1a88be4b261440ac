"""The Searcher: loads an index, picks parameters, batches queries, runs the four stages.

A Searcher holds one committed generation of the index (an immutable ``_State``) until
:meth:`Searcher.reload`; it is safe to share between threads (each search reads the state once,
scratch buffers are per thread). By default on CPU the per-token arrays (centroid codes, residual
codes, norms) stay memory-mapped on disk: only centroids, the inverted file (and, for the numpy
engine, its transpose), document lengths and deletions are loaded into memory.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch

from ..embeddings import advise_random, as_queries
from ..errors import IndexCorruptError, InvalidInputError
from ..store import DocIdTable, Snapshot, checked_codes, checked_norms, open_snapshot, read_manifest, resolve_ids
from ..store import verify as _verify
from . import stages, stages_torch

__all__ = ["Searcher", "Results", "default_search_params"]


@dataclass
class Results:
    """Search results of a batch of queries.

    ids : int64 [nq, k] — document ids (0..N-1, input order), best first; -1 where fewer hits
        (``k`` here is the requested one capped at N, the index's number of documents).
    scores : float32 [nq, k] — MaxSim on the decompressed vectors; -inf where ``ids`` is -1.
    """

    ids: np.ndarray
    scores: np.ndarray
    names: Optional["DocIdTable"] = None  # external ids of the index, when it has them

    def doc_ids(self) -> list:
        """External ids of the hits: a list per query of str (``None`` where ``ids`` is -1).

        Raises :class:`InvalidInputError` when the index was built without ``doc_ids``.
        """
        if self.names is None:
            raise InvalidInputError("this index stores no external doc_ids (build it with doc_ids=...)")
        self.names.validate()  # once per generation: no two live documents share an id
        return [[self.names[i] if i >= 0 else None for i in row] for row in self.ids.tolist()]

    def __iter__(self):  # allows ``ids, scores = searcher.search(...)``
        yield self.ids
        yield self.scores

    def __len__(self) -> int:
        return len(self.ids)


def _cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def default_search_params(k: int) -> dict:
    """Default search parameters by ``k``: ncells, centroid_score_threshold, ndocs.

    k <= 10: 2 / 0.5 / 256; k <= 100: 2 / 0.45 / 1024; larger: 4 / 0.4 / max(4k, 4096).
    These are PLAID's, except ncells=2 (PLAID: 1) for k <= 10: on msmarco-5k one cell per query
    token kept 96.6% of the exact top-10 among the candidates, two cells 99.0%.
    ``ncells`` is a minimum: the searcher probes more cells (x1.5 at a time) while a query has
    fewer than ``max(ndocs, k)`` candidates. PLAID's counts assume ColBERT's 32-token queries;
    shorter queries probe far fewer cells (7-token msmarco-5k queries: recall@100 0.79 with a
    fixed ncells=2, 0.94 with this rule; the ceiling of the index is 0.95).
    """
    if k <= 10:
        return {"ncells": 2, "centroid_score_threshold": 0.5, "ndocs": 256}
    if k <= 100:
        return {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024}
    return {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(4 * k, 4096)}


class _Workspace(threading.local):
    """Per-thread scratch arrays of one document flag each, reused across queries (allocating
    and clearing them per query would cost O(documents)); the stages leave them as found."""

    def marks(self, num_documents: int) -> np.ndarray:
        """bool [num_documents], all False: scratch of :func:`stages.candidates` (left all False)."""
        buf = self.__dict__.get("mark")
        if buf is None or len(buf) != num_documents:
            buf = self.__dict__["mark"] = np.zeros(num_documents, bool)
        return buf

    def slots(self, num_documents: int) -> np.ndarray:
        """int32 [num_documents], all -1: scratch of :func:`stages.pruned_maxsim` (which leaves it all -1)."""
        buf = self.__dict__.get("slot")
        if buf is None or len(buf) != num_documents:
            buf = self.__dict__["slot"] = np.full(num_documents, -1, np.int32)
        return buf


class _State:
    """Everything one committed generation of the index needs for search (read-only once built).

    Built from a store :class:`~plaid.store.Snapshot`, which checked the manifest, every file and
    the in-memory arrays; per-token values that stay on disk are checked where they are read.
    """

    def __init__(self, snap: Snapshot, device: torch.device, load_all: bool, engine: str, precision: str):
        m = snap.manifest
        self.snapshot = snap
        self.manifest = m.to_json()
        self.generation = m.generation
        self.dim = m.dim
        self.num_documents = m.num_documents
        self.num_tokens = m.num_tokens
        self.num_centroids = m.num_centroids
        self.normalized = m.normalized
        self.codec = snap.codec
        centroids = snap.centroids
        ivf, ivf_offsets = snap.ivf, snap.ivf_offsets
        doclens, doc_offsets = snap.doclens, snap.doc_offsets
        deleted = snap.deleted
        self.codes_file = snap.token_files("codes")
        self.norms_file = snap.token_files("norms") if self.normalized else ""
        mmap = not load_all and device.type == "cpu"
        self.codes, self.residuals, self.norms = snap.codes(load=not mmap), snap.residuals(load=not mmap), \
            snap.norms(load=not mmap)
        if mmap:  # searches touch scattered rows: no readahead (measured: cold-cache resident
            for rows in (self.codes, self.residuals, self.norms):  # residual pages after 50 queries
                for a in (rows.parts if rows is not None else []):  # on 50k docs 119 MB -> 25 MB)
                    advise_random(a)
        if not mmap or engine == "torch":  # in memory anyway: check every token's centroid id and norm once
            for a in self.codes.parts:
                checked_codes(a, self.num_centroids, f"{snap.path}: index files {self.codes_file}")
            for a in (self.norms.parts if self.norms is not None else []):
                checked_norms(a, f"{snap.path}: index files {self.norms_file}")
        self.centroids = centroids
        self.ivf, self.ivf_offsets, self.doc_offsets = ivf, ivf_offsets, doc_offsets
        if engine == "numpy":  # stages 2-3 read each document's distinct centroids (the inverted
            # file transposed: 4 B per (centroid, document) pair + 8 B per document, in memory)
            self.dcells, self.dcell_offsets = stages.doc_cells(ivf, ivf_offsets, self.num_documents)
            self.ivf_lens = np.diff(ivf_offsets)
        self.deleted = deleted
        self.alive: Optional[np.ndarray] = None
        if len(deleted):
            self.alive = np.ones(self.num_documents, bool)
            self.alive[deleted] = False
        self.num_live = snap.num_live
        # Stages 1-3 score query tokens against unit centroids when the index holds unit vectors
        # (cosine, the scale PLAID's thresholds are set in); stage 4 scores the raw ones.
        scoring = centroids
        if self.normalized:
            scoring = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        self.scoring = torch.from_numpy(np.ascontiguousarray(scoring, np.float32)).to(device).to(
            torch.bfloat16 if precision == "bfloat16" else torch.float32)
        if engine == "torch":
            self.codec.to(device)
            self.centroids_t = torch.from_numpy(centroids).to(device)
            self.ivf_t = torch.from_numpy(ivf.astype(np.int64)).to(device)
            self.ivf_offsets_t = torch.from_numpy(ivf_offsets).to(device)
            self.doc_offsets_t = torch.from_numpy(doc_offsets).to(device)
            self.codes_t = torch.from_numpy(self.codes.concatenated().astype(np.int64)).to(device)
            self.residuals_t = torch.from_numpy(np.ascontiguousarray(self.residuals.concatenated())).to(device)
            self.norms_t = torch.from_numpy(self.norms.concatenated().astype(np.float32)).to(device) \
                if self.norms is not None else None
            self.alive_t = torch.from_numpy(self.alive).to(device) if self.alive is not None else None
        # external ids: mapped by the snapshot (a map outlives a writer deleting the file)
        self.doc_ids: Optional[DocIdTable] = snap.doc_ids

    def token_codes(self, pos: np.ndarray) -> np.ndarray:
        """Centroid ids of the tokens at ``pos`` (int64 [t], ascending), checked against C."""
        return checked_codes(self.codes.take(pos), self.num_centroids,
                             f"{self.snapshot.path}: index files {self.codes_file}")

    def token_norms(self, pos: np.ndarray) -> np.ndarray:
        """Stored norms (float16 [t]) of the tokens at ``pos``, checked finite and positive."""
        return checked_norms(self.norms.take(pos), f"{self.snapshot.path}: index files {self.norms_file}")


class Searcher:
    """Searches a PLAID index with MaxSim.

    Parameters
    ----------
    path : str or plaid.Index
        The index directory.
    device : str or torch.device, default "cpu"
        Where search runs. "cuda" moves the whole index to the GPU and runs every stage there.
    load_all : bool, default False
        Load the per-token arrays (codes, residuals, norms) into memory. By default (CPU) they stay
        memory-mapped on disk and only centroids, the inverted file (and its transpose, for the
        numpy engine), document lengths and deletions are loaded. Always True on GPU.
    verify : bool, default False
        Check every file's size and CRC-32 before loading (reads the whole index once).
    batch_size : int, default 32
        Queries processed together; bounds the memory of a call.
    centroid_precision : {"auto", "float32", "bfloat16"}, default "auto"
        Precision of the query-centroid scores of stages 1-3 ("auto": bfloat16 on a CPU with
        native bfloat16 arithmetic, which halves the memory traffic of the largest product;
        float32 elsewhere). Stage 4 is always float32. bfloat16 rounding makes exact ties
        between centroid scores more frequent; use float32 for the same candidates in both engines
        (their stage-4 scores then agree to float32 rounding: they sum in different orders).
    engine : {"auto", "numpy", "torch"}, default "auto"
        Implementation of the stages: "numpy" (per query, the fastest on CPU) or "torch"
        (batched over queries; the one used on GPU). "auto" picks by device.
    """

    def __init__(self, path, *, device: Union[str, torch.device] = "cpu", load_all: bool = False,
                 verify: bool = False, batch_size: int = 32, centroid_precision: str = "auto",
                 engine: str = "auto"):
        path = getattr(path, "path", path)
        self.path = os.fspath(path)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InvalidInputError(f"device: {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...)") from None
        if self.device.type not in ("cpu", "cuda"):
            raise InvalidInputError(f"device: {device!r} is not supported; plaid searches on the CPU ('cpu') or "
                                    "on a CUDA GPU ('cuda')")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("device='cuda' was asked for but torch sees no CUDA device")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if centroid_precision not in ("auto", "float32", "bfloat16"):
            raise InvalidInputError(f"centroid_precision must be 'auto', 'float32' or 'bfloat16', got {centroid_precision!r}")
        if engine not in ("auto", "numpy", "torch"):
            raise InvalidInputError(f"engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
        if engine == "numpy" and self.device.type != "cpu":
            raise InvalidInputError("engine='numpy' runs on the CPU only")
        self.engine = engine if engine != "auto" else ("numpy" if self.device.type == "cpu" else "torch")
        if centroid_precision == "auto":
            centroid_precision = "bfloat16" if self.device.type == "cpu" and _cpu_has_native_bf16() else "float32"
        self.centroid_precision = centroid_precision
        self.load_all = bool(load_all)
        self.batch_size = int(batch_size)
        self._ws = _Workspace()
        self._reload_lock = threading.Lock()
        if verify:
            problems = _verify(self.path)
            if problems:
                raise IndexCorruptError(f"{self.path}: index verification failed: " + "; ".join(problems))
        self._state = self._load()

    def _load(self) -> _State:
        """Open the committed generation (the store retries a writer's concurrent commit)."""
        return _State(open_snapshot(self.path), self.device, self.load_all, self.engine, self.centroid_precision)

    def reload(self) -> bool:
        """Switch to the newest committed generation; returns True when it changed.

        Searches running in other threads finish on the generation they started with.
        """
        with self._reload_lock:
            if read_manifest(self.path).generation == self._state.generation:
                return False
            self._state = self._load()
            return True

    # -- facts -------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def num_documents(self) -> int:
        return self._state.num_documents

    @property
    def num_centroids(self) -> int:
        return self._state.num_centroids

    @property
    def normalized(self) -> bool:
        return self._state.normalized

    @property
    def codec(self):
        return self._state.codec

    @property
    def manifest(self) -> dict:
        return self._state.manifest

    @property
    def doc_ids(self) -> Optional["DocIdTable"]:
        """External ids of the index (``doc_ids[i]`` is document i's id; ``.tolist()``), or None."""
        return self._state.doc_ids

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, ncells: Optional[int] = None,
               centroid_score_threshold: Optional[float] = None, ndocs: Optional[int] = None,
               subset=None) -> Results:
        """Top-``k`` documents by MaxSim for each query.

        Parameters
        ----------
        queries : array [m, dim], array [nq, m, dim], or a list of [m_i, dim] arrays (numpy/torch)
        k : int, default 10
            Results per query, a positive int. A ``k`` above the index's number of documents
            (``num_documents``, deleted and empty ones included) is capped at it: the result
            width, the defaults and every internal budget use ``min(k, num_documents)``, so
            ``k=10**13`` allocates nothing for the extra columns.
        ncells : int, optional
            Centroids probed per query token (stage 1). Default by ``k``, see
            :func:`default_search_params`.
        centroid_score_threshold : float, optional
            Stage-2 pruning: only document tokens whose centroid scores at least this for some
            query token count (a query token with none in a document contributes
            ``stages.PRUNED_SCORE``). Pruning never decides alone: when stage 2 would drop
            candidates (more than ``max(ndocs, k)``) while fewer than ``max(ndocs, k)`` of them
            keep a surviving centroid, that query is pruned at ``min(threshold, floor)``
            instead, ``floor`` being the lowest score among the cells stage 1 probed for it
            (the minimum over its tokens of the token's ``ncells``-th best centroid score, at
            the final ``ncells``): every candidate then keeps the centroid it was found through
            and stage 2 ranks them by approximate MaxSim, not by document id. This matters for
            embeddings whose similarity scale is not ColBERT's (no centroid reaching 0.5).
        ndocs : int, optional
            Candidates kept after stage 2; stage 3 keeps ``ndocs // 4`` (at least ``k``).
        subset : ids, or a list of ids per query, optional
            Restrict results to these documents (internal int ids or external str ids; deleted
            ones are ignored, unknown ones raise). A subset of at most ``max(ndocs, 4k)``
            documents is scored exhaustively on the decompressed vectors (exact within it);
            a larger one runs the pipeline with ``ncells`` scaled up by its selectivity.

        Returns
        -------
        Results with ``ids`` int64 [nq, k'] and ``scores`` float32 [nq, k'], best first, where
        ``k' = min(k, num_documents)``; columns beyond a query's hits (fewer candidates, deleted
        or empty documents, a small subset) hold id -1 and score -inf.

        Raises :class:`InvalidInputError` for a ``k``, ``ncells`` or ``ndocs`` that is not a
        positive int, a non-finite threshold, and queries that :func:`plaid.embeddings.as_queries`
        refuses.
        """
        st = self._state  # one generation for the whole call
        k, params = self._params(k, ncells, centroid_score_threshold, ndocs, st.num_documents)
        qs = as_queries(queries, dim=st.dim)
        subsets = self._subsets(st, subset, len(qs))
        ids = np.full((len(qs), k), -1, dtype=np.int64)
        scores = np.full((len(qs), k), -np.inf, dtype=np.float32)
        with torch.inference_mode():
            for b in range(0, len(qs), self.batch_size):
                batch = qs[b : b + self.batch_size]
                bsub = None if subsets is None else subsets[b : b + self.batch_size]
                run = self._search_batch_numpy if self.engine == "numpy" else self._search_batch_torch
                for i, (bi, bs) in enumerate(run(st, batch, bsub, k, **params)):
                    ids[b + i, : len(bi)] = bi
                    scores[b + i, : len(bs)] = bs
        return Results(ids, scores, st.doc_ids)

    @staticmethod
    def _params(k, ncells, threshold, ndocs, num_documents: int):
        """Validated ``(k, params)``: ``k`` capped at ``num_documents`` (the result width, and
        the k every budget and default is computed from), params the stage parameters."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), max(1, int(num_documents)))
        params = default_search_params(k)
        for name, v in (("ncells", ncells), ("ndocs", ndocs)):
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                    raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
                params[name] = int(v)
        if threshold is not None:
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise InvalidInputError(f"centroid_score_threshold must be a number, got {threshold!r}") from None
            if not np.isfinite(threshold):
                raise InvalidInputError("centroid_score_threshold must be a finite number")
            params["centroid_score_threshold"] = threshold
        return k, params

    def _subsets(self, st: _State, subset, nq: int) -> Optional[List[np.ndarray]]:
        """One sorted int64 array of live, non-empty document ids per query, or None."""
        if subset is None:
            return None
        per_query = isinstance(subset, (list, tuple)) and len(subset) > 0 and all(
            isinstance(s, (list, tuple, set, frozenset, np.ndarray)) for s in subset)
        if per_query and len(subset) != nq:
            raise InvalidInputError(f"subset: {len(subset)} subsets given for {nq} queries")
        groups = list(subset) if per_query else [subset]
        out = []
        doclens = np.diff(st.doc_offsets)
        for g in groups:
            if isinstance(g, (str, bytes, int, np.integer)):
                g = [g]
            ids = _resolve_subset(st, list(g.tolist() if isinstance(g, np.ndarray) else g))
            ids = ids[doclens[ids] > 0]
            if st.alive is not None:
                ids = ids[st.alive[ids]]
            out.append(ids)
        return out if per_query else out * nq

    def _centroid_scores(self, st: _State, Qcat: torch.Tensor) -> torch.Tensor:
        """float32 [sum_m, C]: scores of every centroid for every query token of the batch."""
        return (Qcat.to(st.scoring.dtype) @ st.scoring.T).float()

    # -- numpy engine (CPU) -------------------------------------------------------------------
    def decompress(self, pos: np.ndarray) -> np.ndarray:
        """Reconstructed vectors of the tokens at positions ``pos`` (int64 [t], ascending) -> float32 [t, dim].

        centroid + decoded residual, divided by its stored norm when the index was built from
        unit vectors. Stage 4 scores are exact MaxSim on exactly these vectors.
        """
        st = self._state
        pos = np.asarray(pos, dtype=np.int64)
        D = st.codec.decode_numpy(st.residuals.take(pos))
        D += st.centroids.take(st.token_codes(pos), axis=0)
        if st.normalized:
            D /= st.token_norms(pos)[:, None]
        return D

    def _stage4_sims(self, st: _State, pos: np.ndarray, q: np.ndarray) -> np.ndarray:
        """float32 [t, m]: the decompressed tokens at ``pos`` · query tokens ``q`` [m, dim], with
        no vector decoded (see :mod:`plaid.search.stages`).

        The centroid terms come from a float32 product of this query with the raw centroids the
        tokens use (found by a flag scan), never from the batched (possibly bfloat16) scores of
        stages 1-3: a query's scores do not depend on the batch it came in.
        """
        sims = stages.adc_scores(st.codec.score_table(q), st.residuals.take(pos))
        cc = st.token_codes(pos)
        used = np.zeros(st.num_centroids, bool)
        used[cc] = True
        u = np.flatnonzero(used)
        slot = np.empty(st.num_centroids, np.int32)
        slot[u] = np.arange(len(u), dtype=np.int32)
        # [m, u] orientation: torch's float32 product with few columns is 3x slower the other way
        cs = (torch.from_numpy(q) @ torch.from_numpy(np.take(st.centroids, u, axis=0)).T).numpy()
        sims += cs.take(slot[cc], axis=1).T
        if st.normalized:  # float16 -> float32 through torch: 4x faster than numpy's cast
            sims /= torch.from_numpy(st.token_norms(pos)).float().numpy()[:, None]
        return sims

    def _exact(self, st: _State, q: np.ndarray, docs: np.ndarray, k: int):
        """Stage 4 for one query: exact MaxSim of ``docs`` (sorted, non-empty) on decompressed vectors."""
        starts = st.doc_offsets[docs]
        pos, offs = stages.expand_ranges(starts, st.doc_offsets[docs + 1] - starts)
        exact = stages.maxsim_scores(self._stage4_sims(st, pos, q), offs)
        top = stages.top_n(exact, k)
        return docs[top], exact[top]

    def _search_batch_numpy(self, st: _State, qs, subsets, k: int, ncells: int,
                            centroid_score_threshold: float, ndocs: int):
        Qcat = torch.from_numpy(np.concatenate(qs))
        S_all = self._centroid_scores(st, Qcat).numpy()  # [sum_m, C]
        out = []
        row = 0
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        for qi, q in enumerate(qs):
            m = q.shape[0]
            R = S_all[row : row + m]  # [m, C], contiguous
            row += m
            sub = None if subsets is None else subsets[qi]
            nc = ncells
            if sub is not None:
                if len(sub) == 0:
                    out.append(empty)
                    continue
                if len(sub) <= max(ndocs, 4 * k):  # small subset: exact within it
                    out.append(self._exact(st, q, sub, k))
                    continue
                nc = _scaled_ncells(ncells, len(sub), st)
            # stage 1: candidate generation; ncells is a minimum: probe more cells while there are
            # fewer candidates than stage 2 keeps (short queries probe few cells per query)
            target = max(ndocs, k)
            cuts = stages.CellCuts(R)
            mark = self._ws.marks(st.num_documents)
            while True:
                docs = stages.candidates(R, nc, st.ivf, st.ivf_offsets, cuts, mark)
                if st.alive is not None:
                    docs = docs[st.alive[docs]]
                if sub is not None:
                    docs = docs[np.isin(docs, sub, assume_unique=True)]
                if len(docs) >= target or nc >= st.num_centroids:
                    break
                nc = min(st.num_centroids, nc + max(1, nc // 2))
            if len(docs) == 0:
                out.append(empty)
                continue
            Re = stages.centroid_table(R)  # [m, C + 1]
            sel = np.arange(len(docs))
            n2 = max(ndocs, k)
            n3 = max(ndocs // 4, k)
            if len(docs) > n2:  # stage 2: pruned centroid interaction (a no-op when all are kept)
                counts = st.dcell_offsets[docs + 1] - st.dcell_offsets[docs]
                keep = stages.surviving(R, centroid_score_threshold)
                listed = int(st.ivf_lens[keep].sum())  # entries of the surviving lists >= covered candidates
                approx = None
                if listed >= n2:
                    approx, covered = self._pruned_numpy(st, keep, Re, docs, counts, listed)
                    n_covered = int(covered.sum())
                else:  # fewer than n2 can be covered: straight to the fallback, without counting them
                    n_covered = listed
                if n_covered < n2:  # fallback: pruning never decides alone (stages.fallback_threshold)
                    threshold = stages.fallback_threshold(centroid_score_threshold, n_covered, n2,
                                                          stages.probed_floor(cuts, nc))
                    if threshold < centroid_score_threshold or approx is None:
                        keep = stages.surviving(R, threshold)
                        approx, _ = self._pruned_numpy(st, keep, Re, docs, counts, int(st.ivf_lens[keep].sum()))
                sel = np.sort(stages.top_n(approx, n2))
            if len(sel) > n3:  # stage 3: full centroid interaction over stage 2's survivors
                offs, cells = stages.document_cells(docs[sel], st.dcells, st.dcell_offsets)
                approx = stages.approximate_maxsim(Re, cells, offs)
                sel = sel[np.sort(stages.top_n(approx, n3))]
            # stage 4: exact MaxSim on the decompressed vectors
            out.append(self._exact(st, q, docs[sel], k))
        return out

    def _pruned_numpy(self, st: _State, keep: np.ndarray, Re: np.ndarray, docs: np.ndarray, counts: np.ndarray,
                      listed: int):
        """Stage 2 of the numpy engine: (pruned approximate MaxSim float32 [n], covered bool [n]:
        the candidates that keep a centroid). keep: bool [C] from :func:`stages.surviving`;
        counts: int64 [n], each candidate's number of distinct centroids; listed: the entries of
        the surviving centroids' inverted lists (``ivf_lens[keep].sum()``)."""
        # read whichever side is shorter: the surviving centroids' inverted lists, or the
        # candidates' centroids (a low threshold keeps many centroids)
        if listed <= counts.sum():
            slot = self._ws.slots(st.num_documents)
            return stages.pruned_maxsim(keep, Re, docs, st.ivf, st.ivf_offsets, counts, slot, return_covered=True)
        offs, cells = stages.document_cells(docs, st.dcells, st.dcell_offsets)
        return (stages.approximate_maxsim(Re, stages.pruned_cells(cells, keep), offs),
                stages.covered_documents(cells, keep, offs))

    # -- torch engine (GPU, or CPU for testing) ---------------------------------------------------
    def _search_batch_torch(self, st: _State, qs, subsets, k: int, ncells: int,
                            centroid_score_threshold: float, ndocs: int):
        dev = self.device
        nq, m = len(qs), max(q.shape[0] for q in qs)
        Qnp = np.zeros((nq, m, st.dim), np.float32)
        mask = np.zeros((nq, m), bool)
        for i, q in enumerate(qs):
            Qnp[i, : len(q)] = q
            mask[i, : len(q)] = True
        Q = torch.from_numpy(Qnp).to(dev)
        qmask = torch.from_numpy(mask).to(dev)
        # same product as the numpy engine ([C, sum_m]), so both round identically
        S2 = self._centroid_scores(st, torch.from_numpy(np.concatenate(qs)).to(dev))  # [sum_m, C]
        S = torch.zeros((nq, m, S2.shape[1]), dtype=S2.dtype, device=dev)
        S[qmask] = S2  # real tokens in (query, position) order
        take_codes = lambda pos: st.codes_t[pos]  # noqa: E731

        def decompress(pos):
            D = st.centroids_t[st.codes_t[pos]] + st.codec.decode(st.residuals_t[pos])
            return D / st.norms_t[pos].unsqueeze(1) if st.normalized else D

        N = st.num_documents
        exhaustive = None
        nc = ncells
        if subsets is not None:
            sizes = [len(s) for s in subsets]
            small = [len(s) <= max(ndocs, 4 * k) for s in subsets]
            exhaustive = [(qi, s) for qi, (s, sm) in enumerate(zip(subsets, small)) if sm]
            nc = [ncells if sm else _scaled_ncells(ncells, sz, st) for sz, sm in zip(sizes, small)]
            sub_keys = torch.from_numpy(np.concatenate(
                [qi * N + s for qi, s in enumerate(subsets) if not small[qi]] + [np.zeros(0, np.int64)])).to(dev)
        nc = torch.as_tensor(nc, dtype=torch.long, device=dev).expand(nq).clone()
        while True:  # probe more cells for the queries with fewer than max(ndocs, k) candidates
            pq, pd = stages_torch.candidate_pairs(S, qmask, nc, st.ivf_t, st.ivf_offsets_t, N)
            if st.alive_t is not None:
                live = st.alive_t[pd]
                pq, pd = pq[live], pd[live]
            if subsets is not None:
                keep = torch.isin(pq * N + pd, sub_keys)
                pq, pd = pq[keep], pd[keep]
            short = (torch.bincount(pq, minlength=nq) < max(ndocs, k)) & (nc < st.num_centroids)
            if exhaustive:
                short[[qi for qi, _ in exhaustive]] = False
            if not bool(short.any()):
                break
            nc = torch.where(short, (nc + (nc // 2).clamp(min=1)).clamp(max=st.num_centroids), nc)
        if exhaustive:  # small subsets: every subset document goes straight to stage 4
            eq = torch.cat([torch.full((len(s),), qi, dtype=torch.long) for qi, s in exhaustive]).to(dev)
            ed = torch.cat([torch.from_numpy(s) for _, s in exhaustive]).to(dev)
        if pq.numel():
            n2 = max(ndocs, k)
            table = stages_torch.prune_centroid_scores(S, qmask, centroid_score_threshold).transpose(1, 2).contiguous()
            approx, covered = stages_torch.approximate_scores(
                table, pq, pd, st.doc_offsets_t, take_codes,
                covered_by=stages_torch.surviving(S, qmask, centroid_score_threshold))
            # fallback (stages.fallback_threshold): a query whose stage 2 would drop candidates
            # while fewer than it keeps have a surviving centroid is pruned at its probed floor
            low = (torch.bincount(pq, minlength=nq) > n2) & (torch.bincount(pq[covered], minlength=nq) < n2)
            if bool(low.any()):
                floor = stages_torch.probed_floor(S, qmask, nc)
                thr = torch.where(low, floor.clamp(max=centroid_score_threshold),
                                  torch.full_like(floor, centroid_score_threshold))
                redo = low[pq]
                table = stages_torch.prune_centroid_scores(S, qmask, thr).transpose(1, 2).contiguous()
                approx[redo] = stages_torch.approximate_scores(table, pq[redo], pd[redo], st.doc_offsets_t, take_codes)
            pq, pd = self._select(stages_torch.top_pairs(approx, pq, nq, n2), pq, pd)
            table = S.masked_fill(~qmask.unsqueeze(2), 0.0).transpose(1, 2).contiguous()
            approx = stages_torch.approximate_scores(table, pq, pd, st.doc_offsets_t, take_codes)
            pq, pd = self._select(stages_torch.top_pairs(approx, pq, nq, max(ndocs // 4, k)), pq, pd)
        if exhaustive:
            key = torch.unique(torch.cat([pq * N + pd, eq * N + ed]))
            pq, pd = key // N, key % N
        if pq.numel():
            exact = stages_torch.exact_scores(Q, pq, pd, st.doc_offsets_t, decompress)
            keep = stages_torch.top_pairs(exact, pq, nq, k)
        else:
            exact = torch.zeros(0, device=dev)
            keep = torch.full((nq, 0), -1, dtype=torch.long, device=dev)
        keep = keep.cpu().numpy()
        pd_np, ex_np = pd.cpu().numpy(), exact.float().cpu().numpy()
        return [(pd_np[row[row >= 0]], ex_np[row[row >= 0]]) for row in keep]

    @staticmethod
    def _select(keep: torch.Tensor, pq: torch.Tensor, pd: torch.Tensor):
        """Flatten the valid entries of ``keep`` [nq, n] back into pairs sorted by (query, doc)."""
        sel = torch.sort(keep[keep >= 0]).values
        return pq[sel], pd[sel]

    def __repr__(self) -> str:
        return (f"Searcher({self.path!r}, documents={self.num_documents}, centroids={self.num_centroids}, "
                f"generation={self.generation}, device={self.device}, engine={self.engine!r})")


def _scaled_ncells(ncells: int, subset_size: int, st: _State) -> int:
    """More cells for a selective subset, so about as many candidates fall inside it."""
    live = max(1, st.num_live)
    return int(min(st.num_centroids, max(ncells, math.ceil(ncells * live / max(1, subset_size)))))


def _resolve_subset(st: _State, ids: list) -> np.ndarray:
    """Sorted unique internal ids named by a subset (external str or internal int ids; deleted
    ones are kept here and dropped by the caller)."""
    return np.unique(resolve_ids(ids, st.num_documents, st.doc_ids, st.deleted, what="subset", deleted_ok=True))

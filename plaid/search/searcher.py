"""The Searcher: opens one committed generation, validates queries and parameters, batches,
runs the pipeline on an engine, and returns arrays.

A Searcher holds one generation (its engine state, built from the store's snapshot) until
:meth:`Searcher.reload`; it is safe to share between threads (each search reads the state once;
the engines' scratch buffers are per thread). By default on CPU the per-token arrays (centroid
ids, residual codes, norms) stay memory-mapped: only centroids, the inverted file and its
transpose, document lengths and deletions are loaded into memory.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch

from ..embeddings import as_queries
from ..errors import IndexCorruptError, InvalidInputError
from ..store import DocIdTable, Snapshot, open_snapshot, read_manifest, resolve_ids
from ..store import verify as _verify
from . import pipeline
from .params import SearchParams, default_search_params

__all__ = ["Searcher", "Results", "SearchParams", "default_search_params"]


@dataclass
class Results:
    """Search results of a batch of queries.

    ids : int64 [nq, k] — document ids (0..N-1, input order), best first; -1 where fewer hits.
    scores : float32 [nq, k] — MaxSim on the decompressed vectors; -inf where ``ids`` is -1.
    """

    ids: np.ndarray
    scores: np.ndarray
    names: Optional[DocIdTable] = None  # external ids of the index, when it has them

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


class _Generation:
    """One committed generation as the searcher uses it: the snapshot and the engine over it."""

    def __init__(self, snap: Snapshot, engine):
        m = snap.manifest
        self.snapshot, self.engine = snap, engine
        self.generation, self.dim, self.num_documents = m.generation, m.dim, m.num_documents
        self.search_depth = m.search_depth
        self.doc_ids: Optional[DocIdTable] = snap.doc_ids
        self.doclens = snap.doclens
        self.manifest = m.to_json()


class Searcher:
    """Searches a PLAID index with MaxSim.

    Parameters
    ----------
    path : str or plaid.Index
        The index directory.
    device : str or torch.device, default "cpu"
        Where search runs. "cuda" moves the whole index to the GPU and runs every stage there,
        with the CPU engine's results; it is not faster today (an H200: ~4-5 ms per query against
        1.2-1.9 ms on one CPU core, each stage a round trip to the host;
        ``benchmarks/results/gpu.md``).
    load_all : bool, default False
        Load the per-token arrays (centroid ids, residual codes, norms) into memory. By default
        (CPU) they stay memory-mapped on disk. Always True on GPU.
    verify : bool, default False
        Check every file's size, CRC-32 and values before loading (reads the whole index once).
    batch_size : int, default 32
        Queries processed together (one query-centroid product per batch); bounds the memory of a
        call. Searches on several threads with the compiled CPU kernels take queries in parts of
        at most 8 per thread instead (:func:`plaid.search.pipeline.search_batch`).
    centroid_precision : {"auto", "float32", "bfloat16"}, default "auto"
        Precision of the query-centroid scores of stages 1-3 ("auto": float32: the centroids'
        int8 rows times a float32 factor each). Stage 4 is always float32. bfloat16 scores a
        bfloat16 matrix of the same rows times their factors (twice the int8 rows' memory) and,
        on a CPU with native bfloat16 arithmetic (AVX512-BF16, AMX), speeds up the product of
        large batches (32 queries x 8,192 centroids: 0.42 against 0.65 ms on one core) but not
        of one query (7 tokens x 65,536 centroids: 2.4 against 2.1 ms); its product is torch's,
        on torch's threads rather than ``num_threads``, and its rounding makes exact ties
        between centroid scores more frequent, so the candidates can differ from float32's.
    engine : {"auto", "numpy", "torch"}, default "auto"
        Kernels of the stages: "numpy" (CPU; the fastest there) or "torch" (any device; the
        one used on GPU). "auto" picks by device. Both run the same pipeline
        (:mod:`plaid.search.pipeline`): they differ in how a stage is computed, never in what it keeps.
    num_threads : int or None, default None
        Threads a search uses (None: ``torch.get_num_threads()``, usually the cores). On the
        CPU engine they first share the batch's query-centroid product (by ranges of
        centroids), then run one query each at a time, every query's stages 1-4 in one compiled
        call that releases the GIL; nothing else runs meanwhile, so the cores are not
        oversubscribed (torch's own threads take no part, except under the numpy fallback or
        with bfloat16 centroid scores, where the product is torch's). A single query uses them
        for its product and, on a large index (an inverted file of 2**24 entries or more, about
        200k+ documents), for its stage 2 and stage 4 in parts (the same results;
        :func:`plaid.search.kernels_cpu.search_query`). ``SearchParams(threads=...)`` overrides it
        per call.
    """

    def __init__(self, path, *, device: Union[str, torch.device] = "cpu", load_all: bool = False,
                 verify: bool = False, batch_size: int = 32, centroid_precision: str = "auto",
                 engine: str = "auto", num_threads: Optional[int] = None):
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
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer))
                                        or num_threads <= 0):
            raise InvalidInputError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        if centroid_precision not in ("auto", "float32", "bfloat16"):
            raise InvalidInputError(f"centroid_precision must be 'auto', 'float32' or 'bfloat16', got {centroid_precision!r}")
        if engine not in ("auto", "numpy", "torch"):
            raise InvalidInputError(f"engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
        if engine == "numpy" and self.device.type != "cpu":
            raise InvalidInputError("engine='numpy' runs on the CPU only")
        self.engine = engine if engine != "auto" else ("numpy" if self.device.type == "cpu" else "torch")
        if centroid_precision == "auto":
            centroid_precision = "float32"
        self.centroid_precision = centroid_precision
        self.load_all = bool(load_all)
        self.batch_size = int(batch_size)
        self.num_threads = None if num_threads is None else int(num_threads)
        self._reload_lock = threading.Lock()
        self._pools: dict = {}
        self._closed = False
        if verify:
            problems = _verify(self.path)
            if problems:
                raise IndexCorruptError(f"{self.path}: index verification failed: " + "; ".join(problems))
        self._state = self._load()

    def _load(self) -> _Generation:
        """Open the committed generation (the store retries a writer's concurrent commit)."""
        snap = open_snapshot(self.path)
        if self.engine == "numpy":
            from .engine_cpu import CPUEngine

            eng = CPUEngine(snap, load_all=self.load_all, precision=self.centroid_precision)
        else:
            from .engine_torch import TorchEngine

            eng = TorchEngine(snap, self.device, precision=self.centroid_precision)
        return _Generation(snap, eng)

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
        return self._state.engine.num_centroids

    @property
    def search_depth(self) -> int:
        """The index's search depth: default ``ndocs`` is this many times PLAID's (the manifest's
        ``search.depth``, recorded by the preset the index was built with; see
        :class:`plaid.SearchParams`)."""
        return self._state.search_depth

    @property
    def normalized(self) -> bool:
        return self._state.engine.normalized

    @property
    def codec(self):
        return self._state.engine.codec

    @property
    def manifest(self) -> dict:
        return self._state.manifest

    @property
    def doc_ids(self) -> Optional[DocIdTable]:
        """External ids of the index (``doc_ids[i]`` is document i's id; ``.tolist()``), or None."""
        return self._state.doc_ids

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, ncells: Optional[int] = None,
               centroid_score_threshold: Optional[float] = None, ndocs: Optional[int] = None,
               subset=None, params: Optional[SearchParams] = None, trace: bool = False) -> Results:
        """Top-``k`` documents by MaxSim for each query.

        Parameters
        ----------
        queries : array [m, dim], array [nq, m, dim], or a list of [m_i, dim] arrays (numpy/torch)
        k : int, default 10
            Results per query, a positive int. A ``k`` above the index's number of documents
            (``num_documents``, deleted and empty ones included) is capped at it: the result
            width, the defaults and every internal budget use ``min(k, num_documents)``, so
            ``k=10**13`` allocates nothing for the extra columns.
        ncells, centroid_score_threshold, ndocs :
            Overrides of the defaults by ``k`` (``ndocs``'s times :attr:`search_depth`): see
            :class:`plaid.SearchParams` (the pipeline's rules, the pruning fallback included,
            are in :mod:`plaid.search.pipeline`).
        subset : ids, or a list of ids per query, optional
            Restrict results to these documents (internal int ids or external str ids; deleted
            ones are ignored, unknown ones raise). A subset of at most ``max(ndocs, 4k)``
            documents is scored exhaustively on the decompressed vectors (exact within it);
            a larger one runs the pipeline with ``ncells`` scaled up by its selectivity.
        params : SearchParams, optional
            All of ``k``, ``ncells``, ``centroid_score_threshold``, ``ndocs`` and ``threads`` at
            once (then the separate arguments must be left at their defaults).
        trace : bool, default False
            Record what each stage kept, per query, in ``Results.traces`` (for tests and profiles).

        Returns
        -------
        Results with ``ids`` int64 [nq, k'] and ``scores`` float32 [nq, k'], best first, where
        ``k' = min(k, num_documents)``; columns beyond a query's hits (fewer candidates, deleted
        or empty documents, a small subset) hold id -1 and score -inf.

        Raises :class:`InvalidInputError` for parameters out of range (see
        :class:`plaid.SearchParams`) and queries that :func:`plaid.embeddings.as_queries` refuses.
        """
        if params is None:
            params = SearchParams(k=k, ncells=ncells, centroid_score_threshold=centroid_score_threshold, ndocs=ndocs)
        elif not isinstance(params, SearchParams):
            raise InvalidInputError(f"params must be a plaid.SearchParams, got {type(params).__name__}")
        elif (k, ncells, centroid_score_threshold, ndocs) != (10, None, None, None):
            raise InvalidInputError("pass either params=SearchParams(...) or k/ncells/centroid_score_threshold/ndocs")
        st = self._state  # one generation for the whole call
        b = params.budgets(st.num_documents, self.num_threads or torch.get_num_threads(), st.search_depth)
        qs = as_queries(queries, dim=st.dim)
        subsets = self._subsets(st, subset, len(qs))
        ids = np.full((len(qs), b.k), -1, dtype=np.int64)
        scores = np.full((len(qs), b.k), -np.inf, dtype=np.float32)
        traces = [pipeline.Trace() for _ in qs] if trace else None
        pool = self._pool(b.threads)
        with torch.inference_mode():
            hits = pipeline.search_batch(st.engine, qs, b, subsets, traces, pool, self.batch_size)
        for i, (bi, bs) in enumerate(hits):
            ids[i, : len(bi)] = bi
            scores[i, : len(bs)] = bs
        res = Results(ids, scores, st.doc_ids)
        if traces is not None:
            res.traces = traces
        return res

    def _pool(self, threads: int) -> Optional[ThreadPoolExecutor]:
        """A worker pool of ``threads`` threads (kept for reuse), or None for one thread (and once
        closed)."""
        if threads <= 1 or self._closed:
            return None
        pool = self._pools.get(threads)
        if pool is None:
            with self._reload_lock:
                pool = self._pools.get(threads)
                if pool is None and not self._closed:
                    pool = self._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="plaid-search")
        return pool

    def _subsets(self, st: _Generation, subset, nq: int) -> Optional[List[np.ndarray]]:
        """One sorted int64 array of live, non-empty document ids per query, or None."""
        if subset is None:
            return None
        per_query = isinstance(subset, (list, tuple)) and len(subset) > 0 and all(
            isinstance(s, (list, tuple, set, frozenset, np.ndarray)) for s in subset)
        if per_query and len(subset) != nq:
            raise InvalidInputError(f"subset: {len(subset)} subsets given for {nq} queries")
        groups = list(subset) if per_query else [subset]
        out = []
        alive = st.engine.alive
        for g in groups:
            if isinstance(g, (str, bytes, int, np.integer)):
                g = [g]
            g = list(g.tolist() if isinstance(g, np.ndarray) else g)
            ids = np.unique(resolve_ids(g, st.num_documents, st.doc_ids, st.snapshot.deleted, what="subset",
                                        deleted_ok=True))
            ids = ids[st.doclens[ids] > 0]
            if alive is not None:
                ids = ids[alive[ids]]
            out.append(ids)
        return out if per_query else out * nq

    def decompress(self, pos: np.ndarray) -> np.ndarray:
        """Reconstructed vectors of the tokens at positions ``pos`` (int64 [t], ascending) -> float32 [t, dim].

        centroid + decoded residual, divided by its stored norm when the index was built from
        unit vectors. Stage 4 scores are exact MaxSim on exactly these vectors.
        """
        return self._state.engine.decompress(np.asarray(pos, dtype=np.int64))

    def close(self) -> None:
        """Stop the worker threads (a closed Searcher still searches, on one thread; searches
        running meanwhile finish, the parts their pool no longer takes on their own thread)."""
        with self._reload_lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.shutdown(wait=False)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Searcher({self.path!r}, documents={self.num_documents}, centroids={self.num_centroids}, "
                f"generation={self.generation}, device={self.device}, engine={self.engine!r})")

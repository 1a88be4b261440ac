"""Compiled CPU kernels for the numpy engine's stages 2-4 (numba), with a numpy fallback.

Each kernel does in one loop over the candidates what :mod:`plaid.search.stages` does in
several vectorised numpy passes, with no intermediate the size of (entries or tokens) x query
tokens:

* :func:`approx_maxsim_docs` — stages 2-3 from the document side: approximate MaxSim over each
  candidate's distinct centroids (:func:`stages.doc_cells`), pruned or not;
* :func:`approx_maxsim_ivf` — stage 2 from the inverted file's side: only the surviving
  centroids' lists are read (:func:`stages.pruned_maxsim`);
* :func:`used_centroids` — the distinct centroids of the candidates' tokens, which stage 4
  scores against the query with one BLAS product outside the kernels;
* :func:`exact_maxsim` — stage 4: exact MaxSim from centroid ids, residual codes and norms
  through the codec's per-query table (asymmetric distance computation), over gathered tokens;
* :func:`exact_maxsim_ranges` — the same reading the per-token arrays (memory-mapped or not) in
  place by each candidate's token range, validating the centroid ids and norms it reads;
* :func:`gained_terms` — stage 4's centroid terms from stage 1's float32 scores,
  ``R[:, u] * centroid_gain[u]`` (what the engine uses; :func:`plaid.search.pipeline.centroid_gain`);
* :func:`centroid_terms` — stage 4's centroid terms ``q @ centroids[u].T`` in one fixed
  summation order (the kernel's and numpy's alike; where no float32 stage-1 scores exist);
* :func:`exact_scores` — all of stage 4 for one query (table, centroids used, their scores, kernel);
* :func:`search_query` — stages 1-4 of one query in ONE call (over :class:`QueryArrays`): the
  pipeline's decisions compiled, so that a query's work runs without the GIL from its centroid
  scores to its hits (numba only; the fallback runs the pipeline's stages). On a large index, a
  single query given idle threads runs the same compiled parts from here instead, stage 2's
  inverted lists and stage 4's candidates split over the threads (:func:`_search_query_split`).

**Equality.** Results are bit-identical to the numpy path: the same float32 operations in the
same order. Stages 2-3 sum the per-token maxima sequentially over query tokens i = 0..m-1, as
numpy's ``[m, n].sum(0)`` does (but numpy's pairwise order when ``n == 1``: the array is then a
single contiguous column); stage 4 adds the ``code_bytes`` table entries in order from 0 (as
``embedding_bag``), then the centroid score, divides by the norm (IEEE division), and sums the
per-token maxima in numpy's pairwise order (``[n, m].sum(1)``). Stage 4's centroid terms are
either one float32 multiply of the stage-1 score (:func:`gained_terms`) or float32 products added
in order over the dimensions (:func:`centroid_terms`: no BLAS); either way the kernel and the
fallback agree bit for bit (within ~1e-6 of a BLAS product).
``tests/test_kernels_cpu.py`` compares with ``==``.

**Compilation.** Importing this module imports neither numba nor compiles anything. The first
call imports :mod:`plaid.search._kernels_numba` (numba), and each kernel compiles on its first
call for its argument types, with ``cache=True`` (later processes load it from numba's cache:
``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the source or a user cache directory). Kernels
release the GIL (``nogil``): threads can run them for different queries at once.

**Fallback.** When numba cannot be imported, when ``PLAID_NO_NUMBA`` is set (to anything but
``""`` or ``"0"``), or when a kernel fails to compile, every kernel runs a vectorised numpy
implementation (the stages of :mod:`plaid.search.stages`) with the same results, and ONE
:class:`RuntimeWarning` says why (once per process, or per :func:`reset`). :func:`backend` says
which one is in use.

**Edge cases** (the numpy stages never pass them; defined here): a candidate without centroids
(stages 2-3) or without tokens (stage 4) scores -inf and is not covered; an empty candidate
list gives empty results.
"""
from __future__ import annotations

import os
import threading
import weakref
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from .. import _loading
from ..errors import IndexCorruptError
from . import stages

__all__ = ["backend", "reset", "warmup", "in_parts", "ivf_args", "candidates", "centroid_table_t", "approx_maxsim_docs",
           "approx_maxsim_ivf",
           "used_centroids", "centroid_terms", "gained_terms", "scores_product", "product_panels", "exact_maxsim", "exact_maxsim_ranges", "exact_scores", "QueryArrays",
           "search_query", "search_many"]

_NEG_INF = np.float32(-np.inf)

# -- backend selection (lazy: once per process, or per reset()) -----------------------------------
_lock = threading.RLock()
_backend: Optional[str] = None  # "numba" | "numpy"; None until resolved
_warned = False
_nb = None  # the plaid.search._kernels_numba module once imported


def _fallback(reason: str) -> None:
    global _backend, _warned
    _backend = "numpy"
    if not _warned:
        _warned = True
        warnings.warn(f"plaid: compiled CPU kernels unavailable ({reason}); using the numpy implementation "
                      "(same results, slower)", RuntimeWarning, stacklevel=4)


def backend() -> str:
    """``"numba"`` or ``"numpy"``: the implementation the kernels use. The first call decides
    (importing numba, ~0.3 s; compiling nothing)."""
    global _backend, _nb
    if _backend is None:
        with _lock:
            if _backend is None:
                flag = os.environ.get("PLAID_NO_NUMBA", "")
                if flag not in ("", "0"):
                    _fallback(f"PLAID_NO_NUMBA={flag}")
                else:
                    try:
                        from . import _kernels_numba
                        _nb = _kernels_numba
                        _backend = "numba"
                    except Exception as e:  # ImportError, or a broken numba / llvmlite install
                        _fallback(f"numba could not be imported: {type(e).__name__}: {e}")
    return _backend


def reset() -> None:
    """Forget the backend choice, the warning and which warmups were done: the next call decides
    again (for tests)."""
    global _backend, _warned
    with _lock:
        _backend = None
        _warned = False
        _warmed.clear()


def ready() -> bool:
    """True when this thread may run the compiled kernels now: the backend is numba and no
    background :func:`warmup` is still loading them (else a search runs the numpy kernels, the
    same results, rather than wait ~0.5-1 s for numba's start-up or ~20 s for a cold compile).
    Decides the backend when nothing is loading."""
    return not _loading.busy() and backend() == "numba"


def wait(timeout: Optional[float] = None) -> bool:
    """Wait until no background warmup (:func:`warmup`) runs, at most ``timeout`` seconds; True
    when none is left."""
    return _loading.wait(timeout)


# the arguments each kernel writes; every other array is passed read-only, so that one compiled
# specialisation serves in-memory and memory-mapped (read-only) inputs alike
_OUTPUTS = {"candidates": (5, 6), "transpose_table": (1,), "approx_docs": (7, 8), "approx_docs_strided": (6, 7),
            "approx_ivf": (7, 8, 9), "used_centroids": (4,), "exact": (11,), "stage4": (13, 14),
            "centroid_terms": (), "scores_product": (3,), "search_query": (24, 25, 26, 27),
            "query_head": (9, 10), "query_stages23": (9, 10, 17, 18, 20, 21), "ranked": (2,), "kept_at": (2, 3),
            "candidate_entries": (), "ivf_bits": (), "ivf_accumulate": (7, 8),
            "search_many": (27, 28, 29, 30, 31, 32)}


def _ro(a):
    if not isinstance(a, np.ndarray) or not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def _run(name: str, *args):
    """``(result,)`` of numba kernel ``name``, or None when the numpy fallback is (or has just
    become, the kernel failing to compile) in use."""
    if not ready():
        return None
    outs = _OUTPUTS[name]
    args = [a if i in outs else _ro(a) for i, a in enumerate(args)]
    try:
        return (getattr(_nb, name)(*args),)
    except MemoryError:
        raise
    except Exception as e:  # typing / lowering / LLVM failure: numpy from now on
        with _lock:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fallback(f"numba failed to compile {name}: {type(e).__name__}: {first}")
        return None


def warmup(codes_dtype=np.uint16, background: bool = False, search_only: bool = False, one_call: bool = True):
    """Decide the backend and compile (or load from numba's cache) the kernels for the argument
    types a search uses, on tiny inputs, so that the first search pays none of it.

    codes_dtype: the index's centroid-id dtype (uint16, or int32 above 65536 centroids);
    background: run in a daemon thread and return it (else run here and return None);
    search_only: only the kernels a search of a one-segment index runs (the query-centroid
    product, :func:`search_query` and :func:`search_many`), not the per-stage ones; one_call:
    False leaves out :func:`search_query` and :func:`search_many` (an index of several segments
    never runs them, and they are the longest to compile: ~15 s cold). The CPU engine starts
    this in the background when it opens an index: numba's own start-up (its import, ~0.3 s, its
    first use, ~0.4 s, then ~10 ms per cached kernel) overlaps the opening, and searches made
    meanwhile run the numpy kernels (:func:`ready`) instead of waiting for it. A warmup already
    done for the same arguments returns at once (no thread).
    """
    dt = np.dtype(codes_dtype).str
    parts = {("query", dt)} | ({("one_call", dt)} if one_call else set()) | (set() if search_only else {("stages", dt)})
    if parts <= _warmed:
        return None
    if background:
        return _loading.start(lambda: warmup(codes_dtype, False, search_only, one_call), "plaid-kernels-warmup")
    with _loading.as_loader():  # compile here even while a background warmup runs
        if backend() != "numba":
            return None
        _warm(codes_dtype, search_only, one_call)
    _warmed.update(parts)
    return None


#: What the warmups done have loaded: ("query" | "one_call" | "stages", codes dtype) (:func:`_warm`'s
#: three parts); a warmup that needs nothing more returns at once
_warmed: set = set()


def _warm(codes_dtype, search_only: bool, one_call: bool) -> None:
    """:func:`warmup`'s calls of every kernel on tiny inputs."""
    rng = np.random.default_rng(0)
    C, N, m = 8, 3, 2
    Re = stages.centroid_table(rng.random((m, C), dtype=np.float32))
    ivf = np.array([0, 1, 2, 0], np.int32)
    ivf_offsets = np.array([0, 1, 2, 3, 4, 4, 4, 4, 4], np.int64)
    # uint16 cells: what a searcher holds up to 65,536 centroids (stages.doc_cells(narrow=True))
    dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, N, narrow=True)
    ivf, ivf_blocks = stages.split_ids(ivf, ivf_offsets, N)  # and uint16 ids (the CPU engine's)
    docs = np.arange(N, dtype=np.int64)
    codes = np.array([0, 1, 2], codes_dtype)
    offsets = np.arange(N + 1, dtype=np.int64)
    table = rng.random((256, m), dtype=np.float32)
    dim = 4
    cents = rng.random((C, dim), dtype=np.float32)
    q = rng.random((m, dim), dtype=np.float32)
    # the CPU engine's two calls (one-byte, float16 norms and none give the same argument types)
    scores_product(q, product_panels((cents * 100).astype(np.int8)), np.ones(C, np.float32), np.empty((m, C), np.float32),
                   0, C)
    arrays = QueryArrays(cents, ivf, ivf_offsets, dcells, dcell_offsets, offsets, codes, np.zeros((N, 1), np.uint8),
                         np.zeros(N, np.uint8), None, norm_values=np.ones(256, np.float32), ivf_blocks=ivf_blocks,
                         centroid_gain=np.ones(C, np.float32))
    if one_call:
        search_query(Re[:, :C].copy(), q, table, arrays, 2, 1, 0.5, 2, 1, np.zeros(N, bool),
                     np.full(N, -1, np.int32), np.full(C, -1, np.int32))
        search_many(Re[:, :C].copy(), np.array([0, m]), q, table.ravel(), np.array([0, table.size]), np.array([m]),
                    arrays, 2, 1, 0.5, 2, 1, np.zeros(N, bool), np.full(N, -1, np.int32), np.full(C, -1, np.int32))
        # a single query on several threads: its parts (every cell probed, nothing pruned, one part)
        _search_query_split(_ro(Re[:, :C].copy()), _ro(q), _ro(table), arrays, 2, C, -1e30, 1, 1, np.zeros(N, bool),
                            np.full(N, -1, np.int32), np.full(C, -1, np.int32), np.zeros(5, np.int64), None, 1, 0)
    try:  # the codecs' query rotation (it warns and falls back to BLAS by itself where it fails)
        from .._codecs_numba import rotate_rows

        rotate_rows(q, np.eye(dim), np.empty_like(q))
    except Exception:
        pass
    if search_only:
        return None
    keep = rng.random(C) < 0.5
    counts = dcell_offsets[1:] - dcell_offsets[:-1]
    candidates(Re[:, :C], 2, ivf, ivf_offsets, np.zeros(N, bool), ivf_blocks)
    candidates(Re[:, :C], 2, ivf, ivf_offsets, np.zeros(1000, bool), ivf_blocks)  # the sorting branch
    for cells in (dcells, dcells.astype(np.int32)):  # uint16, and int32 (above 65,536 centroids)
        approx_maxsim_docs(Re, keep, docs, cells, dcell_offsets, ReT=centroid_table_t(Re))
        approx_maxsim_docs(Re, keep, docs[:1], cells, dcell_offsets)  # few entries: the strided kernel
    approx_maxsim_ivf(Re, keep, docs, ivf, ivf_offsets, counts, np.full(N, -1, np.int32), ivf_blocks)
    u, slot = used_centroids(codes, offsets, docs, C)
    exact_maxsim(table, rng.random((m, len(u)), dtype=np.float32), slot, codes, np.zeros((N, 1), np.uint8),
                 np.ones(N, np.float16), offsets)
    centroid_terms(q, cents, u)
    return None


def ivf_args(ivf: np.ndarray, ivf_offsets: np.ndarray, ivf_blocks: Optional[np.ndarray] = None):
    """The inverted file as the kernels take it: (ids uint16 or int32 [P], offsets int64 [C + 1],
    blocks int64 [C * H + 1]). ``ivf_blocks`` None: ``ivf`` holds whole ids (H = 1); else ``ivf``
    holds their low 16 bits (:func:`plaid.search.stages.split_ids`). Raises ValueError for blocks
    that do not refine the offsets (C * H + 1 non-decreasing positions from 0 to P, every H-th an
    offset). Read-only blocks and offsets are checked once (the CPU engine's: its per-query calls
    at a million documents would read 8 MB each time)."""
    ivf = np.ascontiguousarray(ivf, np.uint16 if np.asarray(ivf).dtype == np.uint16 else np.int32)
    ivf_offsets = np.ascontiguousarray(ivf_offsets, np.int64)
    if ivf_blocks is None:
        return ivf, ivf_offsets, ivf_offsets
    blocks = np.ascontiguousarray(ivf_blocks, np.int64)
    frozen = blocks is ivf_blocks and not blocks.flags.writeable and not ivf_offsets.flags.writeable
    seen = _CHECKED_BLOCKS.get(id(blocks)) if frozen else None
    if seen is not None and seen[0]() is blocks and seen[1]() is ivf_offsets and seen[2] == len(ivf) \
            and ivf.dtype == np.uint16:
        return ivf, ivf_offsets, blocks  # the same read-only arrays as checked before
    C = len(ivf_offsets) - 1
    if ivf.dtype != np.uint16 or C < 1 or (len(blocks) - 1) % C or len(blocks) < len(ivf_offsets) \
            or int(blocks[0]) != 0 or int(blocks[-1]) != len(ivf) \
            or not np.array_equal(blocks[:: (len(blocks) - 1) // C], ivf_offsets) \
            or bool((blocks[1:] < blocks[:-1]).any()):
        raise ValueError("ivf_blocks must refine ivf_offsets (C * H + 1 non-decreasing positions) over uint16 ids")
    if frozen:
        for k in [k for k, v in _CHECKED_BLOCKS.items() if v[0]() is None]:  # forget freed arrays
            _CHECKED_BLOCKS.pop(k, None)
        _CHECKED_BLOCKS[id(blocks)] = (weakref.ref(blocks), weakref.ref(ivf_offsets), len(ivf))
    return ivf, ivf_offsets, blocks


#: id(blocks) -> (weak blocks, weak offsets, P) of the read-only arrays :func:`ivf_args` has checked
#: (a freed array's id may be reused: the weak references must still name the arrays passed).
_CHECKED_BLOCKS: dict = {}


#: Up to this ``ncells``, :func:`candidates` finds each token's ``ncells``-th best score in the
#: kernel (one pass with a small sorted buffer); above, with ``torch.topk``.
KTH_IN_KERNEL = 64


# -- stage 1 --------------------------------------------------------------------------------------
def candidates(R: np.ndarray, ncells: int, ivf: np.ndarray, ivf_offsets: np.ndarray,
               mark: np.ndarray, ivf_blocks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Stage 1 in one pass: :meth:`plaid.search.pipeline.CellCuts.cells` + the inverted file with the ``ncells``-th best scores found here.

    R: float32 [m, C] centroid scores (token-major); ncells: centroids probed per token; ivf,
    ivf_offsets, ivf_blocks: the inverted file (:func:`ivf_args`); mark: bool [N] scratch, all
    False (left all False; one per thread). Returns (docs int64 [n]: the sorted distinct documents listed under every
    centroid scoring at least some token's ``ncells``-th best score, exact ties all kept; kth
    float32 [m]: those scores, i.e. ``stages.CellCuts(R).kth(ncells)``, or each token's lowest
    score when ``ncells >= C``, so that ``kth.min()`` is :func:`stages.probed_floor`). Equal to
    ``stages.candidates(R, ncells, ivf, ivf_offsets)``.
    """
    R = np.ascontiguousarray(R, np.float32)
    m, C = R.shape
    if len(ivf_offsets) != C + 1:
        raise ValueError("ivf_offsets does not match R's number of centroids")
    if mark.dtype != np.bool_ or not mark.flags.c_contiguous or not mark.flags.writeable:
        raise ValueError("mark must be a writable contiguous bool array")
    ncells = int(ncells)
    if ncells <= 0:
        raise ValueError("ncells must be positive")
    from .pipeline import CellCuts

    kth = np.empty(m, np.float32)
    cuts = CellCuts(R)
    have_kth = KTH_IN_KERNEL < ncells < C  # many cells: torch.topk's, not the kernel's insertion buffer
    if have_kth:
        kth[:] = cuts.kth(ncells)
    ivf, ivf_offsets, ivf_blocks = ivf_args(ivf, ivf_offsets, ivf_blocks)
    r = _run("candidates", R, ncells, ivf, ivf_offsets, ivf_blocks, mark, kth, have_kth)
    if r is not None:
        return r[0], kth
    docs = np.unique(stages.list_entries(ivf, ivf_offsets, ivf_blocks, cuts.cells(ncells))[0])
    kth = R.min(1) if ncells >= C else np.array(cuts.kth(ncells), np.float32)
    return docs, kth


# -- stages 2-3 -----------------------------------------------------------------------------------
_NO_KEEP = np.zeros(1, np.bool_)


def centroid_table_t(Re: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The centroid-major copy of ``Re`` that :func:`approx_maxsim_docs` reads: float32
    [C + 1, W], row c holding ``Re[:, c]`` in its first m columns, W = m rounded up to a
    multiple of 8 (the other columns are never read and left as they are). Build it once per
    query to share between stages 2 and 3. Re: float32 [m, C + 1]; out: optional float32
    [C + 1, >= m] C-contiguous buffer to write into and return (reusing one per thread avoids a
    fresh allocation's page faults, ~half the cost at 16k centroids)."""
    Re = np.ascontiguousarray(Re, np.float32)
    m, C1 = Re.shape
    if out is None:
        out = np.empty((C1, -(-m // 8) * 8), np.float32)
    elif out.dtype != np.float32 or out.shape[0] != C1 or out.shape[1] < m or not out.flags.c_contiguous:
        raise ValueError(f"out must be float32 [{C1}, >= {m}], C-contiguous")
    if _run("transpose_table", Re, out) is None:
        out[:, :m] = Re.T
    return out


def approx_maxsim_docs(Re: np.ndarray, keep: Optional[np.ndarray], docs: np.ndarray, dcells: np.ndarray,
                       dcell_offsets: np.ndarray, *, ReT: Optional[np.ndarray] = None, return_covered: bool = False):
    """Stages 2-3, document side: approximate MaxSim over each candidate's distinct centroids.

    Re: float32 [m, C + 1] (:func:`stages.centroid_table`; column C is ``PRUNED_SCORE``); keep:
    bool [C] (:func:`stages.surviving`; a centroid not kept reads column C) or None (no pruning:
    stage 3); docs: int64 [n] candidate ids; dcells: int32 or uint16 [P], dcell_offsets: int64 [N + 1]
    (:func:`stages.doc_cells`); ReT: optional :func:`centroid_table_t` of ``Re`` (when None it is
    built here if the candidates hold at least C / 2 centroid entries, where the copy pays:
    measured break-even ~0.5 C on 8k and 16k centroids; below, ``Re`` is read as is). Returns float32 [n]: per candidate, the sum over query tokens i of
    the max over its (pruned) centroids c of ``Re[i, c]``; with ``return_covered`` also bool [n]:
    the candidates keeping at least one centroid (with keep None: having one).

    Bit-identical to ``stages.approximate_maxsim(Re, stages.pruned_cells(cells, keep), offs)``
    (or over ``cells``) and ``stages.covered_documents(cells, keep, offs)`` over
    ``offs, cells = stages.document_cells(docs, dcells, dcell_offsets)``.
    """
    Re = np.ascontiguousarray(Re, np.float32)
    m, C1 = Re.shape
    if keep is not None and len(keep) != C1 - 1:
        raise ValueError(f"keep has {len(keep)} entries for {C1 - 1} centroids")
    if ReT is not None and (ReT.shape[0] != C1 or ReT.shape[1] < m):
        raise ValueError(f"ReT has shape {ReT.shape}, expected [{C1}, >= {m}]")
    docs = np.ascontiguousarray(docs, np.int64)
    dcells = _cells_arg(dcells)  # no copy of uint16
    dcell_offsets = np.ascontiguousarray(dcell_offsets, np.int64)
    n = len(docs)
    out = np.empty(n, np.float32)
    covered = np.empty(n, np.bool_)
    kp = _NO_KEEP if keep is None else np.ascontiguousarray(keep, np.bool_)
    done = False
    if n and ready():
        if ReT is None and 2 * int((dcell_offsets[docs + 1] - dcell_offsets[docs]).sum()) >= C1 - 1:
            ReT = centroid_table_t(Re)
        if ReT is not None:
            done = _run("approx_docs", np.ascontiguousarray(ReT, np.float32), m, kp, keep is not None, docs, dcells,
                        dcell_offsets, out, covered) is not None
        else:
            done = _run("approx_docs_strided", Re, kp, keep is not None, docs, dcells, dcell_offsets, out,
                        covered) is not None
    if not done:
        out, covered = _np_approx_docs(Re, keep, docs, dcells, dcell_offsets)
    return (out, covered) if return_covered else out


def approx_maxsim_ivf(Re: np.ndarray, keep: np.ndarray, docs: np.ndarray, ivf: np.ndarray, ivf_offsets: np.ndarray,
                      cell_counts: np.ndarray, slot: np.ndarray,
                      ivf_blocks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Stage 2, inverted-file side: the pruned scores of :func:`approx_maxsim_docs`, reading only
    the inverted lists of the centroids in ``keep``.

    Re: float32 [m, C + 1]; keep: bool [C]; docs: int64 [n] distinct candidate ids; ivf,
    ivf_offsets, ivf_blocks: the inverted file (:func:`ivf_args`); cell_counts: int64 [n], each
    candidate's number of distinct centroids; slot: int32 [N] scratch, all -1 (left all -1; one
    per thread). Each kept centroid's scores are max-ed into its listed candidates' rows of a
    [n, m] array; a candidate
    with fewer listed centroids than ``cell_counts`` also gets ``PRUNED_SCORE`` per token.
    Returns (float32 [n] scores, bool [n] covered: listed under a kept centroid), bit-identical
    to ``stages.pruned_maxsim(..., return_covered=True)``.
    """
    Re = np.ascontiguousarray(Re, np.float32)
    if len(keep) != Re.shape[1] - 1 or len(ivf_offsets) != Re.shape[1]:
        raise ValueError("keep / ivf_offsets do not match Re's number of centroids")
    if slot.dtype != np.int32 or not slot.flags.c_contiguous or not slot.flags.writeable:
        raise ValueError("slot must be a writable contiguous int32 array")
    docs = np.ascontiguousarray(docs, np.int64)
    ivf, ivf_offsets, ivf_blocks = ivf_args(ivf, ivf_offsets, ivf_blocks)
    out = np.empty(len(docs), np.float32)
    covered = np.empty(len(docs), np.bool_)
    if len(docs) and ready():
        # the kernel takes the candidates ascending (a listed document's row is its rank)
        order = None if np.all(docs[1:] > docs[:-1]) else np.argsort(docs, kind="stable")
        counts = np.ascontiguousarray(cell_counts, np.int64)
        sd, sc = (docs, counts) if order is None else (docs[order], counts[order])
        o, cv = (out, covered) if order is None else (np.empty_like(out), np.empty_like(covered))
        if _run("approx_ivf", Re, np.ascontiguousarray(keep, np.bool_), sd, ivf, ivf_offsets, ivf_blocks, sc, slot,
                o, cv) is not None:
            if order is not None:
                out[order], covered[order] = o, cv
            return out, covered
    if not len(docs):
        return out, covered
    return stages.pruned_maxsim(keep, Re, docs, ivf, ivf_offsets, cell_counts, slot, return_covered=True,
                                ivf_blocks=ivf_blocks)


# -- stage 4 --------------------------------------------------------------------------------------
def used_centroids(codes: np.ndarray, doc_offsets: np.ndarray, docs: np.ndarray,
                   num_centroids: int) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct centroids of the tokens of ``docs``, reading ``codes`` in place.

    codes: uint16/int32 [T] centroid id of every token (may be memory-mapped); doc_offsets: int64
    [N + 1]; docs: int64 [n]. Returns (u int64 [U] ascending, slot int32 [C] with ``slot[u[k]] =
    k`` and -1 elsewhere). Raises :class:`IndexCorruptError` for an id outside [0, C).
    """
    codes = _codes_arg(codes)
    docs = np.ascontiguousarray(docs, np.int64)
    doc_offsets = np.ascontiguousarray(doc_offsets, np.int64)
    slot = np.full(int(num_centroids), -1, np.int32)
    r = _run("used_centroids", codes, doc_offsets, docs, int(num_centroids), slot)
    if r is not None:
        u, bad = r[0]
        if bad >= 0:
            raise IndexCorruptError(f"token {bad}: centroid id {int(codes[bad])} out of range "
                                    f"({num_centroids} centroids)")
        return u, slot
    starts = doc_offsets[docs]
    pos, _ = stages.expand_ranges(starts, doc_offsets[docs + 1] - starts)
    cc = codes[pos]
    if len(cc) and (int(cc.min()) < 0 or int(cc.max()) >= num_centroids):
        raise IndexCorruptError(f"token centroid ids out of range ({num_centroids} centroids)")
    used = np.zeros(int(num_centroids), bool)
    used[cc] = True
    u = np.flatnonzero(used)
    slot[u] = np.arange(len(u), dtype=np.int32)
    return u, slot


_NO8 = np.zeros(1, np.uint8)
_NO32 = np.zeros(1, np.float32)


def _norm_args(norms, values=None):
    """The stored norms as the kernels read them (the one place that interprets them; see
    ``_kernels_numba.token_norms``): (mode, codes uint8, values float32, table float32) — mode 0
    no norms; 1 one-byte codes (format 3) looked up in ``values`` (float32 [256], the index's
    ``norm_values``, checked when it opened); 2 float32 values; 3 float16 norms (format 2), their
    bytes (little-endian bit patterns, two per token) decoded exactly in the kernel. The codes
    argument is uint8 in every mode: one compiled signature serves every index."""
    if norms is None:
        return 0, _NO8, _NO32, _NO32
    norms = np.asarray(norms)
    if values is not None:
        if norms.dtype != np.uint8:
            raise ValueError("stage 4: norm codes must be uint8 when norm values are given")
        return 1, np.ascontiguousarray(norms), _NO32, np.ascontiguousarray(values, np.float32)
    if norms.dtype == np.uint8:
        raise ValueError("stage 4: one-byte norm codes need their norm values")
    if norms.dtype == np.float16:
        return 3, np.ascontiguousarray(norms, "<f2").view(np.uint8), _NO32, _NO32
    return 2, _NO8, np.ascontiguousarray(norms, np.float32), _NO32


def _cells_arg(dcells):
    """The transposed inverted file as the kernels take it: uint16 as it is (no copy), else int32."""
    dcells = np.asarray(dcells)
    return np.ascontiguousarray(dcells, np.uint16 if dcells.dtype == np.uint16 else np.int32)


def _codes_arg(codes):
    codes = np.asarray(codes)
    if codes.dtype not in (np.uint16, np.int32):
        codes = codes.astype(np.int64)
    return np.ascontiguousarray(codes)


def _check_stage4(table, cs, slot, residuals, t, norms):
    if table.ndim != 2 or cs.ndim != 2 or residuals.ndim != 2 or table.shape[0] != residuals.shape[1] * 256 \
            or cs.shape[0] != table.shape[1]:
        raise ValueError(f"stage 4 shapes: table {table.shape}, cs {cs.shape}, residuals {residuals.shape}")
    if len(residuals) != t or (norms is not None and len(norms) != t):
        raise ValueError("stage 4: codes, residuals and norms must have one row per token")
    if slot.dtype != np.int32 or slot.ndim != 1:
        raise ValueError("stage 4: slot must be int32 [C]")


def exact_maxsim(table: np.ndarray, cs: np.ndarray, slot: np.ndarray, codes: np.ndarray, residuals: np.ndarray,
                 norms: Optional[np.ndarray], offsets: np.ndarray,
                 norm_values: Optional[np.ndarray] = None) -> np.ndarray:
    """Stage 4: exact MaxSim of candidates from their gathered tokens' codes, without decoding.

    table: float32 [code_bytes * 256, m] (``codec.score_table(q)`` as numpy); cs: float32 [m, U],
    the query's scores of the U centroids the tokens use (``q @ centroids[u].T``: one BLAS product,
    outside); slot: int32 [C], centroid id -> column of ``cs`` (:func:`used_centroids`); codes:
    uint16/int32 [t], residuals: uint8 [t, code_bytes], norms: float16/float32 [t], or uint8
    codes [t] into ``norm_values`` (float32 [256]), or None: the candidates' tokens; offsets: int64 [n + 1] delimiting each candidate's tokens. Returns
    float32 [n]: ``sum_i max_t (sum_j table[j*256 + r_tj, i] + cs[i, slot[c_t]]) / norm_t``.

    Bit-identical to ``stages.maxsim_scores(Searcher._stage4_sims(...), offsets)``. Raises
    :class:`IndexCorruptError` for a centroid id outside ``slot`` or unmapped by it, or a norm
    that is not finite and positive.
    """
    offsets = np.ascontiguousarray(offsets, np.int64)
    n = len(offsets) - 1
    return exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, offsets, np.arange(max(n, 0)), norm_values)


def exact_maxsim_ranges(table: np.ndarray, cs: np.ndarray, slot: np.ndarray, codes: np.ndarray,
                        residuals: np.ndarray, norms: Optional[np.ndarray], doc_offsets: np.ndarray,
                        docs: np.ndarray, norm_values: Optional[np.ndarray] = None) -> np.ndarray:
    """Stage 4 reading the per-token arrays in place: :func:`exact_maxsim` of ``docs``.

    codes [T], residuals [T, code_bytes], norms [T] or None: every token of one segment
    (memory-mapped or in memory: no gathered copy is made); doc_offsets: int64 [N + 1] token
    offsets of the documents; docs: int64 [n]. Other arguments and the result as
    :func:`exact_maxsim`. The centroid ids and norms read are validated before scoring (an
    :class:`IndexCorruptError` names the token's position), as ``checked_codes`` and
    ``checked_norms`` do on gathered ones.
    """
    table = np.ascontiguousarray(table, np.float32)
    cs = np.ascontiguousarray(cs, np.float32)
    doc_offsets = np.ascontiguousarray(doc_offsets, np.int64)
    docs = np.ascontiguousarray(docs, np.int64)
    codes = _codes_arg(codes)
    residuals = np.asarray(residuals)
    if residuals.dtype != np.uint8:
        raise ValueError("stage 4: residuals must be uint8")
    residuals = np.ascontiguousarray(residuals)
    _check_stage4(table, cs, slot, residuals, len(codes), norms)
    if len(docs):
        if int(docs.min()) < 0 or int(docs.max()) + 1 >= len(doc_offsets):
            raise ValueError("stage 4: docs outside doc_offsets")
        lo, hi = doc_offsets[docs], doc_offsets[docs + 1]
        if int(lo.min()) < 0 or int(hi.max()) > len(codes):
            raise ValueError("stage 4: the documents' token ranges run past the token arrays")
    mode, n8, n32, lut = _norm_args(norms, norm_values)
    out = np.empty(len(docs), np.float32)
    r = _run("exact", table, cs, slot, codes, residuals, mode, n8, n32, lut, doc_offsets, docs, out) \
        if len(docs) else (-1,)
    if r is None:
        starts = doc_offsets[docs]
        pos, offs = stages.expand_ranges(starts, doc_offsets[docs + 1] - starts)
        return _np_exact(table, cs, slot, codes, residuals, norms, pos, offs, norm_values)
    if r[0] >= 0:
        raise IndexCorruptError(f"stage 4: token {r[0]}: centroid id or norm invalid (id {int(codes[r[0]])})")
    return out


def centroid_terms(q: np.ndarray, centroids: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Stage 4's centroid terms: float32 [m, U], ``q @ centroids[u].T`` summed in one fixed order.

    q: float32 [m, dim]; centroids: float32 [C, dim] (raw); u: int64 [U] centroid ids. Each score
    is the float32 products ``q[i, d] * c[d]`` added in order d = 0, 1, ... from 0, never fused,
    by the kernel and by numpy alike: a query's scores depend on neither the batch nor the BLAS
    (within ~1e-6 of a float32 BLAS product)."""
    q = np.ascontiguousarray(q, np.float32)
    u = np.ascontiguousarray(u, np.int64)
    r = _run("centroid_terms", q, np.ascontiguousarray(centroids, np.float32), u)
    if r is not None:
        return r[0]
    return _np_centroid_terms(q, centroids, u)


def gained_terms(R: np.ndarray, centroid_gain: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Stage 4's centroid terms from stage 1's scores: float32 [m, U], ``R[:, u] * centroid_gain[u]``
    (one float32 multiply each, as the kernel's :func:`stage4` does). R: float32 [m, C] the
    query's float32 centroid scores; centroid_gain: float32 [C]
    (:func:`plaid.search.pipeline.centroid_gain`); u: int64 [U] centroid ids."""
    u = np.asarray(u, np.int64)
    return np.ascontiguousarray(np.asarray(R, np.float32)[:, u] * np.asarray(centroid_gain, np.float32)[u])


#: Column ranges of :func:`scores_product` handed to different threads start at multiples of
#: this (the kernel's panel of centroids).
PRODUCT_ALIGN = 48


def product_panels(rows: np.ndarray) -> np.ndarray:
    """The scoring rows (int8 [C, dim], :func:`plaid.search.pipeline.scoring_centroids`) in the
    layout :func:`scores_product` reads: int8 [ceil(C / 48) * dim, 48], panel b holding rows
    48 b .. 48 b + 47 transposed (``P[b * dim + d, j] = rows[48 b + j, d]``), zero past C. Each
    panel is one contiguous 6 KB block (dim 128): read as a single stream, where the [dim, C]
    transpose needs dim."""
    S = np.asarray(rows)
    if S.dtype != np.int8:
        raise ValueError(f"product_panels: int8 rows expected, got {S.dtype}")
    C, dim = S.shape
    nb = -(-C // PRODUCT_ALIGN)
    padded = np.zeros((nb * PRODUCT_ALIGN, dim), np.int8)
    padded[:C] = S
    panels = padded.reshape(nb, PRODUCT_ALIGN, dim).transpose(0, 2, 1)  # [nb, dim, 48]
    return np.ascontiguousarray(panels).reshape(nb * dim, PRODUCT_ALIGN)


def scores_product(Q: np.ndarray, P: np.ndarray, factor: np.ndarray, out: np.ndarray, c_lo: int, c_hi: int) -> bool:
    """The query-centroid scores ``out[:, c_lo:c_hi] = (Q @ S[c_lo:c_hi].T) * factor[c_lo:c_hi]``
    by the compiled kernel (fused multiply-adds over the dimensions in order, then one rounded
    multiply: a row's scores do not depend on the batch; equal to a BLAS sgemm that sums in that
    order, as MKL's does, times the factors). Q: float32 [M, dim] C-contiguous; P: the int8
    scoring rows S as :func:`product_panels` lays them out; factor: float32 [C], C-contiguous; out: float32
    [M, C] C-contiguous, written in place (disjoint ranges from different threads); c_lo a
    multiple of :data:`PRODUCT_ALIGN` (or the range empty). Returns False when the numpy
    fallback is in use (the caller multiplies with torch instead)."""
    if not ready():
        return False
    panels_cover = P.shape[1] == PRODUCT_ALIGN and P.shape[0] >= -(-c_hi // PRODUCT_ALIGN) * Q.shape[1]
    aligned = c_lo == c_hi or c_lo % PRODUCT_ALIGN == 0
    factor_ok = factor.dtype == np.float32 and factor.ndim == 1 and factor.flags.c_contiguous
    if not (0 <= c_lo <= c_hi <= out.shape[1] <= factor.shape[-1] and aligned and panels_cover and P.dtype == np.int8
            and factor_ok):
        raise ValueError(f"scores_product: range [{c_lo}, {c_hi}) does not fit panels {P.shape} {P.dtype} / "
                         f"factors {factor.shape} / out {out.shape}")
    return _run("scores_product", Q, P, factor.reshape(1, -1), out, int(c_lo), int(c_hi)) is not None


def exact_scores(q: np.ndarray, codec, centroids: np.ndarray, codes: np.ndarray, residuals: np.ndarray,
                 norms: Optional[np.ndarray], doc_offsets: np.ndarray, docs: np.ndarray,
                 cslot: Optional[np.ndarray] = None, norm_values: Optional[np.ndarray] = None,
                 R: Optional[np.ndarray] = None, centroid_gain: Optional[np.ndarray] = None) -> np.ndarray:
    """All of stage 4 for one query, reading the token arrays in place.

    q: float32 [m, dim]; codec: the index's :class:`~plaid.codecs.ResidualCodec`; centroids:
    float32 [C, dim] (raw); codes, residuals, norms, doc_offsets, docs: as
    :func:`exact_maxsim_ranges` (``norm_values``: float32 [256] when ``norms`` are one-byte
    codes); cslot: optional int32 [C] scratch, all -1 (left so). Builds the
    ADC table (``codec.score_table``), finds the centroids used, scores them and runs the kernel.
    The centroid scores: with ``R`` float32 [m, C] (the query's float32 stage-1 scores) and
    ``centroid_gain`` float32 [C] (:func:`plaid.search.pipeline.centroid_gain`) both given,
    ``R[:, u] * centroid_gain[u]`` (:func:`gained_terms`); else :func:`centroid_terms`. Returns
    float32 [n], bit-identical to :func:`exact_maxsim_ranges` over those scores. Raises
    :class:`IndexCorruptError` for a token whose centroid id or norm is invalid.
    """
    q = np.ascontiguousarray(q, np.float32)
    table = codec.score_table(q).numpy()
    docs = np.ascontiguousarray(docs, np.int64)
    doc_offsets = np.ascontiguousarray(doc_offsets, np.int64)
    codes = _codes_arg(codes)
    residuals = np.ascontiguousarray(residuals)
    C = len(centroids)
    _check_stage4(table, np.zeros((len(q), 0), np.float32), np.zeros(C, np.int32), residuals, len(codes), norms)
    if len(docs):
        if int(docs.min()) < 0 or int(docs.max()) + 1 >= len(doc_offsets):
            raise ValueError("stage 4: docs outside doc_offsets")
        if int(doc_offsets[docs].min()) < 0 or int(doc_offsets[docs + 1].max()) > len(codes):
            raise ValueError("stage 4: the documents' token ranges run past the token arrays")
    gained = R is not None and centroid_gain is not None and len(centroid_gain) > 0
    if gained:
        R = np.ascontiguousarray(R, np.float32)
        gain = _gain_arg(centroid_gain)
        if R.shape != (len(q), C) or gain.shape != (C,):
            raise ValueError(f"stage 4: R {R.shape} and centroid_gain {gain.shape} must be [m, C] and [C] "
                             f"(m={len(q)}, C={C})")
    else:
        R, gain = np.zeros((len(q), 0), np.float32), _gain_arg(None)
    mode, ncodes, nvalues, ntable = _norm_args(norms, norm_values)
    out = np.empty(len(docs), np.float32)
    if cslot is None:
        cslot = np.full(C, -1, np.int32)
    r = _run("stage4", R, gain, q, table, np.ascontiguousarray(centroids, np.float32), codes, residuals, mode, ncodes,
             nvalues, ntable, doc_offsets, docs, cslot, out)
    if r is None:
        u, slot = used_centroids(codes, doc_offsets, docs, C)
        cs = gained_terms(R, gain, u) if gained else centroid_terms(q, centroids, u)
        return exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, doc_offsets, docs, norm_values)
    if r[0] >= 0:
        raise IndexCorruptError(f"stage 4: token {r[0]}: centroid id or norm invalid (id {int(codes[r[0]])})")
    return out


# -- stages 1-4 of one query ----------------------------------------------------------------------------
class QueryArrays:
    """The index arrays :func:`search_query` reads, checked and converted once per generation.

    centroids float32 [C, dim] (raw); ivf, ivf_offsets, ivf_blocks: the inverted file
    (:func:`ivf_args`: ``ivf_blocks`` None for whole ids); dcells uint16 or
    int32 [P], dcell_offsets int64 [N + 1] (the transpose, :func:`stages.doc_cells`); doc_offsets
    int64 [N + 1]; codes uint16/int32 [T], residuals uint8 [T, code_bytes], norms uint8 codes
    into ``norm_values`` (float32 [256]), float16/float32 [T], or None (ONE segment's token
    arrays, memory-mapped or not: read in place); alive bool [N] or None; centroid_gain float32
    [C] or None: stage 4 takes its centroid scores from the query's stage-1 scores R times it
    (:func:`plaid.search.pipeline.centroid_gain`), else from float32 products of the raw
    centroids.
    """

    def __init__(self, centroids, ivf, ivf_offsets, dcells, dcell_offsets, doc_offsets, codes, residuals, norms,
                 alive, norm_values=None, ivf_blocks=None, centroid_gain=None):
        residuals = np.asarray(residuals)
        if residuals.dtype != np.uint8 or residuals.ndim != 2:
            raise ValueError("residuals must be uint8 [T, code_bytes]")
        C, N = len(ivf_offsets) - 1, len(doc_offsets) - 1
        if len(centroids) != C or len(dcell_offsets) != N + 1 or len(codes) != len(residuals) \
                or (norms is not None and len(norms) != len(codes)) or (alive is not None and len(alive) != N) \
                or (centroid_gain is not None and np.shape(centroid_gain) != (C,)):
            raise ValueError("QueryArrays: inconsistent array sizes")
        mode, ncodes, nvalues, ntable = _norm_args(norms, norm_values)
        use_alive = alive is not None
        self.num_centroids, self.num_documents = C, N
        self.args = tuple(_ro(a) if isinstance(a, np.ndarray) else a for a in (
            np.ascontiguousarray(centroids, np.float32), _gain_arg(centroid_gain),
            *ivf_args(ivf, ivf_offsets, ivf_blocks), _cells_arg(dcells),
            np.ascontiguousarray(dcell_offsets, np.int64), np.ascontiguousarray(doc_offsets, np.int64),
            _codes_arg(codes), np.ascontiguousarray(residuals), mode, ncodes, nvalues, ntable,
            np.ascontiguousarray(alive, np.bool_) if use_alive else _NO_ALIVE, use_alive))


_NO_ALIVE = np.ones(1, np.bool_)


def _gain_arg(centroid_gain) -> np.ndarray:
    """The kernels' ``cgain``: float32 [C] C-contiguous, or empty (stage 4 then computes the
    centroid scores as float32 products of the raw centroids)."""
    if centroid_gain is None:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(centroid_gain, np.float32)


def _run_prepared(name: str, args: tuple):
    """Kernel ``name``'s result for ``args`` already read-only where they must be (no per-argument
    conversion: the per-query calls), or None when the numpy fallback is (or has just become, on
    a compile failure, with its one warning) in use."""
    try:
        return getattr(_nb, name)(*args)
    except MemoryError:
        raise
    except Exception:  # a compile failure: _run falls back (one warning) and says so
        r = _run(name, *args)
        return None if r is None else r[0]


#: A single query searched on several threads (:func:`search_query` with a pool) scores stage 2's
#: inverted lists in parts, one per thread, when they hold at least this many entries (a thread's
#: hand-off costs ~30-60 us, ~10k entries' worth): at a million documents a query's kept
#: centroids list ~670k entries (~3 ms on one core), at 50k documents a few tens of thousands.
SPLIT_MIN_ENTRIES = 1 << 17
#: ... and only on an inverted file of at least this many entries (a query's surviving centroids
#: list ~1% of it at threshold 0.5: 670k of 65M at a million documents, where the parts made
#: single queries 0.88-0.96x as long); below, a single query runs as one call (at 200k documents,
#: 12M entries, the parts measured 1.00-1.03x; at 50k, 3M entries, 1.02x).
SPLIT_MIN_INDEX_ENTRIES = 1 << 24


def search_query(R: np.ndarray, q: np.ndarray, table: np.ndarray, arrays: QueryArrays, k: int, ncells: int,
                 threshold: float, n2: int, n3: int, mark: np.ndarray, slot: np.ndarray, cslot: np.ndarray,
                 pool=None, threads: int = 1, scratch=None):
    """Stages 1-4 of one query in one compiled call (no subset): what
    :func:`plaid.search.pipeline.search_query` decides, with the same ids, scores and trace.

    R: float32 [m, C] the query's centroid scores; q: float32 [m, dim]; table: float32
    [code_bytes * 256, m] (``codec.score_table(q)``); arrays: :class:`QueryArrays`; k, ncells,
    threshold, n2, n3: the budgets (:class:`plaid.search.params.Budgets`); scratch (one set per
    thread): mark bool [N] all False, slot int32 [N] and cslot int32 [C] all -1 (left so).
    Returns None when the numpy fallback is in use (run the pipeline's stages instead), else
    (ids int64 [<= k], scores float32 [<= k], candidates int64 [n] sorted, final ncells,
    threshold used, stage-2 and stage-3 survivors as sorted int64 indices into the candidates,
    ticks int64 [5]: the cycle counter at the start and after each stage). Raises
    :class:`IndexCorruptError` for an invalid token centroid id or norm.

    pool, threads: a ``concurrent.futures`` executor with ``threads - 1`` workers idle for this
    call (the caller's thread is the other one). With ``threads >= 2`` on an inverted file of at
    least :data:`SPLIT_MIN_INDEX_ENTRIES` entries, stage 2's first scoring, when it reads at
    least :data:`SPLIT_MIN_ENTRIES` entries of the inverted lists, is split over the threads by
    kept centroids (:func:`_split_stage2`), and then stage 4 by candidates
    (:func:`_split_stage4`); the rest is the one call's compiled code, and the results are the
    same. scratch: per-thread scratch with ``cslots(C)`` (the CPU engine's), for the workers.
    """
    if not ready():
        return None
    ticks = np.zeros(5, np.int64)
    if pool is not None and threads >= 2 and len(arrays.args[2]) >= SPLIT_MIN_INDEX_ENTRIES:
        try:
            r = _search_query_split(_ro(R), _ro(q), _ro(table), arrays, int(k), int(ncells), float(threshold),
                                    int(n2), int(n3), mark, slot, cslot, ticks, pool, int(threads), scratch=scratch)
        except MemoryError:
            raise
        except Exception as e:  # a part kernel failing to compile: numpy from now on, as _run does
            with _lock:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _fallback(f"numba failed in a query's parts: {type(e).__name__}: {first}")
            return None
    else:
        # arrays.args are read-only already: call the kernel without _run's per-argument conversion
        args = (_ro(R), _ro(q), _ro(table), *arrays.args, int(k), int(ncells), float(threshold), int(n2), int(n3),
                mark, slot, cslot, ticks)
        r = _run_prepared("search_query", args)
    if r is None:
        return None
    ids, scores, docs, nc, thr, sel2, sel3, bad = r
    if bad >= 0:
        raise IndexCorruptError(f"stage 4: token {bad}: centroid id or norm invalid")
    return ids, scores, docs, nc, thr, sel2, sel3, ticks


def _search_query_split(R, q, table, arrays: QueryArrays, k, ncells, threshold, n2, n3, mark, slot, cslot, ticks,
                        pool, threads: int, min_entries: Optional[int] = None, scratch=None):
    """:func:`search_query` from its compiled parts: ``query_head`` (stage 1), stage 2's first
    scoring in parts (:func:`_split_stage2`) where it applies, ``query_stages23`` (which decides
    as the one call does, using the parts' scores), stage 4 in parts (:func:`_split_stage4`),
    ``ranked``. None when the numpy fallback is in use."""
    (cents, cgain, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, doc_offsets, codes, residuals, mode, ncodes,
     nvalues, ntable, alive, use_alive) = arrays.args
    head = _run_prepared("query_head", (R, ivf, ivf_offsets, ivf_blocks, alive, use_alive, ncells, n2, n3, mark, ticks))
    if head is None:
        return None
    docs, nc, floor, ReT, colmax = head
    none = np.zeros(0, np.int64)
    if len(docs) == 0:
        ticks[2:] = ticks[1]
        return none, np.zeros(0, np.float32), docs, nc, threshold, none, none, -1
    pre = _split_stage2(R, docs, colmax, threshold, n2, ivf, ivf_offsets, ivf_blocks, dcell_offsets, len(slot), pool,
                        threads, min_entries)
    if pre is None:  # stage 2 does not run: nothing computed ahead
        pre = (np.empty(0, np.int64), 0, None, None, np.empty(0, np.bool_), np.empty(0, np.int64), -1, 0)
    counts, total, best, listed, keep, kept, nk, entries = pre
    if best is None:
        best, listed = np.empty((0, 0, ReT.shape[1]), np.float32), np.empty((0, 0), np.int64)
    r = _run_prepared("query_stages23", (R, ivf, ivf_offsets, ivf_blocks, dcells, dcell_offsets, threshold, n2, n3,
                                         slot, ticks, docs, floor, ReT, colmax, counts, int(total), best, listed,
                                         best.shape[0] > 0, keep, kept, int(nk), int(entries)))
    if r is None:
        return None
    thr, sel, sel3 = r
    d4 = docs[sel3]
    exact4 = np.empty(len(d4), np.float32)
    stage4_args = (R, cgain, q, table, cents, codes, residuals, mode, ncodes, nvalues, ntable, doc_offsets)
    # stage 4 in parts too when the query was large enough for stage 2's (cached and short, its
    # parts cost more than they save: 1.09x the one-call latency at 50k documents)
    bad = _split_stage4(stage4_args, d4, exact4, cslot, pool if best.shape[0] > 1 else None, threads, scratch)
    if bad >= 0:
        return none, np.zeros(0, np.float32), docs, nc, thr, sel, sel3, bad
    top = _nb.ranked(exact4, int(k), ticks)
    return d4[top], exact4[top], docs, nc, thr, sel, sel3, -1


class _NotStarted:
    """A part no pool took (:func:`in_parts` runs it on the caller's thread)."""

    @staticmethod
    def cancel() -> bool:
        return True


#: Stage 4 of a single query searched on several threads is split over them from this many
#: candidates (k=10 scores 64 exactly, ~1 ms at a million documents; a thread's hand-off ~30-60 us).
SPLIT_MIN_DOCS = 32


def in_parts(pool, part, parts: int) -> list:
    """``[part(0), ..., part(parts - 1)]``: part 0 on this thread, the others submitted to
    ``pool``; those no worker has started by the time part 0 is done (the pool busy with another
    search), or that a shut-down pool refuses (a Searcher closed meanwhile), run here instead of
    being waited for. Every part has ended when this returns or raises (the first error, part
    0's first)."""
    others = []
    for p in range(1, parts):
        try:
            others.append(pool.submit(part, p))
        except RuntimeError:  # the pool was shut down: this part runs here
            others.append(_NotStarted())
    out, error = [None] * parts, None
    try:
        out[0] = part(0)
    except BaseException as e:
        error = e
    for p, f in enumerate(others, 1):
        if f.cancel():  # not started: here, unless a part failed already
            if error is None:
                try:
                    out[p] = part(p)
                except BaseException as e:
                    error = e
            continue
        try:
            out[p] = f.result()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
    return out


def _split_stage4(args: tuple, d4: np.ndarray, out: np.ndarray, cslot: np.ndarray, pool, threads: int,
                  scratch=None) -> int:
    """Stage 4 (``stage4``: exact MaxSim into ``out`` float32 [n]) of the candidates ``d4`` in
    runs of about equal tokens, the caller's thread taking the first and ``pool``'s workers the
    others (:func:`in_parts`), each with its own centroid map (``scratch.cslots(C)`` on its
    thread, else a new one); one run under :data:`SPLIT_MIN_DOCS` candidates. Each candidate's
    score depends on its own tokens only: the same scores as one call. Returns -1, or the
    position of the invalid token the one call reports (found again by one call: an error path)."""
    n = len(d4)
    parts = max(1, min(int(threads), n // SPLIT_MIN_DOCS)) if pool is not None else 1
    if parts == 1:
        return int(_nb.stage4(*args, d4, cslot, out))
    doc_offsets = args[-1]
    ends = np.cumsum(doc_offsets[d4 + 1] - doc_offsets[d4])
    cuts = np.concatenate([[0], np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts), [n]]).astype(np.int64)
    C = len(cslot)

    def part(p: int) -> int:
        cs = scratch.cslots(C) if scratch is not None else np.full(C, -1, np.int32)
        lo, hi = cuts[p], cuts[p + 1]
        return int(_nb.stage4(*args, d4[lo:hi], cs, out[lo:hi])) if hi > lo else -1

    if any(b >= 0 for b in in_parts(pool, part, parts)):
        return int(_nb.stage4(*args, d4, cslot, out))  # every id is checked before any norm: its first
    return -1


#: Stage 2's parts are at most ``listed / (SPLIT_MERGE_RATIO * n * W / 8)``: each part's scores
#: (n candidates x W lanes) are filled and merged on one thread, which must stay small against
#: the entries the part scores (7-token queries at a million documents: 670k entries, 17k rows of
#: 8 lanes, up to 9 parts; 32-token queries there: none).
SPLIT_MERGE_RATIO = 4


def _split_stage2(R, docs, colmax, threshold, n2, ivf, ivf_offsets, ivf_blocks, dcell_offsets, N: int, pool,
                  threads: int, min_entries: Optional[int] = None):
    """Stage 2's first scoring from the inverted file's side, in parts: (counts int64 [n], total:
    :func:`candidate_entries`; best float32 [parts, n, W], listed int64 [parts, n], or None, None;
    keep bool [C], kept int64 [C], how many are kept and their entries: :func:`kept_at` at
    ``threshold``) for ``query_stages23`` to merge and reuse. None where stage 2 does not run (at most n2 candidates); no
    parts where that scoring would not run first (fewer than n2 entries listed, the candidates'
    side shorter: the same tests as ``query_stages23``'s), reads fewer than ``min_entries``
    entries (None: :data:`SPLIT_MIN_ENTRIES`), or would merge too much (:data:`SPLIT_MERGE_RATIO`).
    The kept centroids are cut into runs of about equal entries; the caller's thread scores the
    first, ``pool``'s workers the others (each :func:`ivf_accumulate`, without the GIL)."""
    n = len(docs)
    if n <= n2:
        return None
    C = colmax.shape[1]
    keep = np.empty(C, np.bool_)
    kept = np.empty(C, np.int64)
    nk, listed = _nb.kept_at(colmax, np.float32(threshold), keep, kept, ivf_offsets)
    counts, total = _nb.candidate_entries(docs, dcell_offsets)
    W = (R.shape[0] + 7) // 8 * 8
    parts = min(int(threads), nk, listed // max(1, SPLIT_MERGE_RATIO * n * (W // 8)))
    ahead = (keep, kept, nk, listed)
    if listed < max(n2, SPLIT_MIN_ENTRIES if min_entries is None else min_entries) or listed > total or parts < 1:
        return (counts, total, None, None) + ahead
    runs = kept[:nk]
    ends = np.cumsum(ivf_offsets[runs + 1] - ivf_offsets[runs])
    cuts = np.concatenate([[0], np.searchsorted(ends, listed * np.arange(1, parts) / parts), [nk]]).astype(np.int64)
    bits, rank = _nb.ivf_bits(docs, N)
    best = np.empty((parts, n, W), np.float32)
    listed_parts = np.empty((parts, n), np.int64)

    def part(p: int) -> None:
        best[p].fill(-np.inf)  # on the part's own thread
        listed_parts[p].fill(0)
        _nb.ivf_accumulate(R, runs[cuts[p]:cuts[p + 1]], ivf, ivf_offsets, ivf_blocks, bits, rank, best[p],
                           listed_parts[p])

    in_parts(pool, part, parts)
    return (counts, total, best, listed_parts) + ahead


def search_many(R: np.ndarray, starts: np.ndarray, Q: np.ndarray, tables: np.ndarray, table_offsets: np.ndarray,
                widths: np.ndarray, arrays: QueryArrays, k: int, ncells: int, threshold: float, n2: int, n3: int,
                mark: np.ndarray, slot: np.ndarray, cslot: np.ndarray):
    """:func:`search_query` for a group of queries in one compiled call (the GIL is released once
    for the group, not per query: two threads searching one query per call spent ~15% of their
    time waiting for it).

    R: float32 [sum m, C] and Q: float32 [sum m, dim], query i in rows ``starts[i]:starts[i + 1]``
    (starts int64 [n + 1]); tables: float32, query i's byte table ``codec.score_table`` (as
    ``[rows, widths[i]]``: its query padded with zero tokens to ``widths[i]``, a multiple of 8, or
    not) at ``table_offsets[i]:table_offsets[i + 1]`` (int64 [n + 1]); the rest as
    :func:`search_query`. Returns None when the numpy fallback is in use (search the queries one
    by one), else (ids int64 [n, k], scores float32 [n, k], counts int64 [n]: query i's hits are
    the first ``counts[i]`` of its row). Raises :class:`IndexCorruptError` for an invalid token
    centroid id or norm.
    """
    if not ready():
        return None
    n = len(starts) - 1
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    counts = np.zeros(n, np.int64)
    args = (_ro(R), _ro(np.ascontiguousarray(starts, np.int64)), _ro(Q), _ro(tables),
            _ro(np.ascontiguousarray(table_offsets, np.int64)), _ro(np.ascontiguousarray(widths, np.int64)),
            *arrays.args, int(k), int(ncells), float(threshold), int(n2), int(n3), mark, slot, cslot, ids, scores,
            counts)
    r = _run_prepared("search_many", args)
    if r is None:
        return None
    if r[1] >= 0:
        raise IndexCorruptError(f"stage 4: token {r[1]}: centroid id or norm invalid")
    return ids, scores, counts


# -- numpy fallbacks (the reference semantics, vectorised; used when numba is unavailable) ---------
def _np_approx_docs(Re, keep, docs, dcells, dcell_offsets):
    n = len(docs)
    out = np.full(n, _NEG_INF, np.float32)
    covered = np.zeros(n, bool)
    nonempty = dcell_offsets[docs + 1] > dcell_offsets[docs]
    if not nonempty.any():
        return out, covered
    d = docs[nonempty]
    offs, cells = stages.document_cells(d, dcells, dcell_offsets)
    read = cells if keep is None else stages.pruned_cells(cells, keep)
    scores = stages.approximate_maxsim(Re, read, offs)
    if len(d) == 1 and n > 1:  # numpy summed one column pairwise; the kernels sum by n (sequentially)
        scores = np.cumsum(np.maximum.reduceat(Re.take(read, axis=1), offs[:-1], axis=1)[:, 0], dtype=np.float32)[-1:]
    out[nonempty] = scores
    covered[nonempty] = True if keep is None else stages.covered_documents(cells, keep, offs)
    return out, covered


def _np_centroid_terms(q, centroids, u):
    """:func:`centroid_terms` in numpy: the same products added in the same order."""
    CuT = np.ascontiguousarray(np.take(np.asarray(centroids, np.float32), u, axis=0).T)  # [dim, U]
    acc = np.zeros((q.shape[0], len(u)), np.float32)
    prod = np.empty_like(acc)
    for d in range(q.shape[1]):
        np.multiply.outer(q[:, d], CuT[d], out=prod)
        acc += prod
    return acc


def _np_exact(table, cs, slot, codes, residuals, norms, pos, offsets, norm_values=None):
    """``Searcher._stage4_sims`` + ``stages.maxsim_scores`` over the tokens at ``pos``."""
    n = len(offsets) - 1
    out = np.full(n, _NEG_INF, np.float32)
    if len(pos) == 0:
        return out
    cc = codes[pos]
    if int(cc.min()) < 0 or int(cc.max()) >= len(slot):
        raise IndexCorruptError("stage 4: centroid ids out of range")
    u = slot[cc]
    if int(u.min()) < 0 or int(u.max()) >= cs.shape[1]:
        raise IndexCorruptError("stage 4: a token's centroid is not among the scored ones")
    if norms is not None:
        nv = np.asarray(norms)[pos]
        if norm_values is not None:
            nv = np.asarray(norm_values, np.float32)[nv]
        if not (np.isfinite(nv).all() and (nv > 0).all()):
            raise IndexCorruptError("stage 4: token norms that are NaN, infinite, zero or negative")
    sims = stages.adc_scores(torch.from_numpy(table), np.ascontiguousarray(residuals[pos]))
    sims += cs.take(u, axis=1).T
    if norms is not None:
        sims /= torch.from_numpy(np.ascontiguousarray(nv)).float().numpy()[:, None]
    lens = np.diff(offsets)
    nonempty = lens > 0
    out[nonempty] = stages.maxsim_scores(sims, np.concatenate([[0], np.cumsum(lens[nonempty])]))
    return out

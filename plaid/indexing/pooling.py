"""Token pooling at index time: each document's token vectors are clustered hierarchically (Ward),
and the index stores the cluster means instead of the tokens (Clavié et al., 2024).

**How many vectors.** With a pool factor ``f >= 1``, a document of ``n`` tokens keeps

* ``ceil(n / f)`` vectors when ``1 <= n <= POOL_BLOCK_TOKENS``, computed exactly on the binary
  value of ``f`` (so ``f = 2`` turns 7 tokens into 4 vectors, ``f = 1.5`` turns 3 into 2); at
  least 1, never more than ``n``: a document of one token keeps its token as it is;
* for a longer document, the sum of that count over its consecutive blocks of
  ``POOL_BLOCK_TOKENS`` tokens (the last one shorter), each block pooled on its own;
* nothing when it is empty (empty documents stay empty).

``f = 1`` is no pooling. :func:`pooled_doclens` computes the counts without clustering.

**Which vectors.** A document (or block) of ``n`` tokens pooled into ``k < n`` vectors is clustered
by agglomerative clustering with Ward's criterion on the Euclidean distances of its tokens,
stopped at ``k`` clusters: starting from one cluster per token, the pair of clusters whose merge
increases the within-cluster sum of squares the least is merged, ``n - k`` times (a cluster is
numbered by its first token; on ties, the lowest-numbered cluster among those with the cheapest
merge is merged with its lowest-numbered cheapest partner). For unit vectors the
Euclidean distance orders pairs as the cosine similarity does. Each cluster becomes the mean of
its tokens, renormalised to unit length when ``renormalize`` is set (an index of unit-norm
vectors relies on it), and the clusters are written in the order of their first token. Same
input, same vectors, whatever the thread count or the implementation below.

**Implementations.** A compiled kernel (:mod:`plaid.indexing._pooling_numba`, numba, compiled on
first use and cached on disk, releasing the GIL so ``threads`` threads pool different documents
at once), and a numpy one with the same results bit for bit (the same float64 operations in the
same order) where numba cannot be imported or compile, or when ``PLAID_NO_NUMBA`` is set (to
anything but ``""`` or ``"0"``); that fallback warns once per call site. A document of ``n``
tokens costs ``O(n^2 d)`` operations and an ``n x n`` float64 matrix per thread, hence the
blocks of :data:`POOL_BLOCK_TOKENS`.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Callable, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..embeddings import Corpus, Embeddings, SpillFactory, _temp_spill
from ..errors import IndexCorruptError, InvalidInputError
from ..store.manifest import MAX_POOL_FACTOR, POOLING_METHODS

__all__ = ["POOL_METHOD", "POOL_BLOCK_TOKENS", "MAX_POOL_FACTOR", "check_pool_factor", "pooling_record",
           "pool_factor_of", "default_threads", "pooled_doclens", "pool_units", "ward_pool_units", "pool_documents",
           "pool_corpus", "backend"]

#: The one pooling method this plaid implements (the manifest's ``pooling.method``).
POOL_METHOD = "ward"
assert POOL_METHOD in POOLING_METHODS
#: Longest run of tokens clustered as one: bounds the per-thread n x n float64 matrix at 128 MiB.
#: ColBERT documents are far shorter (doc_maxlen 180-512), so in practice a document is one block.
POOL_BLOCK_TOKENS = 4096

Kernel = Callable[..., None]


# -- parameters -----------------------------------------------------------------------------------
def check_pool_factor(value, name: str = "pool_factor") -> float:
    """``value`` as a float if it is a pool factor: a finite number from 1 to :data:`MAX_POOL_FACTOR`
    (not a bool). Raises :class:`InvalidInputError` naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name} must be a number >= 1 (1: no pooling), got {value!r:.60}")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not 1.0 <= f <= MAX_POOL_FACTOR:
        raise InvalidInputError(f"{name} must be a finite number from 1 (no pooling) to 2**53, got {value!r:.60}")
    return f


def pooling_record(factor: float) -> Optional[dict]:
    """The manifest's ``pooling`` value for a pool factor: None for 1 (no pooling), else
    ``{"method": "ward", "factor": f}`` (``f`` an int when it is whole)."""
    f = check_pool_factor(factor)
    if f == 1.0:
        return None
    return {"method": POOL_METHOD, "factor": int(f) if f.is_integer() else f}


def pool_factor_of(record, where: str = "the index") -> float:
    """The pool factor a manifest's ``pooling`` value records (1.0 for None).

    Raises :class:`IndexCorruptError` naming the field when the record is not one this plaid can
    reproduce (another method, a factor out of range): documents added to such an index could not
    be pooled as its others were.
    """
    if record is None:
        return 1.0
    if not isinstance(record, dict) and not hasattr(record, "keys"):
        raise IndexCorruptError(f"{where}: manifest field pooling must be null or a JSON object")
    method = record.get("method")
    if method != POOL_METHOD:
        raise IndexCorruptError(f"{where}: manifest field pooling.method = {method!r:.40} is not a pooling method "
                                f"this plaid can reproduce ({POOL_METHOD!r})")
    factor = record.get("factor")
    try:
        f = check_pool_factor(factor, "pooling.factor")
    except InvalidInputError as e:
        raise IndexCorruptError(f"{where}: manifest field {e}") from None
    if f == 1.0:
        raise IndexCorruptError(f"{where}: manifest field pooling.factor = 1 (an unpooled index records null)")
    return f


def default_threads() -> int:
    """Threads a pooling pass uses by default: torch's thread count (what ``torch.set_num_threads``
    set, e.g. in a sharded build's tasks), as the rest of a build does."""
    import torch

    return max(1, int(torch.get_num_threads()))


def _ceil_div(lengths: np.ndarray, factor: float) -> np.ndarray:
    """``ceil(n / factor)`` for every ``n`` of ``lengths`` (int64), exact on factor's binary value."""
    num, den = Fraction(factor).as_integer_ratio()
    uniq, inv = np.unique(np.asarray(lengths, np.int64), return_inverse=True)
    vals = np.array([-((-int(n) * den) // num) for n in uniq.tolist()], np.int64)
    return vals[inv.reshape(-1)]


def pool_units(doclens: np.ndarray, factor: float, block: int = POOL_BLOCK_TOKENS
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The runs of tokens pooled on their own ("units": a whole document, or one block of a long one).

    ``doclens``: int [N] token counts of consecutive documents. Returns int64 arrays
    ``(in_start [U], in_len [U], out_start [U], out_len [U], unit_doc [U])``: unit ``u`` turns
    input rows ``in_start[u] : in_start[u] + in_len[u]`` into output rows ``out_start[u] :
    out_start[u] + out_len[u]``, and belongs to document ``unit_doc[u]``. Empty documents have no
    unit; units are in token order.
    """
    factor = check_pool_factor(factor)
    n = np.asarray(doclens, np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    nblocks = (n + block - 1) // block
    unit_doc = np.repeat(np.arange(len(n), dtype=np.int64), nblocks)
    first = np.concatenate([[0], np.cumsum(nblocks)[:-1]]).astype(np.int64)
    j = np.arange(len(unit_doc), dtype=np.int64) - first[unit_doc]
    in_start = offsets[unit_doc] + j * block
    in_len = np.minimum(block, n[unit_doc] - j * block)
    out_len = _ceil_div(in_len, factor)
    out_start = np.concatenate([[0], np.cumsum(out_len)[:-1]]).astype(np.int64)
    return in_start, in_len, out_start, out_len, unit_doc


def pooled_doclens(doclens: np.ndarray, factor: float) -> np.ndarray:
    """Vectors each document keeps when pooled with ``factor`` (int64 [N]; see the module docstring).

    >>> pooled_doclens(np.array([0, 1, 2, 7, 78]), 2).tolist()
    [0, 1, 1, 4, 39]
    """
    n = np.asarray(doclens, np.int64)
    _, _, _, out_len, unit_doc = pool_units(n, factor)
    return np.bincount(unit_doc, weights=out_len, minlength=len(n)).astype(np.int64)


# -- the numpy implementation (the reference; the numba kernel matches it bit for bit) -------------------
def _nearest(D: np.ndarray, m: int) -> Tuple[int, float]:
    j = int(np.argmin(D[m]))
    return j, float(D[m, j])


def _pool_unit_numpy(x: np.ndarray, k: int, renorm: bool) -> np.ndarray:
    """Pool ``x`` (float32 [n, d], ``k < n``) into float32 [k, d] cluster means."""
    n, d = x.shape
    x64 = x.astype(np.float64)
    G = np.zeros((n, n), np.float64)
    for t in range(d):  # summed over dimensions in order, as the kernel does
        G += np.multiply.outer(x64[:, t], x64[:, t])
    sq = np.diagonal(G).copy()
    D = 0.5 * ((sq[:, None] + sq[None, :]) - 2.0 * G)
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, np.inf)
    size = np.ones(n, np.float64)
    active = np.ones(n, bool)
    parent = np.arange(n, dtype=np.int64)
    nn = np.argmin(D, axis=1).astype(np.int64)
    nnd = D[np.arange(n), nn]
    for _ in range(n - k):
        i = int(np.argmin(np.where(active, nnd, np.inf)))
        j = int(nn[i])
        a, b = min(i, j), max(i, j)
        ni, nj, dab = size[a], size[b], D[a, b]
        ms = active.copy()
        ms[a] = ms[b] = False
        nm = size[ms]
        v = ((ni + nm) * D[ms, a] + (nj + nm) * D[ms, b] - nm * dab) / (ni + nj + nm)
        D[ms, a] = v
        D[a, ms] = v
        D[:, b] = np.inf
        D[b, :] = np.inf
        size[a] = ni + nj
        active[b] = False
        parent[b] = a
        others = active.copy()
        others[a] = False
        redo = others & ((nn == a) | (nn == b))
        for m in np.flatnonzero(redo).tolist():
            nn[m], nnd[m] = _nearest(D, m)
        dma = D[:, a]
        better = others & ~redo & ((dma < nnd) | ((dma == nnd) & (a < nn)))
        nn[better] = a
        nnd[better] = dma[better]
        nn[a], nnd[a] = _nearest(D, a)
    root = parent.copy()
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    roots = np.flatnonzero(parent == np.arange(n))
    rank = np.zeros(n, np.int64)
    rank[roots] = np.arange(len(roots))
    acc = np.zeros((len(roots), d), np.float64)
    np.add.at(acc, rank[root], x64)  # each cluster's rows summed in token order
    acc = acc / size[roots][:, None]
    if renorm:
        ss = np.zeros(len(roots), np.float64)
        for t in range(d):
            ss += acc[:, t] * acc[:, t]
        norm = np.sqrt(ss)
        ok = norm > 0.0
        acc[ok] = acc[ok] / norm[ok, None]
    return acc.astype(np.float32)


def _ward_pool_units_numpy(x, in_start, in_len, out_start, out_len, renorm, out) -> None:
    for s, n, o, k in zip(in_start.tolist(), in_len.tolist(), out_start.tolist(), out_len.tolist()):
        if k >= n:
            out[o : o + n] = x[s : s + n]
        else:
            out[o : o + k] = _pool_unit_numpy(x[s : s + n], k, renorm)


def ward_pool_units(x: np.ndarray, in_start: np.ndarray, in_len: np.ndarray, out_start: np.ndarray,
                    out_len: np.ndarray, renorm: bool, out: np.ndarray) -> None:
    """Pool every unit (see :func:`pool_units`) of ``x`` into ``out``, with the numpy implementation.

    ``x``: float32 [T, d]; ``in_*``, ``out_*``: int64 [U]; ``out``: float32 [T', d], written in
    place (unit ``u``'s rows only). A unit with ``out_len >= in_len`` is copied unchanged.
    """
    _ward_pool_units_numpy(x, in_start, in_len, out_start, out_len, bool(renorm), out)


# -- choosing the implementation ------------------------------------------------------------------------
def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: the kernel always gets its input as one (numba compiles one version for
    writable arrays and another for read-only ones; this way one serves every input)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _compiled() -> Tuple[Optional[Kernel], str]:
    """(the numba kernel, "") when it can run here, else (None, why not). Compiles it on first use."""
    flag = os.environ.get("PLAID_NO_NUMBA", "")
    if flag not in ("", "0"):
        return None, f"PLAID_NO_NUMBA={flag}"
    try:
        from . import _pooling_numba
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken numba / llvmlite install
        return None, f"numba could not be imported: {type(e).__name__}: {e}"
    kernel = _pooling_numba.ward_pool_units
    try:  # compile (or load from the cache) for the argument types every call passes
        empty = np.zeros(0, np.int64)
        kernel(_read_only(np.zeros((1, 1), np.float32)), empty, empty, empty, empty, False,
               np.zeros((1, 1), np.float32))
    except Exception as e:  # noqa: BLE001 - a numba typing or lowering failure
        return None, f"the pooling kernel did not compile: {type(e).__name__}: {str(e)[:200]}"
    return kernel, ""


def backend() -> str:
    """``"numba"`` or ``"numpy"``: the implementation :func:`pool_documents` uses here."""
    return "numba" if _compiled()[0] is not None else "numpy"


def _kernel() -> Kernel:
    kernel, why = _compiled()
    if kernel is None:
        warnings.warn(f"plaid: compiled token pooling unavailable ({why}); using the numpy implementation "
                      "(same results, slower)", RuntimeWarning, stacklevel=3)
        return _ward_pool_units_numpy
    return kernel


# -- pooling documents ---------------------------------------------------------------------------------
def _split(in_len: np.ndarray, out_len: np.ndarray, parts: int) -> np.ndarray:
    """Unit boundaries int64 [p + 1] cutting the units into at most ``parts`` runs of about equal
    clustering work (``n^2`` per unit that is clustered)."""
    cost = np.where(out_len < in_len, in_len.astype(np.float64) ** 2, 0.0) + 1.0
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts) if len(cum) else np.zeros(0, np.int64)
    return np.unique(np.concatenate([[0], cuts, [len(in_len)]])).astype(np.int64)


def pool_documents(vectors: np.ndarray, doclens: np.ndarray, factor: float, *, renormalize: bool,
                   threads: int = 1, executor: Optional[ThreadPoolExecutor] = None,
                   kernel: Optional[Kernel] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Pool consecutive documents held flat in memory.

    Parameters
    ----------
    vectors : float32 array [T, d]
        The tokens of the documents, document after document (other float dtypes are converted).
    doclens : int array [N]
        Tokens per document; sums to ``T``.
    factor : float
        The pool factor (>= 1; see the module docstring for the exact counts).
    renormalize : bool
        Divide each cluster mean by its norm (for unit-norm inputs: the means then stay unit-norm).
    threads : int, default 1
        Threads pooling different documents at once (the compiled kernel only).
    executor : ThreadPoolExecutor, optional
        Runs the threads' parts (default: a pool made for this call).
    kernel : callable, optional
        The implementation (default: the compiled kernel, else the numpy one after a warning).

    Returns ``(pooled float32 [T', d], pooled_doclens int64 [N])``, ``T' = pooled_doclens.sum()``.
    """
    factor = check_pool_factor(factor)
    x = _read_only(np.ascontiguousarray(vectors, dtype=np.float32))
    if x.ndim != 2:
        raise InvalidInputError(f"vectors must be 2-D [tokens, dim], got shape {tuple(x.shape)}")
    in_start, in_len, out_start, out_len, unit_doc = pool_units(doclens, factor)
    if int(in_len.sum()) != len(x):
        raise InvalidInputError(f"doclens sum to {int(in_len.sum())} tokens but vectors has {len(x)} rows")
    total = int(out_len.sum())
    out = np.empty((total, x.shape[1]), np.float32)
    pooled_lens = np.bincount(unit_doc, weights=out_len, minlength=len(np.asarray(doclens))).astype(np.int64)
    if factor == 1.0:
        out[:] = x
        return out, pooled_lens
    kernel = kernel or _kernel()
    renorm = bool(renormalize)
    bounds = _split(in_len, out_len, max(1, int(threads)) if kernel is not _ward_pool_units_numpy else 1)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def run(part):
        a, b = part
        kernel(x, in_start[a:b], in_len[a:b], out_start[a:b], out_len[a:b], renorm, out)

    if len(parts) <= 1:
        for p in parts:
            run(p)
    elif executor is not None:
        list(executor.map(run, parts))
    else:
        with ThreadPoolExecutor(max_workers=len(parts)) as ex:
            list(ex.map(run, parts))
    return out, pooled_lens


def pool_corpus(corpus: Corpus, factor: float, *, renormalize: bool, spill: Optional[SpillFactory] = None,
                chunk_tokens: int = 1 << 16, threads: int = 1, show_progress: bool = False) -> Corpus:
    """Pool every document of ``corpus`` into a new corpus, streamed through a float32 spill file.

    ``corpus`` is read in document-aligned chunks of about ``chunk_tokens`` tokens; each chunk's
    pooled vectors are appended to a file made by ``spill`` (e.g. an index writer's
    ``scratch_file``; default: the system's temporary directory), so memory stays bounded by the
    chunk whatever the corpus size. Returns a :class:`~plaid.embeddings.Corpus` over that file
    (memory-mapped; ``close()`` removes it) with the same documents in the same order,
    ``pooled_doclens(corpus.doclens, factor)`` vectors each. ``renormalize``, ``threads``: as for
    :func:`pool_documents`.
    """
    factor = check_pool_factor(factor)
    lens = pooled_doclens(corpus.doclens, factor)
    total, dim = int(lens.sum()), corpus.dim
    kernel = _kernel()
    fd, path = (spill or _temp_spill)()
    try:
        bar = tqdm(total=corpus.num_tokens, unit="tok", unit_scale=True, desc="plaid: pooling",
                   disable=not show_progress)
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(max_workers=max(1, int(threads))) as ex:
            for start, end in corpus.chunks(chunk_tokens):
                x = corpus.read(start, end)
                pooled, _ = pool_documents(x, corpus.doclens[start:end], factor, renormalize=renormalize,
                                           threads=threads, executor=ex, kernel=kernel)
                f.write(pooled.tobytes())
                bar.update(len(x))
        bar.close()
        vectors = np.memmap(path, dtype=np.float32, mode="r", shape=(total, dim))
        return Corpus(flat=Embeddings(vectors, lens), cleanup=path)
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise

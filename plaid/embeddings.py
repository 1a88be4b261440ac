"""Turning what users pass as documents or queries into validated float32 arrays.

Documents reach the indexer as one of:

* :class:`Embeddings` — a flat ``[total_tokens, dim]`` array (often ``np.load(path, mmap_mode="r")``)
  plus the token count of each document;
* a sequence (list, tuple) of 2-D arrays, one ``[n_tokens, dim]`` array per document;
* any other iterable of such arrays (a generator), which is read once.

numpy arrays and torch tensors are accepted, in float16, bfloat16 (torch), float32 or float64.
All of them are wrapped in a :class:`Corpus`, which the indexer reads in document-aligned
chunks so that the corpus never has to fit in memory.

Empty documents (zero tokens) are allowed: they keep their id, hold no tokens and are never
returned by a search. :func:`plaid.maxsim` scores them ``-inf``.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InvalidInputError

__all__ = ["Embeddings", "Corpus", "as_corpus", "as_queries", "to_numpy"]

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821

_FLOAT_KINDS = {"float16", "float32", "float64"}


def _dense_torch(t, what: str):
    """``t`` detached, with its data on the CPU side reachable: refuses tensors that have none
    (meta) or that are not one dense strided block (sparse COO/CSR/CSC/BSR/BSC, nested, quantized)."""
    import torch

    if t.is_meta:
        raise InvalidInputError(f"{what}: a meta tensor holds no data (materialise it on a real device first)")
    if getattr(t, "is_nested", False):
        raise InvalidInputError(f"{what}: nested tensors are not supported; pass a list of 2-D tensors instead")
    if t.layout != torch.strided:
        raise InvalidInputError(
            f"{what}: sparse tensors (layout {t.layout}) are not supported; pass a dense tensor (x.to_dense())")
    if t.is_quantized:
        raise InvalidInputError(f"{what}: quantized tensors are not supported; pass x.dequantize()")
    return t.detach().resolve_neg().resolve_conj()


def to_numpy(x, what: str) -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor) as a numpy array without copying when possible.

    ``what`` names the argument in error messages. torch bfloat16 is upcast to float32 (numpy
    has no bfloat16). Raises :class:`InvalidInputError` for any other non-float dtype; for
    torch tensors without plain dense data (meta, sparse COO/CSR/..., nested, quantized);
    for scipy sparse matrices and other objects that are no array; and for vectors of
    dimension 0 (an array of 2+ dims whose last axis is 0 while it has rows: ``[n, 0]`` with
    n > 0 — a ``[0, 0]`` array, an empty document, passes).
    """
    if type(x).__module__.startswith("torch"):
        import torch

        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"{what}: expected an array or tensor, got {type(x).__name__}")
        t = _dense_torch(x, what)
        if t.dtype == torch.bfloat16:
            t = t.float()
        if not t.dtype.is_floating_point:
            raise InvalidInputError(
                f"{what}: unsupported dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
            )
        x = t.cpu().numpy()
    elif not isinstance(x, np.ndarray):
        if type(x).__module__.startswith("scipy.sparse"):
            raise InvalidInputError(
                f"{what}: sparse matrices ({type(x).__name__}) are not supported; pass a dense array (x.toarray())")
        if isinstance(x, (str, bytes, dict, set, frozenset)) or x is None:
            raise InvalidInputError(f"{what}: expected an array or tensor, got {type(x).__name__}")
        if isinstance(x, (list, tuple)) and len(x) == 0:
            x = np.zeros((0,), dtype=np.float32)
        else:
            try:
                x = np.asarray(x)
            except Exception as e:  # ragged nested lists and the like
                raise InvalidInputError(f"{what}: cannot be read as an array ({e})") from None
            if x.dtype == object and x.ndim == 0:  # a generator or another object numpy cannot read
                raise InvalidInputError(f"{what}: expected an array or tensor, got {type(x.item()).__name__}")
    if x.dtype.name not in _FLOAT_KINDS:
        raise InvalidInputError(
            f"{what}: unsupported dtype {x.dtype}; expected float16, bfloat16, float32 or float64"
        )
    if x.ndim >= 2 and x.shape[-1] == 0 and int(np.prod(x.shape[:-1])) > 0:
        raise InvalidInputError(
            f"{what}: vectors of dimension 0 (shape {tuple(x.shape)}); every vector needs at least one component")
    return x


def _backing_mmap(a: np.ndarray):
    """(mmap.mmap, byte offset of a[0]) when ``a`` is a C-contiguous view of a memory map, else None."""
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        mm = getattr(base, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            base = mm
            break
        base = getattr(base, "base", None)
    if not isinstance(base, mmap.mmap) or not a.flags.c_contiguous:
        return None
    try:
        start = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    except (TypeError, ValueError):
        return None
    return base, a.__array_interface__["data"][0] - start


#: Rows of a memory-mapped corpus spanned by one step of :meth:`Corpus.take` (a sample's rows are
#: read, then the span's pages dropped: 65,536 rows of 128 float16 are 16 MB). Measured: a
#: 65,536-token sample of a 1 GB corpus in one step had ~1 GB resident at once (readahead).
TAKE_SPAN_ROWS = 1 << 16


def release_pages(a: np.ndarray, row_start: int, row_end: int) -> None:
    """Drop rows ``[row_start, row_end)`` of a memory-mapped array from this process' resident set.

    The pages stay in the OS page cache; only our mapping forgets them, so reading a file larger
    than RAM through ``np.load(..., mmap_mode="r")`` keeps the resident set bounded by the chunk.
    A no-op for in-memory arrays or where ``madvise`` is unavailable.
    """
    found = _backing_mmap(a)
    if found is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mm, offset = found
    row = a.strides[0]
    page = mmap.PAGESIZE
    lo = offset + row_start * row
    hi = offset + row_end * row
    lo_aligned = (lo + page - 1) // page * page  # only whole pages inside the range
    hi_aligned = hi // page * page
    if hi_aligned > lo_aligned:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo_aligned, hi_aligned - lo_aligned)
        except (OSError, ValueError):
            pass


def advise_random(a: np.ndarray) -> None:
    """Tell the OS that a memory-mapped array is read at random (no readahead); else a no-op."""
    found = _backing_mmap(a)
    if found is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            found[0].madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


class Embeddings:
    """A corpus of token embeddings stored flat.

    Parameters
    ----------
    vectors : array [total_tokens, dim], float16/float32 (numpy, memory-mapped numpy or torch)
        Token vectors of all documents, document after document. Not copied: a memory-mapped
        array stays on disk and is read in chunks.
    doclens : array [n_docs] of non-negative ints
        Number of tokens of each document; must sum to ``total_tokens``.

    Document ``i`` is ``vectors[offsets[i]:offsets[i + 1]]`` with ``offsets = [0, *cumsum(doclens)]``.
    """

    def __init__(self, vectors: ArrayLike, doclens: ArrayLike):
        vectors = to_numpy(vectors, "Embeddings.vectors")
        if vectors.ndim != 2:
            raise InvalidInputError(
                f"Embeddings.vectors must be 2-D [total_tokens, dim], got shape {tuple(vectors.shape)}"
            )
        if vectors.shape[1] == 0:
            raise InvalidInputError("Embeddings.vectors: dim is 0 (shape "
                                    f"{tuple(vectors.shape)}); every vector needs at least one component")
        if type(doclens).__module__.startswith("torch") and hasattr(doclens, "layout"):
            doclens = _dense_torch(doclens, "Embeddings.doclens").cpu().numpy()
        try:
            dl = np.asarray(doclens)
        except Exception as e:
            raise InvalidInputError(f"Embeddings.doclens cannot be read as an array ({e})") from None
        if dl.ndim != 1:
            raise InvalidInputError(f"Embeddings.doclens must be 1-D [n_docs], got shape {tuple(dl.shape)}")
        if dl.size and not np.issubdtype(dl.dtype, np.integer):
            if not np.issubdtype(dl.dtype, np.floating):
                raise InvalidInputError(f"Embeddings.doclens must hold integers, got dtype {dl.dtype}")
            if not (np.isfinite(dl).all() and np.all(np.mod(dl, 1) == 0) and np.abs(dl).max() < 2.0 ** 62):
                raise InvalidInputError("Embeddings.doclens must hold integers")
        dl = dl.astype(np.int64)
        if (dl < 0).any():
            i = int(np.flatnonzero(dl < 0)[0])
            raise InvalidInputError(f"Embeddings.doclens: document {i} has a negative length {dl[i]}")
        total = int(dl.sum())
        if total != vectors.shape[0]:
            raise InvalidInputError(
                f"Embeddings: doclens sum to {total} tokens but vectors has {vectors.shape[0]} rows"
            )
        self.vectors = vectors
        self.doclens = dl
        self.offsets = np.concatenate([[0], np.cumsum(dl)]).astype(np.int64)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.vectors.shape[0])

    def __len__(self) -> int:
        return len(self.doclens)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document ``i`` as a ``[n_tokens, dim]`` view."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return self.vectors[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Embeddings(n_docs={len(self)}, num_tokens={self.num_tokens}, dim={self.dim}, dtype={self.vectors.dtype})"


class Corpus:
    """Validated, random-access view of a document collection (internal to the indexer).

    Attributes: ``dim`` (int), ``doclens`` (int64 [n_docs]), ``offsets`` (int64 [n_docs + 1]).
    Reads return float32 arrays; every read block is checked for NaN/inf.
    """

    def __init__(self, flat: Optional[Embeddings] = None, docs: Optional[List[np.ndarray]] = None,
                 cleanup: Optional[str] = None):
        self._flat = flat
        self._docs = docs
        self._cleanup = cleanup
        if flat is not None:
            self.dim = flat.dim
            self.doclens = flat.doclens
            self.offsets = flat.offsets
        else:
            assert docs is not None
            self.doclens = np.array([d.shape[0] for d in docs], dtype=np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(self.doclens)]).astype(np.int64)
            self.dim = int(docs[0].shape[1]) if docs else 0

    @property
    def num_docs(self) -> int:
        return len(self.doclens)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def read(self, doc_start: int, doc_end: int) -> np.ndarray:
        """Tokens of documents ``[doc_start, doc_end)`` as float32 ``[n_tokens, dim]``, NaN-checked."""
        if self._flat is not None:
            lo, hi = int(self.offsets[doc_start]), int(self.offsets[doc_end])
            block = np.array(self._flat.vectors[lo:hi], dtype=np.float32)
            release_pages(self._flat.vectors, lo, hi)
        else:
            parts = [d for d in self._docs[doc_start:doc_end] if d.shape[0]]
            block = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        block = np.ascontiguousarray(block, dtype=np.float32)
        if not np.isfinite(block).all():
            bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0]) + int(self.offsets[doc_start])
            doc = int(np.searchsorted(self.offsets, bad, side="right") - 1)
            raise InvalidInputError(f"documents: document {doc} contains NaN or inf values")
        return block

    def take(self, token_ids: np.ndarray) -> np.ndarray:
        """Tokens at sorted global positions ``token_ids`` (int64 [n]) as float32 ``[n, dim]``."""
        if self._flat is not None:
            out = np.empty((len(token_ids), self.dim), np.float32)
            a = 0
            while a < len(token_ids):  # sorted ids: read and release the file span by span, so that
                lo = int(token_ids[a])   # a sparse sample never has the whole file resident (readahead)
                b = max(a + 1, int(np.searchsorted(token_ids, lo + TAKE_SPAN_ROWS, side="left")))
                ids = token_ids[a:b]
                out[a:b] = self._flat.vectors[ids]
                release_pages(self._flat.vectors, lo, int(ids[-1]) + 1)
                a = b
        else:
            doc = np.searchsorted(self.offsets, token_ids, side="right") - 1
            out = np.empty((len(token_ids), self.dim), np.float32)
            for d in np.unique(doc):  # sample-sized: a few thousand docs at most per call
                sel = doc == d
                out[sel] = self._docs[d][token_ids[sel] - self.offsets[d]]
        if not np.isfinite(out).all():
            bad = int(token_ids[np.flatnonzero(~np.isfinite(out).all(axis=1))[0]])
            doc = int(np.searchsorted(self.offsets, bad, side="right") - 1)
            raise InvalidInputError(f"documents: document {doc} contains NaN or inf values")
        return out

    def chunks(self, max_tokens: int) -> Iterator[Tuple[int, int]]:
        """Document ranges ``(start, end)`` of at most ``max_tokens`` tokens (one long document may exceed it)."""
        n = self.num_docs
        start = 0
        while start < n:
            limit = self.offsets[start] + max_tokens
            end = int(np.searchsorted(self.offsets, limit, side="right")) - 1
            end = min(max(end, start + 1), n)
            yield start, end
            start = end

    def close(self) -> None:
        """Remove the spill file written for a one-shot iterator, if any."""
        self._flat = None
        if self._cleanup and os.path.exists(self._cleanup):
            os.remove(self._cleanup)
        self._cleanup = None


def _check_doc(x, i: int, dim: Optional[int]) -> np.ndarray:
    """Document ``i`` as a 2-D numpy array ``[n_tokens, dim]`` (float16/32/64, not copied).

    ``dim``: the dimension of the documents so far (None before the first non-empty one). An
    empty document — a 1-D empty array or any ``[0, d]`` array, whatever ``d`` — comes back as
    ``[0, dim]`` (its trailing size is not a dimension: no vector). Raises
    :class:`InvalidInputError` naming the document for other shapes, another dim, vectors of
    dimension 0 and what :func:`to_numpy` refuses.
    """
    a = to_numpy(x, f"document {i}")
    if a.size == 0 and a.ndim == 1:
        return np.zeros((0, dim or 0), dtype=a.dtype)
    if a.ndim != 2:
        raise InvalidInputError(
            f"document {i}: expected a 2-D [n_tokens, dim] array, got shape {tuple(a.shape)}"
        )
    if a.shape[0] == 0:
        return np.zeros((0, a.shape[1] if dim is None else dim), dtype=a.dtype)
    if a.shape[1] == 0:  # to_numpy refuses these already; kept so the build never sees one
        raise InvalidInputError(f"document {i}: vectors of dimension 0 (shape {tuple(a.shape)})")
    if dim is not None and a.shape[1] != dim:
        raise InvalidInputError(f"document {i}: dim {a.shape[1]} differs from the first document's dim {dim}")
    return a


SpillFactory = Callable[[], Tuple[int, str]]


def _temp_spill() -> Tuple[int, str]:
    """A new private temporary file in the system's temporary directory: (descriptor, path)."""
    return tempfile.mkstemp(prefix="plaid-spill-", suffix=".bin")


def as_corpus(documents, spill: Optional[SpillFactory] = None, dim: Optional[int] = None) -> Corpus:
    """Wrap user documents in a :class:`Corpus`.

    ``documents``: :class:`Embeddings`, a sequence of ``[n_tokens, dim]`` arrays, or an iterable of
    them. A one-shot iterable is spilled to a float16/float32 scratch file made by ``spill``
    (a callable returning a new file's ``(descriptor, path)``, e.g. an index writer's
    ``scratch_file``; default: the system's temporary directory), read once, never held in
    memory. ``dim``, when given, is the dimension every document must have.
    """
    if isinstance(documents, Embeddings):
        corpus = Corpus(flat=documents)
    elif isinstance(documents, np.ndarray) or type(documents).__module__.startswith("torch"):
        a = to_numpy(documents, "documents")
        if a.ndim != 3:
            raise InvalidInputError(
                "documents: a single array must be 3-D [n_docs, n_tokens, dim]; pass a list of 2-D "
                f"arrays or plaid.Embeddings(vectors, doclens) instead (got shape {tuple(a.shape)})"
            )
        corpus = Corpus(docs=[a[i] for i in range(a.shape[0])])
    elif isinstance(documents, Sequence) and not isinstance(documents, (str, bytes)):
        docs: List[np.ndarray] = []
        d = dim
        for i, x in enumerate(documents):
            a = _check_doc(x, i, d)
            if d is None and a.shape[0] > 0:
                d = a.shape[1]
            docs.append(a)
        d = d or 0
        docs = [a if a.shape[0] else np.zeros((0, d), a.dtype) for a in docs]
        for i, a in enumerate(docs):
            if a.shape[1] != d:
                raise InvalidInputError(f"document {i}: dim {a.shape[1]} differs from the corpus dim {d}")
        corpus = Corpus(docs=docs)
    elif isinstance(documents, Iterable) and not isinstance(documents, (str, bytes)):
        corpus = _spill(documents, spill or _temp_spill, dim)
    else:
        raise InvalidInputError(
            "documents must be plaid.Embeddings, a sequence of [n_tokens, dim] arrays, or an iterable "
            f"of them; got {type(documents).__name__}"
        )
    if corpus.num_docs == 0:
        raise InvalidInputError("documents: the corpus is empty (no documents)")
    if corpus.num_tokens == 0:
        raise InvalidInputError("documents: every document is empty (no token vectors to index)")
    if dim is not None and corpus.dim != dim:
        raise InvalidInputError(f"documents: dim {corpus.dim} differs from the index dim {dim}")
    return corpus


def _widen_spill(path: str, spill: SpillFactory, chunk_rows: int = 1 << 20) -> str:
    """Copy a float16 spill file to a new float32 one (in chunks); returns the new file's path."""
    old = np.memmap(path, dtype=np.float16, mode="r") if os.path.getsize(path) else np.zeros(0, np.float16)
    fd, new_path = spill()
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(old), chunk_rows):
                f.write(np.asarray(old[start : start + chunk_rows], dtype=np.float32).tobytes())
    except BaseException:
        os.remove(new_path)
        raise
    del old
    os.remove(path)
    return new_path


def _spill(documents: Iterable, spill: SpillFactory, dim: Optional[int]) -> Corpus:
    """Write a one-shot iterable of documents to a raw file, return a Corpus over its mmap.

    The file is float16 while every document is float16, float32 otherwise: a wider document
    after float16 ones widens what was written so far instead of being rounded to float16.
    """
    fd, path = spill()
    lens: List[int] = []
    dtype = None
    d = dim
    f = os.fdopen(fd, "wb")
    try:
        try:
            for i, x in enumerate(documents):
                a = _check_doc(x, i, d)
                if a.shape[0] == 0:
                    lens.append(0)
                    continue
                if d is None:
                    d = a.shape[1]
                if dtype is None:
                    dtype = np.float16 if a.dtype == np.float16 else np.float32
                elif dtype == np.float16 and a.dtype != np.float16:
                    f.close()
                    path = _widen_spill(path, spill)
                    f = open(path, "ab")
                    dtype = np.float32
                f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
                lens.append(a.shape[0])
        finally:
            f.close()
    except BaseException:
        os.remove(path)
        raise
    if not lens:
        os.remove(path)
        raise InvalidInputError("documents: the corpus is empty (no documents)")
    if d is None:
        os.remove(path)
        raise InvalidInputError("documents: every document is empty (no token vectors to index)")
    total = int(sum(lens))
    vec = np.memmap(path, dtype=dtype, mode="r", shape=(total, d))
    return Corpus(flat=Embeddings(vec, np.asarray(lens, np.int64)), cleanup=path)


def as_queries(queries, dim: Optional[int] = None) -> List[np.ndarray]:
    """Normalise queries to a list of float32 ``[m_i, dim]`` arrays, validated.

    Accepts one ``[m, dim]`` array, a list of such arrays (lengths may differ), or a
    ``[nq, m, dim]`` array (numpy or torch; float16, bfloat16, float32, float64). ``dim``: the
    dimension every query must have (the index's). Raises :class:`InvalidInputError`, naming
    the query, on empty input (no queries, a query without tokens), other numbers of dims
    (1-D, 4-D, a list holding 3-D arrays), dimension 0 or another dim than ``dim``,
    unsupported dtypes, tensors without dense data (meta, sparse: see :func:`to_numpy`) and
    NaN/inf.
    """
    if isinstance(queries, (list, tuple)):
        qs = [to_numpy(q, f"query {i}") for i, q in enumerate(queries)]
        for i, q in enumerate(qs):
            if q.ndim != 2:
                hint = " (a list is a list of queries: pass one query as a 2-D array)" if q.ndim < 2 else ""
                raise InvalidInputError(
                    f"query {i}: expected a 2-D [n_tokens, dim] array, got shape {tuple(q.shape)}{hint}")
    else:
        a = to_numpy(queries, "queries")
        if a.ndim == 2:
            qs = [a]
        elif a.ndim == 3:
            qs = [a[i] for i in range(a.shape[0])]
        else:
            raise InvalidInputError(
                f"queries: expected [m, dim], [nq, m, dim] or a list of [m, dim] arrays, got shape {tuple(a.shape)}"
            )
    if not qs:
        raise InvalidInputError("queries: no queries given")
    out = []
    for i, q in enumerate(qs):
        if q.shape[0] == 0:
            raise InvalidInputError(f"query {i} has no token vectors")
        if dim is not None and q.shape[1] != dim:
            raise InvalidInputError(f"query {i}: dim {q.shape[1]} does not match the index dim {dim}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise InvalidInputError(f"query {i} contains NaN or inf values")
        out.append(q)
    d0 = out[0].shape[1]
    for i, q in enumerate(out):
        if q.shape[1] != d0:
            raise InvalidInputError(f"query {i}: dim {q.shape[1]} differs from query 0's dim {d0}")
    return out

"""Embedding bundles: token embeddings of a corpus (or of queries) as plain files in a folder.

A bundle is the layout of ``shared/data/msmarco-5k``::

    doc_embeddings.f16.npy   float16 [total_tokens, dim]   documents' token vectors, document after document
    doclens.npy              int    [n_docs]                tokens per document
    doc_ids.txt              one external id per line       (line i = document i)
    query_embeddings.f16.npy / query_lens.npy / query_ids.txt   the same for queries (optional)

Document ``i`` is rows ``offsets[i]:offsets[i + 1]`` with ``offsets = [0, *cumsum(doclens)]``.
Embeddings are opened memory-mapped, never unpickled. :class:`BundleWriter` writes the same
layout incrementally (the embeddings never have to fit in memory).
"""
from __future__ import annotations

import os
import tempfile
from typing import List, Optional, Tuple

import numpy as np

from .embeddings import Embeddings
from .errors import InvalidInputError

__all__ = ["FILES", "load_bundle", "load_query_bundle", "BundleWriter", "read_ids"]

# kind -> (embeddings, lengths, ids)
FILES = {
    "doc": ("doc_embeddings.f16.npy", "doclens.npy", "doc_ids.txt"),
    "query": ("query_embeddings.f16.npy", "query_lens.npy", "query_ids.txt"),
}


def read_ids(path: str) -> List[str]:
    """One id per line (trailing newline and surrounding whitespace stripped).

    An empty line, an id containing whitespace (it could not be written to a TREC run) or a line
    that is not UTF-8 raises :class:`InvalidInputError` ``"<path>:<line>: ..."``.
    """
    ids = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                x = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InvalidInputError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1})") from None
            if n == 1 and x.startswith("\ufeff"):  # a UTF-8 byte order mark
                x = x[1:]
            if not x.strip() or any(c.isspace() for c in x.strip()):
                raise InvalidInputError(f"{path}:{n}: id {x!r} is empty or contains whitespace "
                                        "(it could not be written to a TREC run)")
            ids.append(x.strip())
    return ids


def load_bundle(path: str, kind: str = "doc") -> Tuple[Embeddings, Optional[List[str]]]:
    """Open the ``kind`` ("doc" or "query") part of the bundle at ``path``.

    Returns (``plaid.Embeddings`` over the memory-mapped vectors, ids or None when the ids file is
    absent). Raises :class:`InvalidInputError` for a missing folder or file, a file that is not a
    plain ``.npy`` array (truncated, empty, pickled), vectors of dimension 0, lengths that do not
    sum to the embedding rows, or an ids file of the wrong length.
    """
    emb_name, lens_name, ids_name = FILES[kind]
    if not os.path.isdir(path):
        raise InvalidInputError(f"embeddings bundle not found: {path} is not a directory")
    emb_path, lens_path = os.path.join(path, emb_name), os.path.join(path, lens_name)
    for p in (emb_path, lens_path):
        if not os.path.exists(p):
            raise InvalidInputError(f"embeddings bundle {path} has no {os.path.basename(p)}")
    arrays = []
    for p, mmap in ((emb_path, "r"), (lens_path, None)):
        try:
            arrays.append(np.load(p, mmap_mode=mmap, allow_pickle=False))
        except (ValueError, EOFError, OSError) as e:  # not a .npy, an object array, truncated, empty
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "pickled" in reason:
                reason = "not a .npy array file, or one of pickled or object data, which is never loaded"
            raise InvalidInputError(f"embeddings bundle {path}: cannot read {os.path.basename(p)} ({reason})") from None
    vectors, lens = arrays
    if lens.ndim != 1 or not np.issubdtype(lens.dtype, np.integer):
        raise InvalidInputError(f"{lens_path}: expected a 1-D integer array, got {lens.dtype}{list(lens.shape)}")
    total = int(lens.sum())
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise InvalidInputError(f"{emb_path}: expected a 2-D [tokens, dim] array with dim > 0, got shape "
                                f"{list(vectors.shape)}")
    if total != vectors.shape[0]:
        raise InvalidInputError(f"embeddings bundle {path}: {lens_name} sum to {total} tokens but {emb_name} "
                                f"has {vectors.shape[0]} rows")
    try:
        emb = Embeddings(vectors, lens)
    except InvalidInputError as e:
        raise InvalidInputError(f"embeddings bundle {path}: {e}") from None
    ids_path = os.path.join(path, ids_name)
    ids = None
    if os.path.exists(ids_path):
        ids = read_ids(ids_path)
        if len(ids) != len(lens):
            raise InvalidInputError(f"embeddings bundle {path}: {ids_name} has {len(ids)} ids for {len(lens)} "
                                    f"entries of {lens_name}")
    return emb, ids


def load_query_bundle(path: str) -> Tuple[List[np.ndarray], List[str]]:
    """Queries of a bundle as float32 ``[m_i, dim]`` arrays and their ids ("0", "1", ... when absent)."""
    emb, ids = load_bundle(path, "query")
    queries = [np.asarray(q, dtype=np.float32) for q in emb]
    empty = [i for i, q in enumerate(queries) if len(q) == 0]
    if empty:
        raise InvalidInputError(f"embeddings bundle {path}: query {empty[0]} has no token vectors")
    return queries, ids if ids is not None else [str(i) for i in range(len(queries))]


class BundleWriter:
    """Writes one part (``kind``) of a bundle incrementally: ``append(id, vectors)`` then ``close()``.

    Vectors are appended to a raw float16 spill file; :meth:`close` turns it into the ``.npy``
    (so that memory holds one batch at a time) and writes lengths and ids. With ``path=None`` only
    the spill file is kept: :meth:`embeddings` returns the memory-mapped corpus for indexing and
    :meth:`discard` removes it.
    """

    def __init__(self, path: Optional[str], kind: str = "doc", spill_dir: Optional[str] = None):
        self.path, self.kind = path, kind
        if path is not None:
            os.makedirs(path, exist_ok=True)
            spill_dir = path
        fd, self._spill = tempfile.mkstemp(prefix=".plaid-bundle-", suffix=".f16", dir=spill_dir)
        self._f = os.fdopen(fd, "wb")
        self.lens: List[int] = []
        self.ids: List[str] = []
        self.dim: Optional[int] = None

    def append(self, id: str, vectors: np.ndarray) -> None:
        """Add one document (or query): its id and its ``[n_tokens, dim]`` vectors."""
        x = np.asarray(vectors)
        if x.ndim != 2 or (self.dim is not None and x.shape[1] != self.dim):
            raise InvalidInputError(f"bundle: expected a [n, {self.dim}] array, got shape {x.shape}")
        self.dim = x.shape[1]
        self._f.write(np.ascontiguousarray(x, dtype=np.float16).tobytes())
        self.lens.append(x.shape[0])
        self.ids.append(id)

    def _vectors(self) -> np.ndarray:
        if not self._f.closed:
            self._f.flush()
        total = int(sum(self.lens))
        if total == 0:
            return np.zeros((0, self.dim or 0), np.float16)
        return np.memmap(self._spill, dtype=np.float16, mode="r", shape=(total, self.dim))

    def embeddings(self) -> Embeddings:
        """The vectors added so far as a memory-mapped :class:`plaid.Embeddings`."""
        return Embeddings(self._vectors(), np.asarray(self.lens, np.int64))

    def close(self) -> None:
        """Write the bundle files (when ``path`` was given) and remove the spill file."""
        emb_name, lens_name, ids_name = FILES[self.kind]
        self._f.close()
        try:
            if self.path is not None:
                vec = self._vectors()
                out = np.lib.format.open_memmap(os.path.join(self.path, emb_name), mode="w+",
                                                dtype=np.float16, shape=vec.shape)
                step = 1 << 18
                for s in range(0, vec.shape[0], step):
                    out[s : s + step] = vec[s : s + step]
                out.flush()
                del out, vec
                np.save(os.path.join(self.path, lens_name), np.asarray(self.lens, np.int32), allow_pickle=False)
                with open(os.path.join(self.path, ids_name), "w", encoding="utf-8") as f:
                    f.writelines(f"{x}\n" for x in self.ids)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the spill file."""
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._spill):
            os.remove(self._spill)

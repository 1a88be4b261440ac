"""Encoding tokens into an index generation (shared by :class:`~plaid.Indexer` builds,
:meth:`~plaid.Index.add` and :meth:`~plaid.Index.compact`): centroid ids, residual codes and norms
streamed into a writer's memory-mapped arrays, and the inverted file built from (centroid,
document) pairs by a counting sort.

**Every core, one result.** Chunks of whole documents are encoded by a pool of worker threads
(:func:`~plaid.indexing.kmeans.worker_pool`, as many as ``torch.get_num_threads()``), each chunk
entirely in one worker: reading it from the
(memory-mapped) corpus, nearest centroids, residual codes, norms, its (centroid, document) pairs.
Workers run their numeric kernels (numpy and faiss) single-threaded (faiss's thread count is a
per-thread setting), so a chunk's bytes do not depend on which worker encoded it or how many
there are, and the calling thread writes the chunks in document order: the files are the same
for any thread count. Reading overlaps computing (the next chunks are read while others encode).

**Bounded memory.** At most ``workers + READ_AHEAD`` chunks are in flight; each written chunk's
pages are dropped from the process' resident set (they stay in the page cache until written
back), and the (centroid, document) pairs go to a scratch file in the index folder, not to RAM,
until the inverted file is assembled from them. The build's memory is then the chunks in flight,
the centroids, and the inverted file itself (which a searcher holds in memory anyway).
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..codecs import NormQuantizer, ResidualCodec
from ..embeddings import Corpus, release_pages
from ..store import IndexWriter
from ..store.manifest import UINT16_CENTROIDS, UINT16_DOCUMENTS
from .kmeans import CentroidAssigner, num_workers, worker_pool

__all__ = ["warn_empty", "encode_segment", "InvertedFileBuilder", "space_needed", "READ_AHEAD", "SPACE_SLACK",
           "ivf_dtype"]

#: Chunks read and encoded ahead of the one being written, beyond one per worker: a worker
#: never waits for the writer, and memory stays a few chunks (~100 MB each at 65,536 tokens).
READ_AHEAD = 1
#: Pairs per block when the inverted file is assembled from the scratch file.
IVF_BLOCK = 1 << 22


#: Bytes added to every free-space estimate: the manifest, .npy headers (128 bytes each), the
#: journal (a few kB in all; a 1 MB tmpfs must still hold a small index).
SPACE_SLACK = 64 << 10
#: Bytes per (centroid, document) pair in the inverted file's scratch file (two int32).
PAIR_SCRATCH_BYTES = 8


def space_needed(num_tokens: int, num_docs: int, num_centroids: int, dim: int, code_bytes: int, normalized: bool,
                 doc_id_bytes: int = 0, old_pairs: int = 0, old_docs: int = 0) -> Tuple[int, str]:
    """An upper bound of the bytes a build (or an ``add``) writes into the folder at its peak, and
    how it was reckoned (for messages).

    ``num_tokens`` / ``num_docs``: the documents being encoded; ``old_pairs`` / ``old_docs``: the
    existing inverted file's entries and documents (``add`` rewrites ``ivf`` and ``doclens``);
    ``doc_id_bytes``: UTF-8 bytes of every external id (0 without ids). Each token writes its
    centroid id, residual code and norm; each token makes at most one (centroid, document) pair,
    held in a scratch file (8 bytes) until the inverted file (2 or 4 bytes) is written.
    """
    per_token = (2 if num_centroids <= UINT16_CENTROIDS else 4) + int(code_bytes) + (1 if normalized else 0)
    pairs = int(num_tokens)
    docs = int(num_docs) + int(old_docs)
    ivf_peak = max(PAIR_SCRATCH_BYTES * pairs, np.dtype(ivf_dtype(docs)).itemsize * (pairs + int(old_pairs)))
    small = 8 * (num_centroids + 1) + 4 * docs + 4 * num_centroids * dim
    ids = int(doc_id_bytes) + 8 * (docs + 1) if doc_id_bytes else 0
    needed = per_token * int(num_tokens) + ivf_peak + small + ids + SPACE_SLACK
    what = (f"{int(num_tokens):,} tokens x {per_token} bytes (centroid id, residual code"
            f"{', norm' if normalized else ''}) + the inverted file, at most {_fmt(ivf_peak)} while it is built"
            f"{f' + document ids {_fmt(ids)}' if ids else ''} + {_fmt(small + SPACE_SLACK)} of small arrays")
    return int(needed), what


def _fmt(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def ivf_dtype(num_documents: int) -> type:
    """The inverted file's document-id dtype: uint16 while ``num_documents`` fits (half the bytes of
    int32; read back as int32), else int32."""
    return np.uint16 if num_documents <= UINT16_DOCUMENTS else np.int32


def warn_empty(corpus: Corpus, doc_base: int = 0) -> int:
    """Warn about empty documents (naming their ids); returns how many there are."""
    empty = np.flatnonzero(corpus.doclens == 0) + doc_base
    if len(empty):
        warnings.warn(
            f"{len(empty)} empty document(s) (ids {', '.join(map(str, empty[:5]))}"
            f"{', ...' if len(empty) > 5 else ''}) are indexed as empty: they keep their ids and are never returned",
            stacklevel=4,
        )
    return int(len(empty))


class InvertedFileBuilder:
    """The inverted file of one generation, from (centroid, document) pairs given chunk by chunk.

    :meth:`add` takes one chunk's distinct pairs sorted by (centroid, document), chunks in
    ascending document order; they are appended to a scratch file of the writer (8 bytes a pair)
    and only counted in memory. :meth:`write` assembles ``ivf`` by a counting sort (each
    centroid's documents stay ascending, after those of an existing inverted file) and writes
    ``ivf`` and ``ivf_offsets``. Memory: the counts, one block of pairs, and ``ivf`` itself.
    """

    def __init__(self, writer: IndexWriter, num_centroids: int):
        self.writer = writer
        self.counts = np.zeros(num_centroids, np.int64)
        self.chunks: List[int] = []  # pairs per added chunk
        self._fd: Optional[int] = None
        self._path: Optional[str] = None

    def add(self, cells: np.ndarray, docs: np.ndarray) -> None:
        """One chunk's pairs: ``cells`` and ``docs`` int32 [p], sorted by (cell, doc)."""
        if len(cells) == 0:
            return
        if self._fd is None:
            self._fd, self._path = self.writer.scratch_file()
        self.counts += np.bincount(cells, minlength=len(self.counts))
        _write_all(self._fd, np.ascontiguousarray(cells, np.int32))
        _write_all(self._fd, np.ascontiguousarray(docs, np.int32))
        self.chunks.append(len(cells))

    def write(self, num_documents: int, old_ivf: Optional[np.ndarray] = None,
              old_offsets: Optional[np.ndarray] = None) -> int:
        """Write ``ivf`` ([P], :func:`ivf_dtype` of ``num_documents``, the index's documents after
        this generation) and ``ivf_offsets`` (int64 [C + 1]); the lists of ``old_ivf`` /
        ``old_offsets`` (an existing inverted file over at most C centroids) come first. Removes
        the scratch file. Returns P."""
        C = len(self.counts)
        old_counts = np.zeros(C, np.int64)
        if old_ivf is not None and len(old_ivf):
            old_counts[: len(old_offsets) - 1] = np.diff(old_offsets)
        offsets = np.zeros(C + 1, np.int64)
        np.cumsum(old_counts + self.counts, out=offsets[1:])
        P = int(offsets[-1])
        ivf = np.empty(P, ivf_dtype(num_documents))
        fill = offsets[:-1].copy()
        if old_counts.any():  # old lists first, cell by cell: one shift per cell
            shift = np.repeat(offsets[:-1] - np.concatenate([[0], np.cumsum(old_counts)[:-1]]), old_counts)
            ivf[np.arange(len(old_ivf), dtype=np.int64) + shift] = old_ivf
            del shift
            fill += old_counts
        try:
            if self._fd is not None:
                os.lseek(self._fd, 0, os.SEEK_SET)
                for n in self.chunks:
                    cells = _read_exact(self._fd, n)
                    docs = _read_exact(self._fd, n)
                    start = np.flatnonzero(np.concatenate([[True], cells[1:] != cells[:-1]]))
                    run = np.repeat(start, np.diff(np.append(start, n)))
                    ivf[fill[cells] + (np.arange(n) - run)] = docs
                    fill += np.bincount(cells, minlength=C)
        finally:
            self.close()
        self.writer.write("ivf", ivf)
        self.writer.write("ivf_offsets", offsets)
        return P

    def close(self) -> None:
        """Remove the scratch file (also done by the writer's commit or abort)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            if os.path.exists(self._path):
                os.remove(self._path)
            self._path = None


def _write_all(fd: int, a: np.ndarray) -> None:
    view = memoryview(a.reshape(-1).view(np.uint8))
    while len(view):
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> np.ndarray:
    buf = bytearray(4 * n)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise OSError("plaid: the inverted file's scratch file ended early")
        got += k
    return np.frombuffer(buf, np.int32)


@dataclass
class _Encoded:
    """One chunk, encoded: tokens ``lo:hi`` of the segment."""

    lo: int
    hi: int
    codes: np.ndarray            # int64 [t] centroid ids
    residuals: np.ndarray        # uint8 [t, code_bytes]
    norms: Optional[np.ndarray]  # uint8 [t] norm codes, when normalized
    cells: np.ndarray            # int32 [p] distinct (cell, doc) pairs, sorted
    docs: np.ndarray             # int32 [p] global document ids


def _encode_chunk(corpus: Corpus, start: int, end: int, centroids: np.ndarray, assigner: CentroidAssigner,
                  codec: ResidualCodec, norms: Optional[NormQuantizer], doc_base: int) -> _Encoded:
    lo, hi = int(corpus.offsets[start]), int(corpus.offsets[end])
    x = corpus.read(start, end)
    a = assigner.assign(x)
    x -= centroids[a]
    r = codec.encode(x)
    del x
    norm_codes = None
    if norms is not None:  # one-byte codes of the decoded norms (the table's values are all > 0)
        norm_codes = norms.encode(codec.decoded_norms(centroids, a, r))
    n = end - start
    d = np.repeat(np.arange(n, dtype=np.int64), corpus.doclens[start:end])
    key = np.unique(a * n + d)  # (cell, doc) pairs, deduplicated, sorted by cell then doc
    return _Encoded(lo, hi, a, r, norm_codes, (key // n).astype(np.int32), (key % n + start + doc_base).astype(np.int32))


def encode_segment(writer: IndexWriter, segment: str, corpus: Corpus, centroids: np.ndarray,
                   assigner: CentroidAssigner, codec: ResidualCodec, doc_base: int, chunk_tokens: int,
                   show_progress: bool, norms: Optional[NormQuantizer]) -> InvertedFileBuilder:
    """Encode every token of ``corpus`` into arrays ``<segment>_codes`` / ``<segment>_residuals``,
    and, when ``norms`` is given (a renormalising index), ``<segment>_norms``: the norm of each
    decoded, not yet renormalised vector as a one-byte code of ``norms`` (search divides by it
    instead of decoding to find it).

    Chunks of about ``chunk_tokens`` tokens are encoded by :func:`~plaid.indexing.kmeans.num_workers`
    threads (see
    the module's docstring: the files do not depend on their number). Returns the
    :class:`InvertedFileBuilder` holding the (centroid, document) pairs, documents numbered
    ``doc_base`` + position in ``corpus``; its :meth:`~InvertedFileBuilder.write` writes the
    inverted file.
    """
    T = corpus.num_tokens
    code_dtype = np.uint16 if len(centroids) <= UINT16_CENTROIDS else np.int32
    codes_out = writer.create(f"{segment}_codes", (T,), code_dtype)
    res_out = writer.create(f"{segment}_residuals", (T, codec.code_bytes), np.uint8)
    norms_out = writer.create(f"{segment}_norms", (T,), np.uint8) if norms is not None else None
    ivf = InvertedFileBuilder(writer, len(centroids))
    workers = num_workers()
    # the codec's lazily built tables, built here once rather than raced for by the workers
    probe = codec.encode(np.zeros((1, centroids.shape[1]), np.float32))
    codec.decoded_norms(centroids, np.zeros(1, np.int64), probe)
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="plaid: encoding", disable=not show_progress)
    chunks = ((s, e) for s, e in corpus.chunks(chunk_tokens) if corpus.offsets[e] > corpus.offsets[s])
    pool = worker_pool(workers)
    pending: deque = deque()
    try:
        def submit() -> None:
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(_encode_chunk, corpus, nxt[0], nxt[1], centroids, assigner, codec,
                                           norms, doc_base))

        for _ in range(workers + READ_AHEAD):
            submit()
        while pending:
            c = pending.popleft().result()
            submit()
            codes_out[c.lo : c.hi] = c.codes
            res_out[c.lo : c.hi] = c.residuals
            written = [codes_out, res_out]
            if norms_out is not None:
                norms_out[c.lo : c.hi] = c.norms
                written.append(norms_out)
            for out in written:  # written: out of our resident set (the page cache keeps them)
                release_pages(out, c.lo, c.hi)
            ivf.add(c.cells, c.docs)
            bar.update(c.hi - c.lo)
    except BaseException:
        for f in pending:
            f.cancel()
        ivf.close()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    writer.finish(f"{segment}_codes")
    writer.finish(f"{segment}_residuals")
    if norms_out is not None:
        writer.finish(f"{segment}_norms")
    return ivf

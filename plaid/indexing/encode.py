"""Encoding tokens into an index generation (shared by :class:`~plaid.Indexer` builds and
:meth:`~plaid.Index.add`): centroid ids, residual codes and norms streamed into a writer's
memory-mapped arrays, and the inverted file merged from (centroid, document) pairs.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..codecs import NormQuantizer, ResidualCodec
from ..embeddings import Corpus
from ..store import IndexWriter
from ..store.manifest import UINT16_CENTROIDS, UINT16_DOCUMENTS
from .kmeans import CentroidAssigner

__all__ = ["warn_empty", "encode_segment", "merge_ivf", "write_ivf"]


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


def encode_segment(writer: IndexWriter, segment: str, corpus: Corpus, centroids: np.ndarray,
                   assigner: CentroidAssigner, codec: ResidualCodec, doc_base: int, chunk_tokens: int,
                   show_progress: bool, norms: Optional[NormQuantizer]) -> Tuple[np.ndarray, np.ndarray]:
    """Encode every token of ``corpus`` into arrays ``<segment>_codes`` / ``<segment>_residuals``,
    and, when ``norms`` is given (a renormalising index), ``<segment>_norms``: the norm of each
    decoded, not yet renormalised vector as a one-byte code of ``norms`` (search divides by it
    instead of decoding to find it).

    Returns the (centroid, document) pairs for the inverted file: int32 cells and int32 global
    document ids (``doc_base`` + position in ``corpus``), deduplicated, grouped by chunk.
    """
    T, N = corpus.num_tokens, corpus.num_docs
    code_dtype = np.uint16 if len(centroids) <= UINT16_CENTROIDS else np.int32
    codes_out = writer.create(f"{segment}_codes", (T,), code_dtype)
    res_out = writer.create(f"{segment}_residuals", (T, codec.code_bytes), np.uint8)
    norms_out = writer.create(f"{segment}_norms", (T,), np.uint8) if norms is not None else None
    cells, docs = [], []
    bar = tqdm(total=T, unit="tok", unit_scale=True, desc="plaid: encoding", disable=not show_progress)
    for start, end in corpus.chunks(chunk_tokens):
        lo, hi = int(corpus.offsets[start]), int(corpus.offsets[end])
        if hi == lo:
            continue
        x = corpus.read(start, end)
        a = assigner.assign(x)
        codes_out[lo:hi] = a
        r = codec.encode(x - centroids[a])
        res_out[lo:hi] = r
        if norms_out is not None:
            norms_out[lo:hi] = norms.encode(codec.decoded_norms(centroids, a, r))
        d = np.repeat(np.arange(start, end, dtype=np.int64), corpus.doclens[start:end])
        key = np.unique(a.astype(np.int64) * N + d)  # (cell, doc) pairs, deduplicated
        cells.append((key // N).astype(np.int32))
        docs.append((key % N + doc_base).astype(np.int32))
        bar.update(hi - lo)
    bar.close()
    writer.finish(f"{segment}_codes")
    writer.finish(f"{segment}_residuals")
    if norms_out is not None:
        writer.finish(f"{segment}_norms")
    if not cells:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(cells), np.concatenate(docs)


def merge_ivf(num_centroids: int, cells: np.ndarray, docs: np.ndarray,
              old_ivf: Optional[np.ndarray] = None, old_offsets: Optional[np.ndarray] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Inverted file from (cell, doc) pairs, appended after an existing one.

    New documents must have larger ids than any in ``old_ivf`` and be in ascending order per cell
    (as :func:`encode_segment` returns them), so each cell's list stays sorted.
    Returns (ivf int32 [P], ivf_offsets int64 [num_centroids + 1]).
    """
    if old_ivf is not None and len(old_ivf):
        old_cells = np.repeat(np.arange(len(old_offsets) - 1, dtype=np.int32), np.diff(old_offsets))
        cells = np.concatenate([old_cells, cells])
        docs = np.concatenate([np.asarray(old_ivf, np.int32), docs])
    order = np.argsort(cells, kind="stable")
    offsets = np.zeros(num_centroids + 1, np.int64)
    np.cumsum(np.bincount(cells, minlength=num_centroids), out=offsets[1:])
    return docs[order].astype(np.int32), offsets


def write_ivf(writer: IndexWriter, ivf: np.ndarray, offsets: np.ndarray, num_documents: int) -> None:
    """Write the inverted file: document ids as uint16 while ``num_documents`` fits (half the
    bytes of int32; read back as int32), else int32; offsets int64."""
    writer.write("ivf", ivf.astype(np.uint16 if num_documents <= UINT16_DOCUMENTS else np.int32))
    writer.write("ivf_offsets", offsets)

"""``Index``: a committed index on disk, and the mutations that keep it alive (add, delete, compact).

Every mutation runs inside the store's writer (:func:`plaid.store.writing`): it takes the writer
lock, writes new files beside the old ones and switches the manifest atomically, so a process
killed at any instant leaves the old state or the new one, never a mix; leftovers of a killed
writer are removed by the next one. Document ids never change: deleted documents keep their slot
(tombstones), compaction drops their tokens but not their ids, and added documents get the next ids.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from ..embeddings import as_corpus
from ..errors import InvalidInputError
from ..store import (IndexWriter, Manifest, Segment, Snapshot, check_doc_ids, checked_codes, encode_doc_ids,
                     open_snapshot, read_manifest, resolve_ids, verify, writing)
from ..codecs import dequantize_centroids, quantize_centroids
from .encode import InvertedFileBuilder, encode_segment, space_needed, warn_empty
from .kmeans import CentroidAssigner, assign_all, sample_token_ids, train_centroids
from .pooling import default_threads, pool_corpus, pool_factor_of

__all__ = ["Index", "OUTLIER_FRACTION"]

logger = logging.getLogger(__name__)

#: ``add`` trains new centroids when more than this fraction of the new tokens are outliers
#: (residual norm beyond the build's 99th percentile; 1% are by definition on in-distribution data).
OUTLIER_FRACTION = 0.05
#: Tokens sampled from added documents to decide whether they need new centroids.
OUTLIER_SAMPLE = 1 << 16


class Index:
    """A committed index on disk.

    ``plaid.Index(path)`` opens an existing index (one generation, see :meth:`refresh`);
    :meth:`plaid.Indexer.build` returns one. Search it with ``plaid.Searcher(index)``;
    :meth:`add`, :meth:`delete` and :meth:`compact` change it in place, atomically.
    """

    def __init__(self, path):
        self.path = os.fspath(getattr(path, "path", path))
        self._manifest: Manifest = read_manifest(self.path)  # a clear error for a missing or bad index
        self._opened: Optional[Snapshot] = None
        self._manifest_json: Optional[dict] = None

    def refresh(self) -> "Index":
        """Follow the newest committed generation (another process may have committed since)."""
        self._manifest = read_manifest(self.path)
        self._opened = None
        self._manifest_json = None
        return self

    @property
    def _snap(self) -> Snapshot:
        """The handle's generation with every file mapped (opened on first use)."""
        if self._opened is None:
            snap = open_snapshot(self.path)
            self._opened, self._manifest = snap, snap.manifest
            self._manifest_json = None
        return self._opened

    # -- facts ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The committed manifest as JSON (a copy; see ``docs/FORMAT.md``)."""
        if self._manifest_json is None:
            self._manifest_json = self._manifest.to_json()
        return json.loads(json.dumps(self._manifest_json))

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def num_documents(self) -> int:
        """Number of document ids ever assigned (including deleted ones)."""
        return self._manifest.num_documents

    @property
    def num_deleted(self) -> int:
        """Number of deleted documents (counted from the tombstones, not taken from the manifest)."""
        return int(len(self._snap.deleted))

    def __len__(self) -> int:
        """Number of live (not deleted) documents."""
        return self.num_documents - self.num_deleted

    @property
    def num_tokens(self) -> int:
        """Stored vectors: the documents' tokens, or their pooled vectors in a pooled index (:attr:`pooling`)."""
        return self._manifest.num_tokens

    @property
    def num_centroids(self) -> int:
        return self._manifest.num_centroids

    @property
    def codec(self) -> dict:
        """Codec parameters, e.g. ``{"name": "pq", "m": 32, "nbits": 8, "code_bytes": 32}``."""
        return dict(self._manifest.codec)

    @property
    def generation(self) -> int:
        return self._manifest.generation

    @property
    def pooling(self) -> Optional[dict]:
        """How documents were pooled at indexing time: ``{"method": "ward", "factor": f}``, or None
        (each token stored). With pooling, ``num_tokens``, the document lengths and
        :meth:`bytes_per_token` count the stored (pooled) vectors."""
        p = self._manifest.pooling
        return None if p is None else dict(p)

    @property
    def search_depth(self) -> int:
        """The default search depth the index records (``Indexer(search_depth=...)``, by preset):
        searches keep this many times PLAID's default ``ndocs`` (see :class:`plaid.SearchParams`)."""
        return self._manifest.search_depth

    def nbytes(self) -> int:
        """Bytes of all committed array files plus the manifest."""
        return self._snap.nbytes()

    def bytes_per_token(self) -> float:
        """Whole index folder size per stored vector (a token, or a pooled vector: see :attr:`pooling`)."""
        return self.nbytes() / max(1, self.num_tokens)

    def payload_bytes_per_token(self) -> int:
        """Bytes stored per token: centroid id, residual code and (normalised indexes) the norm."""
        m = self._manifest
        seg = m.segments[0].name if m.segments else None
        if seg is None:
            return 0
        norm = m.arrays[f"{seg}_norms"].dtype.itemsize if m.normalized else 0
        return m.arrays[f"{seg}_codes"].dtype.itemsize + m.code_bytes + norm

    @property
    def doc_ids(self) -> Optional[List[str]]:
        """External ids (list of str, position = internal id) or None when the index has none.
        Deleted documents keep their entry (see :meth:`deleted_ids`)."""
        table = self._snap.doc_ids
        if table is None:
            return None
        table.validate()
        return list(table.tolist())

    def deleted_ids(self) -> np.ndarray:
        """Sorted internal ids of deleted documents (int64)."""
        return self._snap.deleted.copy()

    def internal_ids(self, ids) -> np.ndarray:
        """Map ids (external strings or internal ints) to internal ids of live documents (int64).

        Raises :class:`InvalidInputError` listing a few unknown or deleted ids.
        """
        s = self._snap
        return resolve_ids(ids, s.manifest.num_documents, s.doc_ids, s.deleted)

    def external_ids(self, ids: Iterable[int]) -> List[Optional[str]]:
        """External ids of internal ids (None for -1); requires an index built with doc_ids."""
        table = self._snap.doc_ids
        if table is None:
            raise InvalidInputError("this index stores no external doc_ids (build it with doc_ids=...)")
        return [table[i] if i >= 0 else None for i in ids]

    def verify(self) -> List[str]:
        """Problems found in the committed index, one line each naming the file (empty: intact).

        Checks every file's type, size and CRC-32, the structure of the in-memory arrays, and every
        token's centroid id and norm (reads the whole index once).
        """
        return verify(self.path)

    def load_codec(self):
        """The trained residual codec (for decoding)."""
        return self._snap.codec

    def info(self) -> dict:
        """Counts, sizes and parameters as a JSON-serialisable dict."""
        m = self._snap.manifest
        return {
            "path": self.path,
            "format_version": m.format_version,
            "generation": self.generation,
            "num_documents": self.num_documents,
            "num_live_documents": len(self),
            "num_deleted": self.num_deleted,
            "num_tokens": self.num_tokens,
            "num_centroids": self.num_centroids,
            "num_segments": len(m.segments),
            "dim": self.dim,
            "codec": self.codec,
            "pooling": self.pooling,
            "search_depth": self.search_depth,
            "normalized": m.normalized,
            "has_doc_ids": m.has_doc_ids,
            "num_empty_documents": m.num_empty_documents,
            "created_by": m.created_by,
            "bytes": self.nbytes(),
            "bytes_per_token": round(self.bytes_per_token(), 3),
            "payload_bytes_per_token": self.payload_bytes_per_token(),
            "build": dict(m.build),
        }

    def __repr__(self) -> str:
        return (f"Index({self.path!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"centroids={self.num_centroids}, codec={json.dumps(self.codec)})")

    # -- mutations -----------------------------------------------------------------------------
    def add(self, documents, doc_ids=None, *, show_progress: bool = True,
            chunk_tokens: int = 1 << 16) -> np.ndarray:
        """Append ``documents`` with the existing codec; returns their internal ids (int64 [n]).

        Old documents are neither re-read nor re-encoded. When more than 5% of the new tokens lie
        outside what the centroids cover (residual norm beyond the 99th percentile seen at build
        time), new centroids are trained on those outliers and appended, so the added documents
        keep a recall close to a full rebuild. ``doc_ids`` are required when the index has
        external ids, and refused when it has none. An index built with token pooling
        (:attr:`pooling`) pools the new documents the same way first; one whose manifest records
        a pooling this plaid cannot reproduce is refused (:class:`IndexCorruptError`) before
        anything is written.
        """
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens <= 0:
            raise InvalidInputError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        with writing(self.path) as w:
            snap = w.snapshot
            m = snap.manifest
            corpus = raw = None
            try:
                factor = pool_factor_of(m.pooling, snap.path)
                corpus = raw = as_corpus(documents, spill=w.scratch_file, dim=m.dim)
                n_old = m.num_documents
                names = self._check_new_ids(snap, doc_ids, corpus.num_docs)
                if factor != 1.0:
                    corpus = pool_corpus(raw, factor, renormalize=m.normalized, spill=w.scratch_file,
                                         chunk_tokens=int(chunk_tokens), threads=default_threads(),
                                         show_progress=show_progress)
                codec = snap.codec
                needed, what = space_needed(
                    corpus.num_tokens, corpus.num_docs, m.num_centroids, m.dim, codec.code_bytes, m.normalized,
                    sum(len(n.encode("utf-8")) for n in snap.doc_ids.tolist() + names) if names is not None else 0,
                    old_pairs=len(snap.ivf), old_docs=n_old)
                w.check_space(needed, what)
                num_empty = warn_empty(raw, n_old)
                centroids, grown = self._grow_centroids(snap, corpus, snap.centroids.copy(), show_progress)
                assigner = CentroidAssigner(centroids, seed=int(m.build.get("seed", 0)))
                seg = f"seg{m.next_segment}"
                ivf = encode_segment(w, seg, corpus, centroids, assigner, codec, n_old,
                                     int(chunk_tokens), show_progress, snap.norm_quantizer)
                ivf.write(n_old + corpus.num_docs, snap.ivf, snap.ivf_offsets)
                w.write("doclens", np.concatenate([snap.doclens, corpus.doclens]).astype(np.int32))
                if grown is not None:
                    for name, arr in grown.items():
                        w.write(name, arr)
                if names is not None:
                    blob, offsets = encode_doc_ids(snap.doc_ids.tolist() + names)
                    w.write("doc_ids_utf8", blob)
                    w.write("doc_ids_offsets", offsets)
                fields = m.fields()
                fields["num_documents"] = n_old + corpus.num_docs
                fields["num_tokens"] = m.num_tokens + corpus.num_tokens
                fields["num_centroids"] = len(centroids)
                fields["num_empty_documents"] = m.num_empty_documents + num_empty
                fields["segments"] = list(m.segments) + [Segment(seg, n_old, n_old + corpus.num_docs,
                                                                 corpus.num_tokens)]
                fields["next_segment"] = m.next_segment + 1
                new_ids = np.arange(n_old, n_old + corpus.num_docs, dtype=np.int64)
                w.commit(fields)
            finally:
                for c in {id(x): x for x in (corpus, raw) if x is not None}.values():
                    c.close()
        self.refresh()
        return new_ids

    @staticmethod
    def _check_new_ids(snap: Snapshot, doc_ids, n: int) -> Optional[list]:
        if snap.manifest.has_doc_ids:
            if doc_ids is None:
                raise InvalidInputError("this index has external doc_ids: pass doc_ids for the added documents")
            deleted = snap.deleted
            live = {x for i, x in enumerate(snap.doc_ids.tolist())}
            if len(deleted):
                names = snap.doc_ids.tolist()
                live -= {names[i] for i in deleted.tolist()}
            return check_doc_ids(doc_ids, n, existing=live)
        if doc_ids is not None:
            raise InvalidInputError("this index was built without doc_ids; add documents without them")
        return None

    @staticmethod
    def _grow_centroids(snap: Snapshot, corpus, centroids: np.ndarray, show_progress: bool):
        """Append centroids for the new tokens that the existing ones do not cover.

        Returns (centroids float32 [C', dim] as stored, the centroid arrays to write or None when
        none were added).
        """
        m = snap.manifest
        limit = m.outlier_residual_norm
        if limit is None:
            return centroids, None
        sample = corpus.take(sample_token_ids(corpus.num_tokens, OUTLIER_SAMPLE, seed=m.generation + 17))
        assigner = CentroidAssigner(centroids)
        norms = np.linalg.norm(sample - centroids[assign_all(assigner, sample)], axis=1)
        outliers = sample[norms > limit]
        frac = len(outliers) / max(1, len(sample))
        if frac <= OUTLIER_FRACTION:
            return centroids, None
        # as many new centroids as the outliers deserve at the index's own density
        tokens_per_centroid = max(1.0, m.num_tokens / max(1, m.num_centroids))
        k = int(round(frac * corpus.num_tokens / tokens_per_centroid))
        k = max(1, min(k, len(outliers) // 4 or 1))
        if len(centroids) <= 1 << 16 < len(centroids) + k:
            k = (1 << 16) - len(centroids)  # keep uint16 codes valid for existing segments
            if k <= 0:
                return centroids, None
        new = train_centroids(outliers, k, niter=4, seed=m.generation + 23, show_progress=False)
        logger.info("%.0f%% of the added tokens are outliers: %d new centroids", 100 * frac, len(new))
        stored = m.arrays["centroids"].dtype
        if stored == np.int8:  # appended rows with their own scales; the old rows stay as they are
            q = quantize_centroids(new)
            arrays = {"centroids": np.concatenate([np.asarray(snap.mapped("centroids")), q["centroids"]]),
                      "centroid_scales": np.concatenate([np.asarray(snap.mapped("centroid_scales"), np.float32),
                                                         q["centroid_scales"]])}
            new = dequantize_centroids(q["centroids"], q["centroid_scales"])
        else:  # float16 / float32 centroids (an index upgraded from format 2)
            with np.errstate(over="ignore"):
                rounded = new.astype(stored)
            if not np.isfinite(rounded).all():
                return centroids, None  # cannot be stored in this index's float16 centroids
            new = rounded.astype(np.float32)
            arrays = {"centroids": np.concatenate([centroids, new]).astype(stored)}
        return np.concatenate([centroids, new]), arrays

    def delete(self, ids) -> int:
        """Delete documents by external id (str) or internal id (int); returns how many.

        Every other document keeps its id; deleted ones are never returned again. The cost is
        proportional to the number deleted (one small tombstone file), not to the index size.
        Unknown or already deleted ids raise :class:`InvalidInputError` listing a few.
        """
        with writing(self.path) as w:
            snap = w.snapshot
            m = snap.manifest
            internal = np.unique(resolve_ids(ids, m.num_documents, snap.doc_ids, snap.deleted))
            if len(internal) == 0:
                return 0
            name = f"tombstones_g{w.generation}"
            w.write(name, internal.astype(np.int64))
            fields = m.fields()
            fields["tombstones"] = list(m.tombstones) + [name]
            fields["num_deleted"] = len(snap.deleted) + len(internal)
            w.commit(fields)
        self.refresh()
        return int(len(internal))

    def compact(self, *, show_progress: bool = True, chunk_docs: int = 4096) -> None:
        """Rewrite the index without the deleted documents' tokens, as one segment.

        Surviving documents keep their ids (deleted ids stay deleted, with no tokens). Codes and
        residual codes are copied, never re-encoded; memory stays bounded by ``chunk_docs``.
        """
        if isinstance(chunk_docs, bool) or not isinstance(chunk_docs, (int, np.integer)) or chunk_docs <= 0:
            raise InvalidInputError(f"chunk_docs must be a positive integer, got {chunk_docs!r}")
        with writing(self.path) as w:
            self._compact(w, show_progress, int(chunk_docs))
        self.refresh()

    @staticmethod
    def _compact(w: IndexWriter, show_progress: bool, chunk_docs: int) -> None:
        snap = w.snapshot
        m = snap.manifest
        deleted = snap.deleted
        doclens = snap.doclens
        keep_len = doclens.copy()
        keep_len[deleted] = 0
        offsets = snap.doc_offsets
        T = int(keep_len.sum())
        codes_in, res_in, norms_in = snap.codes(), snap.residuals(), snap.norms()
        seg = f"seg{m.next_segment}"
        code_dtype = m.arrays[f"{m.segments[0].name}_codes"].dtype if m.segments else np.uint16
        codes_out = w.create(f"{seg}_codes", (T,), code_dtype)
        res_out = w.create(f"{seg}_residuals", (T, m.code_bytes), np.uint8)
        norms_out = w.create(f"{seg}_norms", (T,), np.uint8) if m.normalized else None
        N = len(doclens)
        C = m.num_centroids
        ivf = InvertedFileBuilder(w, C)
        out = 0
        bar = tqdm(total=N, unit="doc", desc="plaid: compacting", disable=not show_progress)
        for a in range(0, N, chunk_docs):
            b = min(a + chunk_docs, N)
            live = np.flatnonzero(keep_len[a:b]) + a
            if len(live):
                starts = offsets[live]
                lens = doclens[live]
                pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + \
                    np.arange(int(lens.sum()))
                c = checked_codes(codes_in.take(pos), C, f"{snap.path}: index files {snap.token_files('codes')}")
                codes_out[out : out + len(pos)] = c
                res_out[out : out + len(pos)] = res_in.take(pos)
                if norms_out is not None:
                    norms_out[out : out + len(pos)] = norms_in.take(pos)
                out += len(pos)
                d = np.repeat(live, lens)
                key = np.unique(c.astype(np.int64) * N + d)
                ivf.add((key // N).astype(np.int32), (key % N).astype(np.int32))
            bar.update(b - a)
        bar.close()
        ivf.write(N)
        w.write("doclens", keep_len.astype(np.int32))
        fields = m.fields()
        # the old segments and tombstone arrays are replaced: stop referencing them, so the
        # commit removes their files (else compaction would grow the folder)
        for s in m.segments:
            for suffix in ("codes", "residuals", "norms"):
                fields["arrays"].pop(f"{s.name}_{suffix}", None)
        for name in m.tombstones:
            fields["arrays"].pop(name, None)
        fields["num_tokens"] = T
        fields["segments"] = [Segment(seg, 0, N, T)]
        fields["next_segment"] = m.next_segment + 1
        fields["tombstones"] = []
        fields["num_deleted"] = len(deleted)
        if len(deleted):
            name = f"tombstones_g{w.generation}"
            w.write(name, deleted.astype(np.int64))
            fields["tombstones"] = [name]
        w.commit(fields)

"""``Index``: a committed index on disk, and the mutations that keep it alive (add, delete, compact).

Every mutation takes the writer lock, writes new files beside the old ones, fsyncs them and then
switches the manifest atomically (see :mod:`plaid.format`): a process killed at any instant leaves
the old state or the new one, never a mix. Leftovers of a killed writer are removed by the next
commit. Document ids never change: deleted documents keep their slot (tombstones), compaction
drops their tokens but not their ids, and added documents get the next ids.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from .. import format as fmt
from ..embeddings import as_corpus
from ..errors import IndexCorruptError, InvalidInputError
from .codecs import codec_array_names, codec_from_manifest
from .indexer import (OUTLIER_QUANTILE, check_doc_ids, decode_doc_ids, encode_doc_ids, encode_segment,
                      merge_ivf, warn_empty)
from .kmeans import CentroidAssigner, sample_token_ids, train_centroids

__all__ = ["Index"]

#: ``add`` trains new centroids when more than this fraction of the new tokens are outliers
#: (residual norm beyond the build's 99th percentile; 1% are by definition on in-distribution data).
OUTLIER_FRACTION = 0.05


class Index:
    """A committed index on disk (a light handle: opening reads only the manifest).

    ``plaid.Index(path)`` opens an existing index; :meth:`plaid.Indexer.build` returns one.
    Use :meth:`searcher` (or :class:`plaid.Searcher`) to search it; :meth:`add`, :meth:`delete`
    and :meth:`compact` change it in place, atomically.
    """

    def __init__(self, path: str, *, _manifest: Optional[dict] = None):
        self.path = os.fspath(path)
        self.manifest = _manifest if _manifest is not None else fmt.read_manifest(self.path)
        self._doc_ids: Optional[List[str]] = None

    def refresh(self) -> "Index":
        """Re-read the manifest (another process may have committed since)."""
        self.manifest = fmt.read_manifest(self.path)
        self._doc_ids = None
        return self

    # -- facts ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_documents(self) -> int:
        """Number of document ids ever assigned (including deleted ones)."""
        return int(self.manifest["num_documents"])

    @property
    def num_deleted(self) -> int:
        return int(self.manifest.get("num_deleted", 0))

    def __len__(self) -> int:
        """Number of live (not deleted) documents."""
        return self.num_documents - self.num_deleted

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_centroids(self) -> int:
        return int(self.manifest["num_centroids"])

    @property
    def codec(self) -> dict:
        """Codec parameters, e.g. ``{"name": "pq", "m": 32, "nbits": 8, "code_bytes": 32}``."""
        return dict(self.manifest["codec"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def nbytes(self) -> int:
        """Bytes of all committed array files plus the manifest."""
        total = sum(e["bytes"] for e in self.manifest["arrays"].values())
        return total + os.path.getsize(os.path.join(self.path, fmt.MANIFEST))

    def bytes_per_token(self) -> float:
        """Whole index folder size per stored document token."""
        return self.nbytes() / max(1, self.num_tokens)

    def payload_bytes_per_token(self) -> int:
        """Bytes stored per token: centroid id, residual code and (normalised indexes) the norm."""
        seg = self.manifest["segments"][0]["name"]
        arrays = self.manifest["arrays"]
        norm = np.dtype(arrays[f"{seg}_norms"]["dtype"]).itemsize if f"{seg}_norms" in arrays else 0
        return np.dtype(arrays[f"{seg}_codes"]["dtype"]).itemsize + int(self.codec["code_bytes"]) + norm

    def _array(self, name: str, mmap: bool = False) -> np.ndarray:
        try:
            return fmt.open_array(self.path, self.manifest, name, mmap=mmap)
        except IndexCorruptError:
            # a commit by another process since this handle read the manifest removes the files
            # of our generation: move to the committed one (and fail for real if it is corrupt)
            if fmt.read_manifest(self.path)["generation"] == self.generation:
                raise
            self.refresh()
            return fmt.open_array(self.path, self.manifest, name, mmap=mmap)

    @property
    def doc_ids(self) -> Optional[List[str]]:
        """External ids (list of str, position = internal id) or None when the index has none.
        Deleted documents keep their entry (see :meth:`deleted_ids`)."""
        if not self.manifest.get("has_doc_ids"):
            return None
        if self._doc_ids is None:
            self._doc_ids = decode_doc_ids(self._array("doc_ids_utf8"), self._array("doc_ids_offsets"))
        return self._doc_ids

    def deleted_ids(self) -> np.ndarray:
        """Sorted internal ids of deleted documents (int64)."""
        try:
            return load_deleted(self.path, self.manifest)
        except IndexCorruptError:
            if fmt.read_manifest(self.path)["generation"] == self.generation:
                raise
            self.refresh()
            return load_deleted(self.path, self.manifest)

    def internal_ids(self, ids) -> np.ndarray:
        """Map ids (external strings or internal ints) to internal ids of live documents (int64).

        Raises :class:`InvalidInputError` listing a few unknown or deleted ids.
        """
        return resolve_ids(ids, self.num_documents, self.doc_ids, self.deleted_ids())

    def external_ids(self, ids: Iterable[int]) -> List[Optional[str]]:
        """External ids of internal ids (None for -1); requires an index built with doc_ids."""
        names = self.doc_ids
        if names is None:
            raise InvalidInputError("this index stores no external doc_ids (build it with doc_ids=...)")
        return [names[i] if i >= 0 else None for i in ids]

    def verify(self) -> List[str]:
        """Problems found by checking every file's size and CRC-32 (empty list: intact)."""
        return fmt.verify_index(self.path)

    def load_codec(self):
        """The trained residual codec (for decoding)."""
        arrays = {n: self._array(n) for n in codec_array_names(self.codec)}
        return codec_from_manifest(self.dim, self.codec, arrays)

    def searcher(self, **kwargs):
        """A :class:`plaid.Searcher` over this index (keyword arguments are passed on)."""
        from ..search.searcher import Searcher

        return Searcher(self.path, **kwargs)

    def info(self) -> dict:
        """Counts, sizes and parameters as a JSON-serialisable dict."""
        return {
            "path": self.path,
            "format_version": self.manifest["format_version"],
            "generation": self.generation,
            "num_documents": self.num_documents,
            "num_live_documents": len(self),
            "num_deleted": self.num_deleted,
            "num_tokens": self.num_tokens,
            "num_centroids": self.num_centroids,
            "num_segments": len(self.manifest["segments"]),
            "dim": self.dim,
            "codec": self.codec,
            "normalized": self.manifest.get("normalized", False),
            "has_doc_ids": bool(self.manifest.get("has_doc_ids")),
            "bytes": self.nbytes(),
            "bytes_per_token": round(self.bytes_per_token(), 3),
            "payload_bytes_per_token": self.payload_bytes_per_token(),
            "build": self.manifest.get("build", {}),
        }

    def __repr__(self) -> str:
        return (f"Index({self.path!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"centroids={self.num_centroids}, codec={json.dumps(self.codec)})")

    # -- mutations -----------------------------------------------------------------------------
    def add(self, documents, doc_ids=None, *, show_progress: bool = True,
            chunk_tokens: int = 1 << 16) -> np.ndarray:
        """Append ``documents`` with the existing codec; returns their internal ids (int64).

        Old documents are neither re-read nor re-encoded. When more than 5% of the new tokens lie
        outside what the centroids cover (residual norm beyond the 99th percentile seen at build
        time), new centroids are trained on those outliers and appended, so the added documents
        keep a recall close to a full rebuild. ``doc_ids`` are required when the index has
        external ids, and refused when it has none.
        """
        with fmt.writer_lock(self.path):
            self.refresh()
            m = self.manifest
            writer = fmt.IndexWriter(self.path, m["generation"] + 1)
            corpus = None
            try:
                corpus = as_corpus(documents, spill_dir=self.path, dim=self.dim)
                n_old = self.num_documents
                names = self._check_new_ids(doc_ids, corpus.num_docs)
                num_empty = warn_empty(corpus, n_old)
                codec = self.load_codec()
                centroids = self._array("centroids").astype(np.float32)
                centroids, grown = self._grow_centroids(corpus, centroids, codec, show_progress)
                assigner = CentroidAssigner(centroids, seed=int(m.get("build", {}).get("seed", 0)))
                seg = f"seg{int(m['next_segment'])}"
                cells, docs = encode_segment(writer, seg, corpus, centroids, assigner, codec, n_old,
                                             chunk_tokens, show_progress, bool(m.get("normalized")))
                ivf, ivf_offsets = merge_ivf(len(centroids), cells, docs, self._array("ivf"),
                                             self._array("ivf_offsets"))
                writer.write("ivf", ivf)
                writer.write("ivf_offsets", ivf_offsets)
                writer.write("doclens", np.concatenate([self._array("doclens"), corpus.doclens.astype(np.int32)]))
                if grown:
                    writer.write("centroids", centroids.astype(self.manifest["arrays"]["centroids"]["dtype"]))
                if names is not None:
                    blob, offsets = encode_doc_ids(self.doc_ids + names)
                    writer.write("doc_ids_utf8", blob)
                    writer.write("doc_ids_offsets", offsets)
                fields = _carry(m)
                fields["num_documents"] = n_old + corpus.num_docs
                fields["num_tokens"] = self.num_tokens + corpus.num_tokens
                fields["num_centroids"] = len(centroids)
                fields["num_empty_documents"] = int(m.get("num_empty_documents", 0)) + num_empty
                fields["segments"] = m["segments"] + [{"name": seg, "doc_start": n_old,
                                                       "doc_end": n_old + corpus.num_docs,
                                                       "num_tokens": corpus.num_tokens}]
                fields["next_segment"] = int(m["next_segment"]) + 1
                self.manifest = writer.commit(fields)
                self._doc_ids = None
                return np.arange(n_old, n_old + corpus.num_docs, dtype=np.int64)
            except BaseException:
                writer.abort()
                raise
            finally:
                if corpus is not None:
                    corpus.close()

    def _check_new_ids(self, doc_ids, n: int) -> Optional[list]:
        if self.manifest.get("has_doc_ids"):
            if doc_ids is None:
                raise InvalidInputError("this index has external doc_ids: pass doc_ids for the added documents")
            deleted = set(self.deleted_ids().tolist())
            live = {x for i, x in enumerate(self.doc_ids) if i not in deleted}
            return check_doc_ids(doc_ids, n, existing=live)
        if doc_ids is not None:
            raise InvalidInputError("this index was built without doc_ids; add documents without them")
        return None

    def _grow_centroids(self, corpus, centroids: np.ndarray, codec, show_progress: bool):
        """Append centroids for the new tokens that the existing ones do not cover.

        Returns (centroids float32 [C', dim], whether any were added).
        """
        m = self.manifest
        limit = m.get("outlier_residual_norm")
        if limit is None:
            return centroids, False
        sample = corpus.take(sample_token_ids(corpus.num_tokens, 1 << 16, seed=int(m["generation"]) + 17))
        assigner = CentroidAssigner(centroids)
        norms = np.linalg.norm(sample - centroids[assigner.assign(sample)], axis=1)
        outliers = sample[norms > limit]
        frac = len(outliers) / max(1, len(sample))
        if frac <= OUTLIER_FRACTION:
            return centroids, False
        # as many new centroids as the outliers deserve at the index's own density
        tokens_per_centroid = max(1.0, self.num_tokens / max(1, self.num_centroids))
        k = int(round(frac * corpus.num_tokens / tokens_per_centroid))
        k = max(1, min(k, len(outliers) // 4 or 1))
        if len(centroids) <= 1 << 16 < len(centroids) + k:
            k = (1 << 16) - len(centroids)  # keep uint16 codes valid for existing segments
            if k <= 0:
                return centroids, False
        new = train_centroids(outliers, k, niter=4, seed=int(m["generation"]) + 23, show_progress=False)
        if show_progress:
            tqdm.write(f"plaid: {frac:.0%} of the added tokens are outliers: {len(new)} new centroids")
        if np.dtype(m["arrays"]["centroids"]["dtype"]) == np.float16:
            with np.errstate(over="ignore"):
                rounded = new.astype(np.float16)
            if np.isfinite(rounded).all():
                new = rounded.astype(np.float32)
            else:
                return centroids, False  # cannot be stored in this index's float16 centroids
        return np.concatenate([centroids, new]), True

    def delete(self, ids) -> int:
        """Delete documents by external id (str) or internal id (int); returns how many.

        Every other document keeps its id; deleted ones are never returned again. The cost is
        proportional to the number deleted (one small tombstone file), not to the index size.
        Unknown or already deleted ids raise :class:`InvalidInputError` listing a few.
        """
        with fmt.writer_lock(self.path):
            self.refresh()
            internal = np.unique(self.internal_ids(ids))
            if len(internal) == 0:
                return 0
            m = self.manifest
            writer = fmt.IndexWriter(self.path, m["generation"] + 1)
            try:
                name = f"tombstones_g{writer.generation}"
                writer.write(name, internal.astype(np.int64))
                fields = _carry(m)
                fields["tombstones"] = list(m.get("tombstones", [])) + [name]
                fields["num_deleted"] = int(m.get("num_deleted", 0)) + len(internal)
                self.manifest = writer.commit(fields)
            except BaseException:
                writer.abort()
                raise
            return int(len(internal))

    def compact(self, *, show_progress: bool = True, chunk_docs: int = 4096) -> None:
        """Rewrite the index without the deleted documents' tokens, as one segment.

        Surviving documents keep their ids (deleted ids stay deleted, with no tokens). Codes and
        residual codes are copied, never re-encoded; memory stays bounded by ``chunk_docs``.
        """
        with fmt.writer_lock(self.path):
            self.refresh()
            m = self.manifest
            deleted = self.deleted_ids()
            writer = fmt.IndexWriter(self.path, m["generation"] + 1)
            try:
                doclens = self._array("doclens").astype(np.int64)
                keep_len = doclens.copy()
                keep_len[deleted] = 0
                offsets = np.concatenate([[0], np.cumsum(doclens)])
                T = int(keep_len.sum())
                codes_in = [self._array(f"{s['name']}_codes", mmap=True) for s in m["segments"]]
                res_in = [self._array(f"{s['name']}_residuals", mmap=True) for s in m["segments"]]
                normalized = bool(m.get("normalized"))
                norms_in = [self._array(f"{s['name']}_norms", mmap=True) for s in m["segments"]] if normalized else []
                bases = np.concatenate([[0], np.cumsum([s["num_tokens"] for s in m["segments"]])])
                seg = f"seg{int(m['next_segment'])}"
                code_bytes = int(m["codec"]["code_bytes"])
                codes_out = writer.create(f"{seg}_codes", (T,), codes_in[0].dtype)
                res_out = writer.create(f"{seg}_residuals", (T, code_bytes), np.uint8)
                norms_out = writer.create(f"{seg}_norms", (T,), np.float16) if normalized else None
                N = len(doclens)
                cells_all, docs_all = [], []
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
                        c = _take_segmented(codes_in, bases, pos)
                        codes_out[out : out + len(pos)] = c
                        res_out[out : out + len(pos)] = _take_segmented(res_in, bases, pos)
                        if norms_out is not None:
                            norms_out[out : out + len(pos)] = _take_segmented(norms_in, bases, pos)
                        out += len(pos)
                        d = np.repeat(live, lens)
                        key = np.unique(c.astype(np.int64) * N + d)
                        cells_all.append((key // N).astype(np.int32))
                        docs_all.append((key % N).astype(np.int32))
                    bar.update(b - a)
                bar.close()
                writer.finish(f"{seg}_codes")
                writer.finish(f"{seg}_residuals")
                if norms_out is not None:
                    writer.finish(f"{seg}_norms")
                C = self.num_centroids
                cells = np.concatenate(cells_all) if cells_all else np.zeros(0, np.int32)
                docs = np.concatenate(docs_all) if docs_all else np.zeros(0, np.int32)
                ivf, ivf_offsets = merge_ivf(C, cells, docs)
                writer.write("ivf", ivf)
                writer.write("ivf_offsets", ivf_offsets)
                writer.write("doclens", keep_len.astype(np.int32))
                fields = _carry(m)
                # the old segments and tombstone arrays are replaced: stop referencing them, so
                # the commit removes their files (else compaction would grow the folder)
                for s in m["segments"]:
                    fields["arrays"].pop(f"{s['name']}_codes", None)
                    fields["arrays"].pop(f"{s['name']}_residuals", None)
                    fields["arrays"].pop(f"{s['name']}_norms", None)
                for name in m.get("tombstones", []):
                    fields["arrays"].pop(name, None)
                fields["num_tokens"] = T
                fields["segments"] = [{"name": seg, "doc_start": 0, "doc_end": N, "num_tokens": T}]
                fields["next_segment"] = int(m["next_segment"]) + 1
                fields["tombstones"] = []
                if len(deleted):
                    name = f"tombstones_g{writer.generation}"
                    writer.write(name, deleted.astype(np.int64))
                    fields["tombstones"] = [name]
                self.manifest = writer.commit(fields)
            except BaseException:
                writer.abort()
                raise


def _carry(m: dict) -> dict:
    """Manifest fields and array entries to carry into the next generation (unchanged arrays)."""
    fields = {k: v for k, v in m.items() if k not in ("format", "format_version", "generation", "arrays")}
    fields["arrays"] = dict(m["arrays"])
    return fields


def _take_segmented(parts: Sequence[np.ndarray], bases: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows at sorted global positions ``pos`` of arrays stored as consecutive segments."""
    if len(parts) == 1:
        return np.take(parts[0], pos, axis=0)
    out = np.empty((len(pos),) + parts[0].shape[1:], parts[0].dtype)
    cuts = np.searchsorted(pos, bases)
    for i, part in enumerate(parts):
        lo, hi = cuts[i], cuts[i + 1]
        if hi > lo:
            out[lo:hi] = np.take(part, pos[lo:hi] - bases[i], axis=0)
    return out


def load_deleted(path: str, manifest: dict) -> np.ndarray:
    """Sorted internal ids of deleted documents (union of the tombstone arrays), int64."""
    names = manifest.get("tombstones", [])
    if not names:
        return np.zeros(0, np.int64)
    parts = [fmt.open_array(path, manifest, n, mmap=False) for n in names]
    return np.unique(np.concatenate(parts).astype(np.int64))


def resolve_ids(ids, num_documents: int, names: Optional[List[str]], deleted: np.ndarray) -> np.ndarray:
    """Internal ids (int64) of live documents named by external ids (str) or internal ids (int)."""
    if isinstance(ids, (str, bytes, int, np.integer)):
        ids = [ids]
    ids = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    if not ids:
        return np.zeros(0, np.int64)
    out = np.empty(len(ids), np.int64)
    unknown = []
    lookup = None
    for i, x in enumerate(ids):
        if isinstance(x, str):
            if names is None:
                raise InvalidInputError("this index has no external doc_ids: use internal (int) ids")
            if lookup is None:
                lookup = {n: j for j, n in enumerate(names)}
            j = lookup.get(x, -1)
        elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            j = int(x) if 0 <= int(x) < num_documents else -1
        else:
            raise InvalidInputError(f"document ids must be str (external) or int (internal), got {x!r}")
        if j < 0:
            unknown.append(x)
        out[i] = j
    if len(deleted):
        gone = np.isin(out, deleted)
        unknown += [ids[i] for i in np.flatnonzero(gone)]
    if unknown:
        raise InvalidInputError(f"{len(unknown)} unknown or deleted document id(s), e.g. {unknown[:5]}")
    return out

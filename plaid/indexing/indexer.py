"""Building an index: sample -> k-means -> codec training -> streamed encoding -> inverted file -> commit.

The corpus is read twice: once for the k-means / codec training sample, once in document-aligned
chunks of ``chunk_tokens`` tokens for encoding. Codes and residual codes go straight to
memory-mapped files, so memory stays bounded by the chunk size, the sample and the centroids,
whatever the corpus size. Nothing is visible to readers until the manifest is committed.

The encoding pass (:func:`encode_segment`) and the inverted-file merge (:func:`merge_ivf`) are
shared with :meth:`plaid.Index.add`.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from .. import format as fmt
from ..embeddings import Corpus, as_corpus
from ..errors import InvalidInputError
from .codecs import ResidualCodec, make_codec
from .kmeans import CentroidAssigner, default_num_centroids, sample_token_ids, train_centroids

__all__ = ["Indexer", "DocIdTable", "check_doc_ids", "encode_doc_ids", "decode_doc_ids", "encode_segment", "merge_ivf",
           "VERSION"]

VERSION = "0.1.0"

#: Residual-norm quantile recorded at build time; tokens added later beyond it count as outliers.
OUTLIER_QUANTILE = 0.99


def check_doc_ids(doc_ids, n: int, existing: Optional[set] = None) -> Optional[list]:
    """Validate external ids: None, or ``n`` unique non-empty strings (ints are converted).

    ``existing``: ids already in the index, which new ones must not repeat. Returns a list or None.
    """
    if doc_ids is None:
        return None
    if isinstance(doc_ids, (str, bytes)):
        raise InvalidInputError("doc_ids must be a sequence of strings, not a single string")
    names = [str(x) if isinstance(x, (int, np.integer)) else x for x in doc_ids]
    if len(names) != n:
        raise InvalidInputError(f"doc_ids has {len(names)} entries for {n} documents")
    for i, x in enumerate(names):
        if not isinstance(x, str) or not x:
            raise InvalidInputError(f"doc_ids[{i}] must be a non-empty string, got {x!r}")
    if len(set(names)) != n:
        seen, dups = set(), []
        for x in names:
            if x in seen and x not in dups:
                dups.append(x)
            seen.add(x)
        raise InvalidInputError(f"doc_ids are not unique: {len(dups)} duplicated, e.g. {dups[:3]}")
    if existing:
        clash = [x for x in names if x in existing]
        if clash:
            raise InvalidInputError(f"{len(clash)} doc_ids are already in the index, e.g. {clash[:3]}")
    return names


def encode_doc_ids(names: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all ids concatenated (uint8 [B]) and their offsets (int64 [n + 1])."""
    encoded = [x.encode("utf-8") for x in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_doc_ids(blob: np.ndarray, offsets: np.ndarray) -> List[str]:
    """Inverse of :func:`encode_doc_ids`."""
    raw = np.asarray(blob).tobytes()
    offsets = np.asarray(offsets)
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


class DocIdTable:
    """External ids stored as UTF-8 blob + offsets (possibly memory-mapped), decoded on demand.

    ``table[i]`` -> str; ``table.lookup(name)`` -> internal id or -1 (the reverse map is built on
    first use; with duplicates, e.g. an id deleted then added again, the latest wins).
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob = blob
        self.offsets = np.asarray(offsets)
        self._reverse: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self.blob[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")

    def tolist(self) -> List[str]:
        return decode_doc_ids(self.blob, self.offsets)

    def lookup(self, name: str) -> int:
        if self._reverse is None:
            self._reverse = {n: i for i, n in enumerate(self.tolist())}
        return self._reverse.get(name, -1)


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


def encode_segment(writer: fmt.IndexWriter, segment: str, corpus: Corpus, centroids: np.ndarray,
                   assigner: CentroidAssigner, codec: ResidualCodec, doc_base: int, chunk_tokens: int,
                   show_progress: bool, normalized: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Encode every token of ``corpus`` into arrays ``<segment>_codes`` / ``<segment>_residuals``,
    and, when ``normalized``, ``<segment>_norms`` (float16 norm of each decoded, not yet
    renormalised vector: search divides by it instead of decoding to find it).

    Returns the (centroid, document) pairs for the inverted file: int32 cells and int32 global
    document ids (``doc_base`` + position in ``corpus``), deduplicated, grouped by chunk.
    """
    T, N = corpus.num_tokens, corpus.num_docs
    code_dtype = np.uint16 if len(centroids) <= 1 << 16 else np.int32
    codes_out = writer.create(f"{segment}_codes", (T,), code_dtype)
    res_out = writer.create(f"{segment}_residuals", (T, codec.code_bytes), np.uint8)
    norms_out = writer.create(f"{segment}_norms", (T,), np.float16) if normalized else None
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
        if norms_out is not None:  # kept within float16's normal range: never 0 or inf
            norms_out[lo:hi] = np.clip(codec.decoded_norms(centroids, a, r), 2.0**-14, 65504.0)
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


class Indexer:
    """Builds a compressed PLAID index from token embeddings.

    Parameters
    ----------
    codec : {"pq", "scalar"}, default "pq"
        Residual codec. ``"pq"``: product quantisation, ``pq_m`` bytes per token (the default:
        more recall per byte). ``"scalar"``: ColBERTv2 buckets, ``nbits`` bits per dimension.
    pq_m : int, default 32
        PQ sub-quantisers = residual bytes per token (the centroid id adds 2, and the norm 2 more
        when the vectors are renormalised). 16 / 32 / 64.
    nbits : {1, 2, 4}, default 2
        Bits per dimension of the scalar codec.
    num_centroids : int or None, default None
        Number of k-means centroids. None: PLAID's ``2**floor(log2(16*sqrt(num_tokens)))``,
        capped at ``num_tokens / 8`` for small corpora (see ``default_num_centroids``).
    kmeans_niter : int, default 4
        k-means iterations. k-means dominates build time; on msmarco-5k a larger sample helps
        fidelity more than more iterations (``benchmarks/build_params.py``).
    kmeans_points_per_centroid : int, default 16
        Size of the k-means training sample, per centroid (at most all tokens). 16 instead of 8
        raised the recall@10 ceiling from 0.928 to 0.938 for 3 s more build on msmarco-5k.
    codec_sample : int, default 65536
        Residuals used to train the codec.
    normalize : {"auto", True, False}, default "auto"
        Renormalise decoded vectors to unit length. "auto": when the training sample is unit-norm
        (ColBERT vectors are); this recovers 2-3 points of recall@10 at no storage cost.
    chunk_tokens : int, default 65536
        Tokens encoded per step; bounds the memory of the encoding pass.
    seed : int, default 0
        Seed of the sample, k-means and codec training. Same seed, input and thread count give
        an identical index.
    show_progress : bool, default True
        tqdm progress bars for the long phases.
    """

    def __init__(self, *, codec: str = "pq", pq_m: int = 32, nbits: int = 2,
                 num_centroids: Optional[int] = None, kmeans_niter: int = 4,
                 kmeans_points_per_centroid: int = 16, codec_sample: int = 65536,
                 normalize="auto", chunk_tokens: int = 1 << 16, seed: int = 0,
                 show_progress: bool = True):
        if codec not in ("pq", "scalar"):
            raise InvalidInputError(f"unknown codec {codec!r}; choose 'pq' or 'scalar'")
        for name, v in [("kmeans_niter", kmeans_niter), ("kmeans_points_per_centroid", kmeans_points_per_centroid),
                        ("codec_sample", codec_sample), ("chunk_tokens", chunk_tokens), ("pq_m", pq_m)]:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if num_centroids is not None and (isinstance(num_centroids, bool) or
                                          not isinstance(num_centroids, (int, np.integer)) or num_centroids <= 0):
            raise InvalidInputError(f"num_centroids must be a positive integer or None, got {num_centroids!r}")
        if normalize not in ("auto", True, False):
            raise InvalidInputError(f"normalize must be 'auto', True or False, got {normalize!r}")
        if codec == "scalar" and nbits not in (1, 2, 4):
            raise InvalidInputError(f"scalar codec: nbits must be 1, 2 or 4, got {nbits!r}")
        self.codec, self.pq_m, self.nbits = codec, int(pq_m), int(nbits)
        self.num_centroids = num_centroids
        self.kmeans_niter = int(kmeans_niter)
        self.kmeans_points_per_centroid = int(kmeans_points_per_centroid)
        self.codec_sample = int(codec_sample)
        self.normalize = normalize
        self.chunk_tokens = int(chunk_tokens)
        self.seed = int(seed)
        self.show_progress = bool(show_progress)
        self.last_timings: Dict[str, float] = {}

    def _log(self, msg: str) -> None:
        if self.show_progress:
            tqdm.write(f"plaid: {msg}")

    def build(self, path: str, documents, *, doc_ids=None, overwrite: bool = False):
        """Index ``documents`` into directory ``path``; returns the opened :class:`plaid.Index`.

        ``documents``: :class:`plaid.Embeddings`, a sequence of ``[n_tokens, dim]`` float arrays
        (numpy or torch), or an iterable of them. Document ids are ``0..N-1`` in input order.
        ``doc_ids``: optional external ids (strings, unique, one per document), stored in the
        index as data and returned by ``Results.doc_ids()``.
        ``path`` must be empty or absent unless ``overwrite=True``, which replaces an existing
        plaid index atomically (readers see the old index until the new one is committed).
        A build that fails leaves no index behind (or the previous one, untouched).
        """
        from .index import Index

        path = os.fspath(path)
        created = not os.path.exists(path)
        old = fmt.prepare_directory(path, overwrite)
        was_empty = not os.listdir(path)
        try:
            with fmt.writer_lock(path):
                if overwrite:
                    old = _reread_manifest(path) or old
                generation = old["generation"] + 1 if old else 0
                writer = fmt.IndexWriter(path, generation)
                corpus = None
                try:
                    corpus = as_corpus(documents, spill_dir=path)
                    names = check_doc_ids(doc_ids, corpus.num_docs)
                    manifest = self._build(writer, corpus, names)
                except BaseException:
                    writer.abort()
                    raise
                finally:
                    if corpus is not None:
                        corpus.close()
        except BaseException:
            if (created or was_empty) and os.path.isdir(path):  # leave it as we found it
                lock = os.path.join(path, fmt.LOCK_FILE)
                if os.path.exists(lock) and os.listdir(path) == [fmt.LOCK_FILE]:
                    os.remove(lock)
                if created and not os.listdir(path):
                    os.rmdir(path)
            raise
        return Index(path, _manifest=manifest)

    def _build(self, writer: fmt.IndexWriter, corpus: Corpus, names: Optional[list]) -> dict:
        t_start = time.perf_counter()
        timings: Dict[str, float] = {}
        T, N, dim = corpus.num_tokens, corpus.num_docs, corpus.dim
        num_empty = warn_empty(corpus)
        C = self.num_centroids or default_num_centroids(T)
        if C > T:
            warnings.warn(f"num_centroids={C} exceeds the {T} tokens of the corpus; using {T}", stacklevel=3)
            C = T
        codec = make_codec(self.codec, dim, pq_m=self.pq_m, nbits=self.nbits)

        # 1. training sample
        t = time.perf_counter()
        n_km = C * self.kmeans_points_per_centroid
        sample = corpus.take(sample_token_ids(T, max(n_km, min(self.codec_sample, T)), self.seed))
        norms = np.linalg.norm(sample, axis=1)
        normalized = bool(np.all(np.abs(norms - 1) < 1e-2)) if self.normalize == "auto" else bool(self.normalize)
        timings["sample_s"] = time.perf_counter() - t

        # 2. k-means (raw centroids: the nearest raw centroid leaves smaller residuals, 3-4% lower
        #    reconstruction error on msmarco-5k; the searcher normalises its own scoring copy)
        t = time.perf_counter()
        km_rows = sample if len(sample) <= n_km else \
            sample[np.random.default_rng(self.seed + 1).choice(len(sample), n_km, replace=False)]
        self._log(f"k-means: {C} centroids from {len(km_rows)} of {T} tokens, {self.kmeans_niter} iterations")
        centroids = train_centroids(km_rows, C, self.kmeans_niter, self.seed, show_progress=self.show_progress)
        # stored as float16 (halves their share of the index); encode against the stored values.
        # Vectors beyond float16's range (|x| > 65504) keep float32 centroids rather than inf ones.
        with np.errstate(over="ignore"):
            c16 = centroids.astype(np.float16)
        centroid_dtype = np.float16 if np.isfinite(c16).all() else np.float32
        centroids = c16.astype(np.float32) if centroid_dtype == np.float16 else centroids
        C = len(centroids)
        assigner = CentroidAssigner(centroids, seed=self.seed)
        timings["kmeans_s"] = time.perf_counter() - t

        # 3. codec training on residuals of (part of) the sample
        t = time.perf_counter()
        rows = sample if len(sample) <= self.codec_sample else \
            sample[np.random.default_rng(self.seed + 2).choice(len(sample), self.codec_sample, replace=False)]
        residuals = rows - centroids[assigner.assign(rows)]
        codec.train(residuals, seed=self.seed)
        outlier_norm = float(np.quantile(np.linalg.norm(residuals, axis=1), OUTLIER_QUANTILE))
        del sample, rows, residuals, km_rows
        timings["codec_train_s"] = time.perf_counter() - t

        # 4. streamed encoding into segment 0
        t = time.perf_counter()
        cells, docs = encode_segment(writer, "seg0", corpus, centroids, assigner, codec, 0,
                                     self.chunk_tokens, self.show_progress, normalized)
        timings["encode_s"] = time.perf_counter() - t

        # 5. inverted file and the small global arrays
        t = time.perf_counter()
        ivf, ivf_offsets = merge_ivf(C, cells, docs)
        del cells, docs
        writer.write("ivf", ivf)
        writer.write("ivf_offsets", ivf_offsets)
        writer.write("doclens", corpus.doclens.astype(np.int32))
        writer.write("centroids", centroids.astype(centroid_dtype))
        for name, arr in codec.arrays().items():
            writer.write(name, arr)
        if names is not None:
            blob, offsets = encode_doc_ids(names)
            writer.write("doc_ids_utf8", blob)
            writer.write("doc_ids_offsets", offsets)
        timings["ivf_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start

        fields = {
            "created_by": f"plaid-engine {VERSION}",
            "dim": dim,
            "num_documents": N,
            "num_tokens": T,
            "num_centroids": C,
            "num_empty_documents": num_empty,
            "num_deleted": 0,
            "has_doc_ids": names is not None,
            "normalized": normalized,
            "outlier_residual_norm": outlier_norm,
            "codec": codec.params(),
            "segments": [{"name": "seg0", "doc_start": 0, "doc_end": N, "num_tokens": T}],
            "next_segment": 1,
            "tombstones": [],
            "build": {
                "seed": self.seed,
                "kmeans_niter": self.kmeans_niter,
                "kmeans_points_per_centroid": self.kmeans_points_per_centroid,
                "codec_sample": self.codec_sample,
                "chunk_tokens": self.chunk_tokens,
                "initial_centroids": C,
            },
        }
        manifest = writer.commit(fields)
        self._log(f"built {N} documents, {T} tokens in {timings['total_s']:.1f}s "
                  f"({', '.join(f'{k[:-2]} {v:.1f}s' for k, v in timings.items() if k != 'total_s')})")
        self.last_timings = timings
        return manifest


def _reread_manifest(path: str) -> Optional[dict]:
    try:
        return fmt.read_manifest(path)
    except Exception:
        return None

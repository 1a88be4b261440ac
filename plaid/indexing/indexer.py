"""Building an index: sample -> k-means -> codec training -> streamed encoding -> inverted file -> commit.

The corpus is read twice: once for the k-means / codec training sample, once in document-aligned
chunks of ``chunk_tokens`` tokens for encoding. Codes and residual codes go straight to
memory-mapped files, so memory stays bounded by the chunk size, the sample and the centroids,
whatever the corpus size. Nothing is visible to readers until the manifest is committed.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from typing import Dict, Optional

import numpy as np
from tqdm.auto import tqdm

from .. import format as fmt
from ..embeddings import as_corpus
from ..errors import InvalidInputError
from .codecs import codec_array_names, codec_from_manifest, make_codec
from .kmeans import CentroidAssigner, default_num_centroids, sample_token_ids, train_centroids

__all__ = ["Indexer", "Index", "check_doc_ids", "encode_doc_ids", "decode_doc_ids"]

_VERSION = "0.1.0"


def check_doc_ids(doc_ids, n: int) -> Optional[list]:
    """Validate external ids: None, or ``n`` unique non-empty strings. Returns a list or None."""
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
    return names


def encode_doc_ids(names: list) -> tuple:
    """UTF-8 bytes of all ids concatenated (uint8 [B]) and their offsets (int64 [n + 1])."""
    encoded = [x.encode("utf-8") for x in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_doc_ids(blob: np.ndarray, offsets: np.ndarray) -> list:
    """Inverse of :func:`encode_doc_ids`."""
    raw = blob.tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


class Indexer:
    """Builds a compressed PLAID index from token embeddings.

    Parameters
    ----------
    codec : {"pq", "scalar"}, default "pq"
        Residual codec. ``"pq"``: product quantisation, ``pq_m`` bytes per token (the default:
        more recall per byte). ``"scalar"``: ColBERTv2 buckets, ``nbits`` bits per dimension.
    pq_m : int, default 32
        PQ sub-quantisers = residual bytes per token (the centroid id adds 2). 16 / 32 / 64.
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
                        ("codec_sample", codec_sample), ("chunk_tokens", chunk_tokens)]:
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if num_centroids is not None and (not isinstance(num_centroids, (int, np.integer)) or num_centroids <= 0):
            raise InvalidInputError(f"num_centroids must be a positive integer or None, got {num_centroids!r}")
        if normalize not in ("auto", True, False):
            raise InvalidInputError(f"normalize must be 'auto', True or False, got {normalize!r}")
        self.codec, self.pq_m, self.nbits = codec, int(pq_m), int(nbits)
        self.num_centroids = num_centroids
        self.kmeans_niter = int(kmeans_niter)
        self.kmeans_points_per_centroid = int(kmeans_points_per_centroid)
        self.codec_sample = int(codec_sample)
        self.normalize = normalize
        self.chunk_tokens = int(chunk_tokens)
        self.seed = int(seed)
        self.show_progress = bool(show_progress)

    def _log(self, msg: str) -> None:
        if self.show_progress:
            tqdm.write(f"plaid: {msg}")

    def build(self, path: str, documents, *, doc_ids=None, overwrite: bool = False) -> "Index":
        """Index ``documents`` into directory ``path``; returns the opened :class:`Index`.

        ``documents``: :class:`plaid.Embeddings`, a sequence of ``[n_tokens, dim]`` float arrays
        (numpy or torch), or an iterable of them. Document ids are ``0..N-1`` in input order.
        ``doc_ids``: optional external ids (strings, unique, one per document), stored in the
        index as data and returned by ``Results.doc_ids()``.
        ``path`` must be empty or absent unless ``overwrite=True``, which replaces an existing
        plaid index atomically (readers see the old index until the new one is committed).
        A build that fails leaves no index behind (or the previous one, untouched).
        """
        path = os.fspath(path)
        created = not os.path.exists(path)
        old = fmt.prepare_directory(path, overwrite)
        generation = old["generation"] + 1 if old else 0
        writer = fmt.IndexWriter(path, generation)
        corpus = None
        try:
            corpus = as_corpus(documents, spill_dir=path)
            names = check_doc_ids(doc_ids, corpus.num_docs)
            if names is not None:
                blob, offsets = encode_doc_ids(names)
                writer.write("doc_ids_utf8", blob)
                writer.write("doc_ids_offsets", offsets)
            manifest = self._build(writer, corpus)
        except BaseException:
            writer.abort()
            if corpus is not None:  # removes the spill file of an iterator, before the emptiness check
                corpus.close()
                corpus = None
            if created and os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
            raise
        finally:
            if corpus is not None:
                corpus.close()
        return Index(path, _manifest=manifest)

    def _build(self, writer: fmt.IndexWriter, corpus) -> dict:
        t_start = time.perf_counter()
        timings: Dict[str, float] = {}
        T, N, dim = corpus.num_tokens, corpus.num_docs, corpus.dim
        empty = np.flatnonzero(corpus.doclens == 0)
        if len(empty):
            warnings.warn(
                f"{len(empty)} empty document(s) (positions {', '.join(map(str, empty[:5]))}"
                f"{', ...' if len(empty) > 5 else ''}) are indexed as empty: they keep their ids and are never returned",
                stacklevel=3,
            )
        C = self.num_centroids or default_num_centroids(T)
        if C > T:
            warnings.warn(f"num_centroids={C} exceeds the {T} tokens of the corpus; using {T}", stacklevel=3)
            C = T
        codec = make_codec(self.codec, dim, pq_m=self.pq_m, nbits=self.nbits)

        # 1. training sample
        t = time.perf_counter()
        n_sample = max(C * self.kmeans_points_per_centroid, min(self.codec_sample, T))
        sample_ids = sample_token_ids(T, n_sample, self.seed)
        sample = corpus.take(sample_ids)
        norms = np.linalg.norm(sample, axis=1)
        normalized = bool(np.all(np.abs(norms - 1) < 1e-2)) if self.normalize == "auto" else bool(self.normalize)
        timings["sample_s"] = time.perf_counter() - t

        # 2. k-means
        t = time.perf_counter()
        self._log(f"k-means: {C} centroids from {min(len(sample), C * self.kmeans_points_per_centroid)} "
                  f"of {T} tokens, {self.kmeans_niter} iterations")
        km_rows = sample if len(sample) <= C * self.kmeans_points_per_centroid else \
            sample[np.random.default_rng(self.seed + 1).choice(len(sample), C * self.kmeans_points_per_centroid, replace=False)]
        centroids = train_centroids(km_rows, C, self.kmeans_niter, self.seed, show_progress=self.show_progress)
        # Not normalised: the nearest raw centroid leaves smaller residuals (3-4% lower
        # reconstruction error measured on msmarco-5k); the searcher normalises its own copy.
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
        del sample, rows, residuals, km_rows
        timings["codec_train_s"] = time.perf_counter() - t

        # 4. streamed encoding
        t = time.perf_counter()
        code_dtype = np.uint16 if C <= 1 << 16 else np.int32
        codes_out = writer.create("codes", (T,), code_dtype)
        res_out = writer.create("residuals", (T, codec.code_bytes), np.uint8)
        ivf_cells, ivf_docs = [], []
        bar = tqdm(total=T, unit="tok", unit_scale=True, desc="plaid: encoding", disable=not self.show_progress)
        for start, end in corpus.chunks(self.chunk_tokens):
            x = corpus.read(start, end)
            lo, hi = int(corpus.offsets[start]), int(corpus.offsets[end])
            if hi == lo:
                continue
            a = assigner.assign(x)
            r = x - centroids[a]
            codes_out[lo:hi] = a
            res_out[lo:hi] = codec.encode(r)
            docs = np.repeat(np.arange(start, end, dtype=np.int64), corpus.doclens[start:end])
            key = np.unique(a.astype(np.int64) * N + docs)  # (cell, doc) pairs, deduplicated
            ivf_cells.append((key // N).astype(np.int32))
            ivf_docs.append((key % N).astype(np.int32))
            bar.update(hi - lo)
        bar.close()
        writer.finish("codes")
        writer.finish("residuals")
        del codes_out, res_out
        timings["encode_s"] = time.perf_counter() - t

        # 5. inverted file: centroid -> sorted, deduplicated document ids
        t = time.perf_counter()
        cells = np.concatenate(ivf_cells)
        docs = np.concatenate(ivf_docs)
        del ivf_cells, ivf_docs
        order = np.argsort(cells, kind="stable")  # chunks are in doc order: docs stay sorted per cell
        ivf = docs[order]
        ivf_offsets = np.zeros(C + 1, np.int64)
        np.cumsum(np.bincount(cells, minlength=C), out=ivf_offsets[1:])
        del cells, docs, order
        writer.write("ivf", ivf)
        writer.write("ivf_offsets", ivf_offsets)
        writer.write("doclens", corpus.doclens.astype(np.int32))
        writer.write("centroids", centroids.astype(centroid_dtype))
        for name, arr in codec.arrays().items():
            writer.write(name, arr)
        timings["ivf_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start

        fields = {
            "created_by": f"plaid-engine {_VERSION}",
            "dim": dim,
            "num_documents": N,
            "num_tokens": T,
            "num_centroids": C,
            "num_empty_documents": int(len(empty)),
            "has_doc_ids": "doc_ids_utf8" in writer.entries,
            "normalized": normalized,
            "codec": codec.params(),
            "build": {
                "seed": self.seed,
                "kmeans_niter": self.kmeans_niter,
                "kmeans_points_per_centroid": self.kmeans_points_per_centroid,
                "codec_sample": self.codec_sample,
                "chunk_tokens": self.chunk_tokens,
            },
        }
        manifest = writer.commit(fields)
        self._log(f"built {N} documents, {T} tokens in {timings['total_s']:.1f}s "
                  f"({', '.join(f'{k[:-2]} {v:.1f}s' for k, v in timings.items() if k != 'total_s')})")
        self.last_timings = timings
        return manifest


class Index:
    """A committed index on disk (a light handle: opening reads only the manifest).

    ``plaid.Index(path)`` opens an existing index; :meth:`Indexer.build` returns one.
    Use :meth:`searcher` (or :class:`plaid.Searcher`) to search it.
    """

    def __init__(self, path: str, *, _manifest: Optional[dict] = None):
        self.path = os.fspath(path)
        self.manifest = _manifest if _manifest is not None else fmt.read_manifest(self.path)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    def __len__(self) -> int:
        return self.num_documents

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
        """Whole index folder size per document token."""
        return self.nbytes() / max(1, self.num_tokens)

    def payload_bytes_per_token(self) -> int:
        """Bytes stored per token: centroid id plus residual code."""
        return np.dtype(self.manifest["arrays"]["codes"]["dtype"]).itemsize + int(self.codec["code_bytes"])

    def verify(self) -> list:
        """Problems found by checking every file's size and CRC-32 (empty list: intact)."""
        return fmt.verify_index(self.path)

    @property
    def doc_ids(self) -> Optional[list]:
        """External ids (list of str, one per document) or None when the index has none."""
        if not self.manifest.get("has_doc_ids"):
            return None
        if getattr(self, "_doc_ids", None) is None:
            blob = fmt.open_array(self.path, self.manifest, "doc_ids_utf8", mmap=False)
            offs = fmt.open_array(self.path, self.manifest, "doc_ids_offsets", mmap=False)
            self._doc_ids = decode_doc_ids(blob, offs)
        return self._doc_ids

    def load_codec(self):
        """The trained residual codec (for decoding)."""
        arrays = {n: fmt.open_array(self.path, self.manifest, n, mmap=False) for n in codec_array_names(self.codec)}
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
            "num_tokens": self.num_tokens,
            "num_centroids": self.num_centroids,
            "dim": self.dim,
            "codec": self.codec,
            "normalized": self.manifest.get("normalized", False),
            "bytes": self.nbytes(),
            "bytes_per_token": round(self.bytes_per_token(), 3),
            "payload_bytes_per_token": self.payload_bytes_per_token(),
            "build": self.manifest.get("build", {}),
        }

    def __repr__(self) -> str:
        return (f"Index({self.path!r}, documents={self.num_documents}, tokens={self.num_tokens}, "
                f"centroids={self.num_centroids}, codec={json.dumps(self.codec)})")

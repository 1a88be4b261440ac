"""Building an index: sample -> k-means -> codec training -> streamed encoding -> inverted file -> commit.

The corpus is read twice: once for the k-means / codec training sample, once in document-aligned
chunks of ``chunk_tokens`` tokens for encoding. Codes and residual codes go straight to
memory-mapped files, so memory stays bounded by the chunk size, the sample and the centroids,
whatever the corpus size. Nothing is visible to readers until the manifest is committed.

Training (steps 1-3: sample, k-means, codec) and encoding (steps 4-5: encode, inverted file,
commit) are separate: :meth:`Indexer.train` returns :class:`TrainedParams`, and
:meth:`Indexer.build_trained` encodes a corpus into a folder with them. :meth:`Indexer.build` is
the two in a row, so an index built from parts of a corpus with one training (the shards of
:mod:`plaid.distributed`) is byte for byte what ``build_trained`` writes in one process.

The encoding pass and the inverted-file merge (:mod:`plaid.indexing.encode`) are shared with
:meth:`plaid.Index.add`; every file goes through the store's writer (:mod:`plaid.store`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from .._version import __version__
from ..codecs import ResidualCodec, check_codec_params, codec_from_manifest, make_codec
from ..embeddings import Corpus, as_corpus
from ..errors import IndexCorruptError, InvalidInputError
from ..store import IndexWriter, Manifest, Segment, check_doc_ids, encode_doc_ids, open_snapshot, writing
from .encode import encode_segment, space_needed, warn_empty
from .kmeans import CentroidAssigner, assign_all, default_num_centroids, sample_token_ids, train_centroids

__all__ = ["Indexer", "TrainedParams", "params_fingerprint", "OUTLIER_QUANTILE"]

logger = logging.getLogger(__name__)

#: Residual-norm quantile recorded at build time; tokens added later beyond it count as outliers.
OUTLIER_QUANTILE = 0.99


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
        capped at ``num_tokens / 8`` for small corpora and at 65,536 (uint16 centroid ids; PLAID's
        count passes it from 67M tokens; see ``default_num_centroids``).
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
    assignment : {"auto", "exact"}, default "auto"
        How tokens find their nearest centroid (k-means iterations, codec training, encoding).
        "auto": exactly below 2,048 centroids, else through groups of centroids (each token is
        compared with the group centres, then with the members of its 8 nearest groups: a cost
        per token nearly independent of the number of centroids; see
        :class:`plaid.indexing.kmeans.CentroidAssigner`). "exact": every token against every
        centroid (cost grows with the centroid count; for measuring the approximation).
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
                 assignment: str = "auto", show_progress: bool = True):
        if codec not in ("pq", "scalar"):
            raise InvalidInputError(f"unknown codec {codec!r}; choose 'pq' or 'scalar'")
        for name, v in [("kmeans_niter", kmeans_niter), ("kmeans_points_per_centroid", kmeans_points_per_centroid),
                        ("codec_sample", codec_sample), ("chunk_tokens", chunk_tokens), ("pq_m", pq_m)]:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if num_centroids is not None and (isinstance(num_centroids, bool) or
                                          not isinstance(num_centroids, (int, np.integer)) or num_centroids <= 0):
            raise InvalidInputError(f"num_centroids must be a positive integer or None, got {num_centroids!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            raise InvalidInputError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if normalize not in ("auto", True, False):
            raise InvalidInputError(f"normalize must be 'auto', True or False, got {normalize!r}")
        if assignment not in ("auto", "exact"):
            raise InvalidInputError(f"assignment must be 'auto' or 'exact', got {assignment!r}")
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
        self.assignment = assignment
        self.show_progress = bool(show_progress)
        self.last_timings: Dict[str, float] = {}

    @property
    def _exact(self) -> Optional[bool]:
        """The ``exact`` argument of every :class:`CentroidAssigner` this build makes."""
        return True if self.assignment == "exact" else None

    def build(self, path: str, documents, *, doc_ids=None, overwrite: bool = False):
        """Index ``documents`` into directory ``path``; returns the opened :class:`plaid.Index`.

        ``documents``: :class:`plaid.Embeddings`, a sequence of ``[n_tokens, dim]`` float arrays
        (numpy or torch), or an iterable of them. Document ids are ``0..N-1`` in input order.
        ``doc_ids``: optional external ids (strings, unique, one per document), stored in the
        index as data and returned by ``Results.doc_ids()``.
        ``path`` must be empty or absent unless ``overwrite=True``, which replaces an existing
        plaid index atomically (readers see the old index until the new one is committed).
        A build that fails leaves no index behind (or the previous one, untouched).

        The same as :meth:`train` followed by :meth:`build_trained`, in one pass over the folder.
        """
        from .index import Index

        path = os.fspath(path)
        with writing(path, new=True, overwrite=bool(overwrite)) as writer:
            corpus = None
            try:
                corpus = as_corpus(documents, spill=writer.scratch_file)
                names = check_doc_ids(doc_ids, corpus.num_docs)
                self._build(writer, corpus, names)
            finally:
                if corpus is not None:
                    corpus.close()
        return Index(path)

    def train(self, documents) -> "TrainedParams":
        """Learn what encoding needs from a sample of ``documents``: centroids, residual codec,
        whether to renormalise, the outlier limit of ``add`` (see :class:`TrainedParams`).

        ``documents`` as in :meth:`build` (a one-shot iterable is spilled to a temporary file).
        Deterministic for a given corpus, seed and thread count: ``build_trained(path, docs,
        train(docs))`` writes the same files, byte for byte, as ``build(path, docs)``.
        """
        corpus = as_corpus(documents)
        try:
            return self._train(corpus, {})
        finally:
            corpus.close()

    def build_trained(self, path: str, documents, trained: "TrainedParams", *, doc_ids=None,
                      overwrite: bool = False):
        """Index ``documents`` into ``path`` with parameters trained before (:meth:`train`, or
        :meth:`TrainedParams.from_index`); returns the opened :class:`plaid.Index`.

        Nothing is trained: every token is encoded against ``trained``'s centroids and codec, so
        indexes built from parts of one corpus with one ``trained`` share a codec and their
        stage-4 scores are comparable (the shards of :mod:`plaid.distributed`). This Indexer's
        own codec and k-means parameters are ignored; ``chunk_tokens``, ``assignment`` and
        ``show_progress`` apply.
        """
        if not isinstance(trained, TrainedParams):
            raise InvalidInputError(f"trained must be plaid.indexing.indexer.TrainedParams, got {type(trained).__name__}")
        from .index import Index

        path = os.fspath(path)
        with writing(path, new=True, overwrite=bool(overwrite)) as writer:
            corpus = None
            try:
                corpus = as_corpus(documents, spill=writer.scratch_file)
                names = check_doc_ids(doc_ids, corpus.num_docs)
                if corpus.dim != trained.dim:
                    raise InvalidInputError(f"documents: dim {corpus.dim} differs from the trained parameters' "
                                            f"dim {trained.dim}")
                self._build(writer, corpus, names, trained)
            finally:
                if corpus is not None:
                    corpus.close()
        return Index(path)

    def _build(self, writer: IndexWriter, corpus: Corpus, names: Optional[list],
               trained: Optional["TrainedParams"] = None) -> Manifest:
        t_start = time.perf_counter()
        timings: Dict[str, float] = {}
        self._check_space(writer, corpus, names, trained)
        num_empty = warn_empty(corpus)
        if trained is None:
            trained = self._train(corpus, timings)
        return self._encode(writer, corpus, names, trained, num_empty, timings, t_start)

    def _check_space(self, writer: IndexWriter, corpus: Corpus, names: Optional[list],
                     trained: Optional["TrainedParams"]) -> None:
        """Refuse up front (:class:`plaid.InsufficientSpaceError`, before training) when the
        folder's file system cannot hold the index (:func:`~plaid.indexing.encode.space_needed`)."""
        T = corpus.num_tokens
        if trained is not None:
            C, code_bytes, normalized = trained.num_centroids, trained.codec.code_bytes, trained.normalized
        else:
            C = min(self.num_centroids or default_num_centroids(T), T)
            code_bytes = make_codec(self.codec, corpus.dim, pq_m=self.pq_m, nbits=self.nbits).code_bytes
            normalized = self.normalize is not False
        id_bytes = sum(len(n.encode("utf-8")) for n in names) if names is not None else 0
        needed, what = space_needed(T, corpus.num_docs, C, corpus.dim, code_bytes, normalized, id_bytes)
        writer.check_space(needed, what)

    def _train(self, corpus: Corpus, timings: Dict[str, float]) -> "TrainedParams":
        """Steps 1-3 of a build: sample, k-means, codec training (timings in ``timings``)."""
        T, dim = corpus.num_tokens, corpus.dim
        C = self.num_centroids or default_num_centroids(T)
        if C > T:
            warnings.warn(f"num_centroids={C} exceeds the {T} tokens of the corpus; using {T}", stacklevel=4)
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
        logger.info("k-means: %d centroids from %d of %d tokens, %d iterations", C, len(km_rows), T, self.kmeans_niter)
        centroids = train_centroids(km_rows, C, self.kmeans_niter, self.seed, show_progress=self.show_progress,
                                    exact=self._exact)
        # stored as float16 (halves their share of the index); encode against the stored values.
        # Vectors beyond float16's range (|x| > 65504) keep float32 centroids rather than inf ones.
        with np.errstate(over="ignore"):
            c16 = centroids.astype(np.float16)
        centroid_dtype = np.float16 if np.isfinite(c16).all() else np.float32
        centroids = c16.astype(np.float32) if centroid_dtype == np.float16 else centroids
        C = len(centroids)
        assigner = CentroidAssigner(centroids, seed=self.seed, exact=self._exact)
        timings["kmeans_s"] = time.perf_counter() - t

        # 3. codec training on residuals of (part of) the sample
        t = time.perf_counter()
        rows = sample if len(sample) <= self.codec_sample else \
            sample[np.random.default_rng(self.seed + 2).choice(len(sample), self.codec_sample, replace=False)]
        residuals = rows - centroids[assign_all(assigner, rows)]
        codec.train(residuals, seed=self.seed)
        outlier_norm = float(np.quantile(np.linalg.norm(residuals, axis=1), OUTLIER_QUANTILE))
        del sample, rows, residuals, km_rows
        timings["codec_train_s"] = time.perf_counter() - t
        build = {"seed": self.seed, "kmeans_niter": self.kmeans_niter,
                 "kmeans_points_per_centroid": self.kmeans_points_per_centroid, "codec_sample": self.codec_sample}
        return TrainedParams(centroids=centroids, centroid_dtype=np.dtype(centroid_dtype), codec=codec,
                             normalized=normalized, outlier_norm=outlier_norm, build=build, _assigner=assigner)

    def _encode(self, writer: IndexWriter, corpus: Corpus, names: Optional[list], trained: "TrainedParams",
                num_empty: int, timings: Dict[str, float], t_start: float) -> Manifest:
        """Steps 4-5 of a build: encode every token with ``trained``, write the inverted file and
        the small arrays, commit."""
        T, N, dim = corpus.num_tokens, corpus.num_docs, corpus.dim
        centroids, codec, normalized = trained.centroids, trained.codec, trained.normalized
        C = len(centroids)
        assigner = CentroidAssigner(centroids, exact=True) if self._exact else trained.assigner

        # 4. streamed encoding into segment 0
        t = time.perf_counter()
        ivf = encode_segment(writer, "seg0", corpus, centroids, assigner, codec, 0,
                             self.chunk_tokens, self.show_progress, normalized)
        timings["encode_s"] = time.perf_counter() - t

        # 5. inverted file and the small global arrays
        t = time.perf_counter()
        ivf.write()
        writer.write("doclens", corpus.doclens.astype(np.int32))
        writer.write("centroids", centroids.astype(trained.centroid_dtype))
        for name, arr in codec.arrays().items():
            writer.write(name, arr)
        if names is not None:
            blob, offsets = encode_doc_ids(names)
            writer.write("doc_ids_utf8", blob)
            writer.write("doc_ids_offsets", offsets)
        timings["ivf_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start

        b = trained.build
        fields = {
            "created_by": f"plaid-engine {__version__}",
            "dim": dim,
            "num_documents": N,
            "num_tokens": T,
            "num_centroids": C,
            "num_empty_documents": num_empty,
            "num_deleted": 0,
            "has_doc_ids": names is not None,
            "normalized": normalized,
            "outlier_residual_norm": trained.outlier_norm,
            "codec": codec.params(),
            "segments": [Segment("seg0", 0, N, T)],
            "next_segment": 1,
            "tombstones": [],
            "build": {
                "seed": b["seed"],
                "kmeans_niter": b["kmeans_niter"],
                "kmeans_points_per_centroid": b["kmeans_points_per_centroid"],
                "codec_sample": b["codec_sample"],
                "chunk_tokens": self.chunk_tokens,
                "initial_centroids": C,
            },
        }
        manifest = writer.commit(fields)
        logger.info("built %d documents, %d tokens in %.1fs (%s)", N, T, timings["total_s"],
                    ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in timings.items() if k != "total_s"))
        self.last_timings = timings
        return manifest


@dataclass
class TrainedParams:
    """Everything a build learns from its sample, i.e. everything encoding needs besides the
    documents (steps 1-3 of :class:`Indexer`).

    centroids : float32 [C, dim]
        The k-means centroids as stored (rounded to float16 unless ``centroid_dtype`` is float32);
        tokens are encoded against exactly these values.
    centroid_dtype : numpy dtype
        How ``centroids`` are stored (float16, or float32 for vectors beyond float16's range).
    codec : ResidualCodec
        The trained residual codec.
    normalized : bool
        Decoded vectors are renormalised to unit length (the index stores per-token norms).
    outlier_norm : float
        Residual-norm quantile :data:`OUTLIER_QUANTILE` of the training sample (``add`` trains
        new centroids when too many added tokens exceed it).
    build : dict
        ``seed``, ``kmeans_niter``, ``kmeans_points_per_centroid``, ``codec_sample``: recorded in
        each manifest's ``build`` field; ``seed`` also seeds the centroid assigner.

    ``to_payload`` / ``from_payload`` turn it into plain numbers, strings and arrays (no faiss or
    torch object), to send it to another process; :meth:`fingerprint` names it.
    """

    centroids: np.ndarray
    centroid_dtype: np.dtype
    codec: ResidualCodec
    normalized: bool
    outlier_norm: float
    build: Dict[str, int]
    _assigner: Optional[CentroidAssigner] = field(default=None, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def num_centroids(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def assigner(self) -> CentroidAssigner:
        """The nearest-centroid search over ``centroids`` (built once, seeded by ``build["seed"]``)."""
        if self._assigner is None:
            self._assigner = CentroidAssigner(self.centroids, seed=int(self.build["seed"]))
        return self._assigner

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the centroids, codec parameters and arrays, dim and normalisation:
        two indexes whose trained parameters have the same fingerprint score on the same scale."""
        return params_fingerprint(self.dim, self.centroids, dict(self.codec.params()), self.codec.arrays(),
                                  self.normalized)

    def to_payload(self) -> dict:
        """Plain data (numbers, strings, numpy arrays): picklable, safe to send to another process."""
        return {"centroids": np.ascontiguousarray(self.centroids, np.float32), "centroid_dtype": self.centroid_dtype.str,
                "codec": dict(self.codec.params()),
                "codec_arrays": {k: np.ascontiguousarray(v, np.float32) for k, v in self.codec.arrays().items()},
                "normalized": bool(self.normalized), "outlier_norm": float(self.outlier_norm),
                "build": {k: int(v) for k, v in self.build.items()}}

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainedParams":
        """The inverse of :meth:`to_payload`."""
        centroids = np.ascontiguousarray(payload["centroids"], np.float32)
        codec = codec_from_manifest(centroids.shape[1], check_codec_params(centroids.shape[1], payload["codec"]),
                                    payload["codec_arrays"])
        return cls(centroids=centroids, centroid_dtype=np.dtype(payload["centroid_dtype"]), codec=codec,
                   normalized=bool(payload["normalized"]), outlier_norm=float(payload["outlier_norm"]),
                   build=dict(payload["build"]))

    @classmethod
    def from_index(cls, path) -> "TrainedParams":
        """The parameters the index at ``path`` was trained with: its first
        ``build.initial_centroids`` centroids (``add`` may have appended more), its codec,
        normalisation, outlier limit and build parameters."""
        snap = open_snapshot(os.fspath(getattr(path, "path", path)))
        m = snap.manifest
        b = dict(m.build)
        try:
            c0 = int(b["initial_centroids"])
            build = {k: int(b[k]) for k in ("seed", "kmeans_niter", "kmeans_points_per_centroid", "codec_sample")}
        except (KeyError, TypeError, ValueError):
            raise IndexCorruptError(f"{snap.path}: manifest field build lacks the training parameters "
                                    "(seed, kmeans_niter, kmeans_points_per_centroid, codec_sample, "
                                    "initial_centroids)") from None
        if not 0 < c0 <= m.num_centroids:
            raise IndexCorruptError(f"{snap.path}: manifest field build.initial_centroids = {c0} is not within "
                                    f"[1, num_centroids={m.num_centroids}]")
        if m.outlier_residual_norm is None:
            raise IndexCorruptError(f"{snap.path}: manifest field outlier_residual_norm is missing")
        return cls(centroids=np.ascontiguousarray(snap.centroids[:c0]), centroid_dtype=m.arrays["centroids"].dtype,
                   codec=snap.codec, normalized=m.normalized, outlier_norm=float(m.outlier_residual_norm),
                   build=build)


def params_fingerprint(dim: int, centroids: np.ndarray, codec_params: dict, codec_arrays: Dict[str, np.ndarray],
                       normalized: bool) -> str:
    """SHA-256 (hex) naming trained parameters: dim, normalisation, codec parameters, the float32
    bytes of the centroids and of every codec array (in name order)."""
    h = hashlib.sha256()
    h.update(json.dumps({"dim": int(dim), "normalized": bool(normalized), "codec": codec_params},
                        sort_keys=True).encode())
    h.update(np.ascontiguousarray(centroids, np.float32).tobytes())
    for name in sorted(codec_arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(codec_arrays[name], np.float32).tobytes())
    return h.hexdigest()

"""Building an index: sample -> k-means -> codec training -> streamed encoding -> inverted file -> commit.

The corpus is read twice: once for the k-means / codec training sample, once in document-aligned
chunks of ``chunk_tokens`` tokens for encoding. Codes and residual codes go straight to
memory-mapped files, so memory stays bounded by the chunk size, the sample and the centroids,
whatever the corpus size. Nothing is visible to readers until the manifest is committed.

With ``pool_factor > 1`` a pooling pass comes first (:mod:`plaid.indexing.pooling`): every
document's tokens are clustered and their means written to a scratch file in the index folder,
which training and encoding then read in place of the corpus (memory stays bounded by a chunk).

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
from typing import Any, Dict, Optional

import numpy as np

from .._version import __version__
from ..codecs import (NormQuantizer, ResidualCodec, check_codec_params, codec_from_manifest, dequantize_centroids,
                      make_codec, quantize_centroids)
from ..embeddings import Corpus, as_corpus
from ..errors import FormatVersionError, IndexCorruptError, InvalidInputError
from ..store import IndexWriter, Manifest, Segment, check_doc_ids, check_search_depth, encode_doc_ids, open_snapshot, writing
from .encode import encode_segment, space_needed, warn_empty
from .kmeans import CentroidAssigner, assign_all, default_num_centroids, sample_token_ids, train_centroids
from .pooling import check_pool_factor, default_threads, pool_corpus, pool_factor_of, pooling_record

__all__ = ["Indexer", "TrainedParams", "params_fingerprint", "OUTLIER_QUANTILE", "PRESETS", "preset_pq_m"]

logger = logging.getLogger(__name__)

#: Residual-norm quantile recorded at build time; tokens added later beyond it count as outliers.
OUTLIER_QUANTILE = 0.99
#: ``normalize="auto"``: vectors count as unit-norm when every sampled norm is within this of 1
#: (float16 storage alone moves a unit vector's norm by up to ~1e-3).
UNIT_NORM_TOL = 1e-2


def is_unit_norm(rows: np.ndarray) -> bool:
    """Whether every row of ``rows`` (float [n, d]) has a norm within :data:`UNIT_NORM_TOL` of 1."""
    return bool(np.all(np.abs(np.linalg.norm(rows, axis=1) - 1) < UNIT_NORM_TOL))


#: Named codec settings (``Indexer(preset=...)``), measured on msmarco-5k (whole index folder,
#: default search at k=10, recall@10 against exhaustive MaxSim on the original vectors; see
#: docs/CODECS.md and benchmarks/results/codecs.md): compact 23.7 bytes/token, recall@10 0.888;
#: balanced (the default) 41.6, 0.946 at its search depth 3 (0.932 at depth 1; 0.977 and 0.961
#: at 50k documents, 39.2 bytes/token); accurate 71.7, 0.984 at its search depth 4 (0.964 at
#: depth 1). Depth 3 costs balanced 1.9x the latency of depth 1 at 5k (1.43 against 0.74 ms),
#: 1.6x at 50k and 1.3x at a million documents (docs/CODECS.md, "Why balanced searches 3x deeper").
#: ``pq_m`` is given for 128-dimensional vectors (ColBERT's) and scales with the dimension:
#: ``round(dim * pq_m / 128)`` bytes, at least 1 and at most ``dim`` (see :func:`preset_pq_m`).
PRESETS: Dict[str, Dict] = {
    "compact": {"codec": "pq", "pq_m": 16, "pq_rotation": True, "search_depth": 1},
    "balanced": {"codec": "pq", "pq_m": 34, "pq_rotation": True, "search_depth": 3},
    "accurate": {"codec": "pq", "pq_m": 64, "pq_rotation": True, "search_depth": 4},
}
#: The dimension the presets' ``pq_m`` is given for.
PRESET_DIM = 128


def preset_pq_m(preset: str, dim: int) -> int:
    """The PQ bytes per token of ``preset`` for ``dim``-dimensional vectors: its ``pq_m`` scaled
    by ``dim / 128`` (34 for 128-d, 9 for 32-d, 204 for 768-d), within ``[1, dim]``."""
    return int(min(dim, max(1, int(dim * PRESETS[preset]["pq_m"] / PRESET_DIM + 0.5))))  # halves up


class Indexer:
    """Builds a compressed PLAID index from token embeddings.

    Parameters
    ----------
    preset : {"compact", "balanced", "accurate"}, default "balanced"
        A measured codec setting to start from (see :data:`PRESETS` for bytes per token and
        recall); ``codec``, ``pq_m``, ``pq_rotation``, ``nbits`` and ``search_depth`` given
        explicitly override it.
    codec : {"pq", "scalar"} or None, default None (the preset's: "pq")
        Residual codec. ``"pq"``: product quantisation, ``pq_m`` bytes per token (more recall
        per byte). ``"scalar"``: ColBERTv2 buckets, ``nbits`` bits per dimension.
    pq_m : int or None, default None (the preset's)
        PQ sub-quantisers = residual bytes per token, 1 <= pq_m <= dim (it need not divide the
        dimension). None: the preset's bytes for 128-d vectors scaled to the dimension
        (:func:`preset_pq_m`: balanced is 34 bytes for 128-d, 9 for 32-d). Each token also stores a 2-byte centroid id and, when the vectors are
        renormalised, a 1-byte norm.
    pq_rotation : bool or None, default None (the preset's: True)
        Rotate residuals onto their principal axes and give high-variance axes narrower
        sub-quantisers (:class:`plaid.codecs.PQCodec`): lower error at the same bytes.
    nbits : {1, 2, 4} or None, default None (2)
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
    pool_factor : float, default 1
        Token pooling (Clavié et al., 2024): each document's token vectors are clustered (Ward
        agglomerative clustering) and the index stores the cluster means, renormalised to unit
        length when the index renormalises (``normalize``), instead of the tokens. A document of
        ``n`` tokens keeps ``ceil(n / pool_factor)`` vectors (at least 1; an empty document stays
        empty; documents beyond 4096 tokens are pooled in blocks of 4096, see
        :mod:`plaid.indexing.pooling`). 1: no pooling. 2 halves the index at a small loss of
        quality (measured in the README). Every later ``Index.add`` pools its documents the same
        way (the manifest records it); ``num_tokens``, ``doclens`` and bytes per token then count
        the pooled vectors.
    search_depth : int or None, default None (the preset's: 3 for "balanced", 4 for "accurate", 1 for "compact")
        Recorded in the manifest (``search.depth``): a :class:`plaid.Searcher` of this index keeps
        ``search_depth`` times PLAID's default ``ndocs`` (k=10: 256) through stages 2-4 unless
        the search gives ``ndocs``. A codec as faithful as "balanced"'s or "accurate"'s leaves the
        centroid-only stages 2-3 as the limit of recall, which a deeper search lifts (msmarco-5k,
        k=10: balanced 0.932 at depth 1, 0.946 at depth 3, for 1.9x the latency; accurate 0.964
        at depth 1, 0.984 at depth 4, for ~3x). 1 <= search_depth <= 64.
    show_progress : bool, default True
        tqdm progress bars for the long phases.
    """

    def __init__(self, *, preset: str = "balanced", codec: Optional[str] = None, pq_m: Optional[int] = None,
                 pq_rotation: Optional[bool] = None, nbits: Optional[int] = None,
                 num_centroids: Optional[int] = None, kmeans_niter: int = 4,
                 kmeans_points_per_centroid: int = 16, codec_sample: int = 65536,
                 normalize="auto", chunk_tokens: int = 1 << 16, seed: int = 0,
                 pool_factor: float = 1, assignment: str = "auto", search_depth: Optional[int] = None,
                 show_progress: bool = True):
        if not isinstance(preset, str) or preset not in PRESETS:
            raise InvalidInputError(f"unknown preset {preset!r}; choose one of {', '.join(map(repr, PRESETS))}")
        p = PRESETS[preset]
        codec = p["codec"] if codec is None else codec
        pq_rotation = p.get("pq_rotation", False) if pq_rotation is None else pq_rotation
        nbits = p.get("nbits", 2) if nbits is None else nbits
        if codec not in ("pq", "scalar"):
            raise InvalidInputError(f"unknown codec {codec!r}; choose 'pq' or 'scalar'")
        if not isinstance(pq_rotation, (bool, np.bool_)):
            raise InvalidInputError(f"pq_rotation must be True or False, got {pq_rotation!r}")
        for name, v in [("kmeans_niter", kmeans_niter), ("kmeans_points_per_centroid", kmeans_points_per_centroid),
                        ("codec_sample", codec_sample), ("chunk_tokens", chunk_tokens),
                        ("pq_m", 1 if pq_m is None else pq_m)]:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if num_centroids is not None and (isinstance(num_centroids, bool) or
                                          not isinstance(num_centroids, (int, np.integer)) or num_centroids <= 0):
            raise InvalidInputError(f"num_centroids must be a positive integer or None, got {num_centroids!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            raise InvalidInputError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if normalize not in ("auto", True, False):
            raise InvalidInputError(f"normalize must be 'auto', True or False, got {normalize!r}")
        if isinstance(nbits, bool) or nbits not in (1, 2, 4):
            raise InvalidInputError(f"nbits must be 1, 2 or 4, got {nbits!r}")
        if assignment not in ("auto", "exact"):
            raise InvalidInputError(f"assignment must be 'auto' or 'exact', got {assignment!r}")
        self.search_depth = check_search_depth(p["search_depth"] if search_depth is None else search_depth)
        self.preset = preset
        self.pool_factor = check_pool_factor(pool_factor)
        # pq_m None: the preset's, scaled to the vectors' dimension when it is known (preset_pq_m)
        self.codec, self.nbits, self.pq_rotation = codec, int(nbits), bool(pq_rotation)
        self.pq_m = None if pq_m is None else int(pq_m)
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
        train(docs))`` writes the same files, byte for byte, as ``build(path, docs)``. With
        ``pool_factor > 1`` the training sees the pooled vectors (pooled into a temporary file),
        and the result records the pooling, which ``build_trained`` applies.
        """
        corpus = as_corpus(documents)
        try:
            return self._train_input(corpus, {})
        finally:
            corpus.close()

    def build_trained(self, path: str, documents, trained: "TrainedParams", *, doc_ids=None,
                      overwrite: bool = False):
        """Index ``documents`` into ``path`` with parameters trained before (:meth:`train`, or
        :meth:`TrainedParams.from_index`); returns the opened :class:`plaid.Index`.

        Nothing is trained: every token is encoded against ``trained``'s centroids and codec, so
        indexes built from parts of one corpus with one ``trained`` share a codec and their
        stage-4 scores are comparable (the shards of :mod:`plaid.distributed`). Documents are
        pooled as ``trained.pooling`` records (each document on its own: the same vectors as in
        a build of the whole corpus). This Indexer's own codec, k-means and pooling parameters
        are ignored; ``chunk_tokens``, ``assignment`` and ``show_progress`` apply.
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
            pooling = pooling_record(self.pool_factor)
            normalized = self._renormalize(corpus) if pooling is not None else None
        else:
            pooling, normalized = trained.pooling, trained.normalized
        work = corpus
        if pooling is not None:
            work = self._pool(corpus, pool_factor_of(pooling), normalized, writer.scratch_file, timings)
        try:
            if trained is None:
                trained = self._train(work, timings, normalized=normalized, pooling=pooling)
            return self._encode(writer, work, names, trained, num_empty, timings, t_start)
        finally:
            if work is not corpus:
                work.close()

    def _renormalize(self, corpus: Corpus) -> bool:
        """Whether the index renormalises (and pooled means are renormalised): ``normalize``, or
        for "auto", whether a sample of the input tokens is unit-norm."""
        if self.normalize != "auto":
            return bool(self.normalize)
        T = corpus.num_tokens
        return is_unit_norm(corpus.take(sample_token_ids(T, min(self.codec_sample, T), self.seed)))

    def _pool(self, corpus: Corpus, factor: float, renormalize: bool, spill, timings: Dict[str, float]) -> Corpus:
        """The pooling pass: ``corpus`` pooled into a spill made by ``spill`` (time in ``pool_s``)."""
        t = time.perf_counter()
        pooled = pool_corpus(corpus, factor, renormalize=renormalize, spill=spill, chunk_tokens=self.chunk_tokens,
                             threads=default_threads(), show_progress=self.show_progress)
        timings["pool_s"] = time.perf_counter() - t
        logger.info("pooled %d tokens into %d vectors (factor %g) in %.1fs", corpus.num_tokens, pooled.num_tokens,
                    factor, timings["pool_s"])
        return pooled

    def _check_space(self, writer: IndexWriter, corpus: Corpus, names: Optional[list],
                     trained: Optional["TrainedParams"]) -> None:
        """Refuse up front (:class:`plaid.InsufficientSpaceError`, before training) when the
        folder's file system cannot hold the index (:func:`~plaid.indexing.encode.space_needed`;
        the tokens before pooling: an upper bound)."""
        T = corpus.num_tokens
        if trained is not None:
            C, code_bytes, normalized = trained.num_centroids, trained.codec.code_bytes, trained.normalized
        else:
            C = min(self.num_centroids or default_num_centroids(T), T)
            pq_m = self.pq_m if self.pq_m is not None else preset_pq_m(self.preset, corpus.dim)
            code_bytes = make_codec(self.codec, corpus.dim, pq_m=pq_m, nbits=self.nbits,
                                    rotation=self.pq_rotation).code_bytes
            normalized = self.normalize is not False
        id_bytes = sum(len(n.encode("utf-8")) for n in names) if names is not None else 0
        needed, what = space_needed(T, corpus.num_docs, C, corpus.dim, code_bytes, normalized, id_bytes)
        writer.check_space(needed, what)

    def _train_input(self, corpus: Corpus, timings: Dict[str, float], spill=None) -> "TrainedParams":
        """Training on an input corpus: pooled first (into ``spill``, default a temporary file,
        removed before returning) when ``pool_factor > 1``. What :meth:`train` and a sharded
        build's driver run."""
        pooling = pooling_record(self.pool_factor)
        if pooling is None:
            return self._train(corpus, timings)
        normalized = self._renormalize(corpus)
        pooled = self._pool(corpus, self.pool_factor, normalized, spill, timings)
        try:
            return self._train(pooled, timings, normalized=normalized, pooling=pooling)
        finally:
            pooled.close()

    def _train(self, corpus: Corpus, timings: Dict[str, float], normalized: Optional[bool] = None,
               pooling: Optional[dict] = None) -> "TrainedParams":
        """Steps 1-3 of a build: sample, k-means, codec training (timings in ``timings``).

        ``normalized``: whether the index renormalises, when already decided (a pooled corpus:
        decided on the input, before pooling); None: from the sample, as ``normalize`` says.
        ``pooling``: the manifest's record of how ``corpus`` was pooled (None: it was not)."""
        T, dim = corpus.num_tokens, corpus.dim
        C = self.num_centroids or default_num_centroids(T)
        if C > T:
            warnings.warn(f"num_centroids={C} exceeds the {T} tokens of the corpus; using {T}", stacklevel=4)
            C = T
        pq_m = self.pq_m if self.pq_m is not None else preset_pq_m(self.preset, dim)
        codec = make_codec(self.codec, dim, pq_m=pq_m, nbits=self.nbits, rotation=self.pq_rotation)

        # 1. training sample
        t = time.perf_counter()
        n_km = C * self.kmeans_points_per_centroid
        sample = corpus.take(sample_token_ids(T, max(n_km, min(self.codec_sample, T)), self.seed))
        if normalized is None:
            normalized = is_unit_norm(sample) if self.normalize == "auto" else bool(self.normalize)
        timings["sample_s"] = time.perf_counter() - t

        # 2. k-means (raw centroids: the nearest raw centroid leaves smaller residuals, 3-4% lower
        #    reconstruction error on msmarco-5k; the searcher scores the stored int8 rows times 1/|row|)
        t = time.perf_counter()
        km_rows = sample if len(sample) <= n_km else \
            sample[np.random.default_rng(self.seed + 1).choice(len(sample), n_km, replace=False)]
        logger.info("k-means: %d centroids from %d of %d tokens, %d iterations", C, len(km_rows), T, self.kmeans_niter)
        centroids = train_centroids(km_rows, C, self.kmeans_niter, self.seed, show_progress=self.show_progress,
                                    exact=self._exact)
        # stored as int8 rows with a float32 scale each (a quarter of float32's bytes, any range);
        # tokens are encoded against the stored (dequantized) values
        stored = quantize_centroids(centroids)
        centroids = dequantize_centroids(stored["centroids"], stored["centroid_scales"])
        C = len(centroids)
        assigner = CentroidAssigner(centroids, seed=self.seed, exact=self._exact)
        timings["kmeans_s"] = time.perf_counter() - t

        # 3. codec training on residuals of (part of) the sample
        t = time.perf_counter()
        rows = sample if len(sample) <= self.codec_sample else \
            sample[np.random.default_rng(self.seed + 2).choice(len(sample), self.codec_sample, replace=False)]
        assigned = assign_all(assigner, rows)
        residuals = rows - centroids[assigned]
        codec.train(residuals, seed=self.seed)
        outlier_norm = float(np.quantile(np.linalg.norm(residuals, axis=1), OUTLIER_QUANTILE))
        # the one-byte norms' table spans the decoded norms of the same sample
        norm_values = NormQuantizer.fit(codec.decoded_norms(centroids, assigned, codec.encode(residuals))).values \
            if normalized else None
        del sample, rows, residuals, km_rows, assigned
        timings["codec_train_s"] = time.perf_counter() - t
        build = {"seed": self.seed, "kmeans_niter": self.kmeans_niter,
                 "kmeans_points_per_centroid": self.kmeans_points_per_centroid, "codec_sample": self.codec_sample}
        return TrainedParams(centroids=centroids, centroid_dtype=np.dtype(np.int8), codec=codec,
                             normalized=normalized, outlier_norm=outlier_norm, build=build, norm_values=norm_values,
                             centroid_scales=stored["centroid_scales"], pooling=pooling,
                             _assigner=assigner)

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
                             self.chunk_tokens, self.show_progress, trained.norm_quantizer)
        timings["encode_s"] = time.perf_counter() - t

        # 5. inverted file and the small global arrays
        t = time.perf_counter()
        ivf.write(N)
        writer.write("doclens", corpus.doclens.astype(np.int32))
        for name, arr in trained.stored_centroids().items():
            writer.write(name, arr)
        if trained.norm_values is not None:
            writer.write("norm_values", trained.norm_values)
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
            "pooling": None if trained.pooling is None else dict(trained.pooling),
            "search": {"depth": self.search_depth},
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
        The k-means centroids as stored (dequantized from int8 rows and scales, or from float16
        for an index of format 2 upgraded in place); tokens are encoded against exactly these values.
    centroid_dtype : numpy dtype
        How ``centroids`` are stored: int8 (with a float32 scale per row; what builds write), or
        float16 / float32 (indexes upgraded from format 2).
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
    norm_values : float32 [256] or None
        The table of the one-byte token norms (:class:`plaid.codecs.NormQuantizer`), when
        ``normalized``.
    centroid_scales : float32 [C] or None
        The scale of each int8 centroid row (``centroid_dtype`` int8).
    pooling : dict or None
        How documents are pooled before encoding (the manifest's ``pooling``: ``{"method":
        "ward", "factor": f}``), None for no pooling. The centroids and codec were trained on
        vectors pooled this way, so every document encoded with them must be too.

    ``to_payload`` / ``from_payload`` turn it into plain numbers, strings and arrays (no faiss or
    torch object), to send it to another process; :meth:`fingerprint` names it.
    """

    centroids: np.ndarray
    centroid_dtype: np.dtype
    codec: ResidualCodec
    normalized: bool
    outlier_norm: float
    build: Dict[str, int]
    norm_values: Optional[np.ndarray] = None
    centroid_scales: Optional[np.ndarray] = None
    pooling: Optional[Dict[str, Any]] = None
    _assigner: Optional[CentroidAssigner] = field(default=None, repr=False, compare=False)

    @property
    def norm_quantizer(self) -> Optional[NormQuantizer]:
        return NormQuantizer(self.norm_values) if self.norm_values is not None else None

    def stored_centroids(self) -> Dict[str, np.ndarray]:
        """The centroid arrays as written into an index (name -> array)."""
        if self.centroid_dtype == np.int8:
            s = np.asarray(self.centroid_scales, np.float32)
            q = np.rint(self.centroids / np.where(s > 0, s, 1)[:, None])  # exact: centroids = q * s
            return {"centroids": q.astype(np.int8), "centroid_scales": s}
        return {"centroids": self.centroids.astype(self.centroid_dtype)}

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
        """SHA-256 (hex) of the centroids, codec parameters and arrays, dim, normalisation, norm table
        and pooling: two indexes whose trained parameters have the same fingerprint score on the same
        scale and encode a document into the same vectors."""
        arrays = dict(self.codec.arrays())
        if self.norm_values is not None:
            arrays["norm_values"] = self.norm_values
        return params_fingerprint(self.dim, self.centroids, dict(self.codec.params()), arrays, self.normalized,
                                  self.pooling)

    def to_payload(self) -> dict:
        """Plain data (numbers, strings, numpy arrays): picklable, safe to send to another process."""
        return {"centroids": np.ascontiguousarray(self.centroids, np.float32), "centroid_dtype": self.centroid_dtype.str,
                "codec": dict(self.codec.params()),
                "codec_arrays": {k: np.ascontiguousarray(v, np.float32) for k, v in self.codec.arrays().items()},
                "normalized": bool(self.normalized), "outlier_norm": float(self.outlier_norm),
                "build": {k: int(v) for k, v in self.build.items()},
                "norm_values": None if self.norm_values is None else np.ascontiguousarray(self.norm_values, np.float32),
                "centroid_scales": None if self.centroid_scales is None
                else np.ascontiguousarray(self.centroid_scales, np.float32),
                "pooling": None if self.pooling is None else dict(self.pooling)}

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainedParams":
        """The inverse of :meth:`to_payload`."""
        centroids = np.ascontiguousarray(payload["centroids"], np.float32)
        codec = codec_from_manifest(centroids.shape[1], check_codec_params(centroids.shape[1], payload["codec"]),
                                    payload["codec_arrays"])
        pooling = payload.get("pooling")
        pool_factor_of(pooling, "trained parameters")  # one this plaid can apply
        return cls(centroids=centroids, centroid_dtype=np.dtype(payload["centroid_dtype"]), codec=codec,
                   normalized=bool(payload["normalized"]), outlier_norm=float(payload["outlier_norm"]),
                   build=dict(payload["build"]), norm_values=payload.get("norm_values"),
                   centroid_scales=payload.get("centroid_scales"),
                   pooling=None if pooling is None else dict(pooling))

    @classmethod
    def from_index(cls, path) -> "TrainedParams":
        """The parameters the index at ``path`` was trained with: its first
        ``build.initial_centroids`` centroids (``add`` may have appended more), its codec,
        normalisation, outlier limit, build parameters and pooling."""
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
        pool_factor_of(m.pooling, snap.path)  # a pooling this plaid can reproduce
        nq = snap.norm_quantizer
        if m.normalized and nq is None:
            raise FormatVersionError(f"{snap.path}: an index of format version {m.format_version} has no norm "
                                     f"table; convert it first with `plaid upgrade {snap.path}`")
        scales = np.array(snap.mapped("centroid_scales")[:c0], np.float32) \
            if m.arrays["centroids"].dtype == np.int8 else None
        return cls(centroids=np.ascontiguousarray(snap.centroids[:c0]), centroid_dtype=m.arrays["centroids"].dtype,
                   codec=snap.codec, normalized=m.normalized, outlier_norm=float(m.outlier_residual_norm),
                   build=build, norm_values=None if nq is None else nq.values, centroid_scales=scales,
                   pooling=None if m.pooling is None else dict(m.pooling))


def params_fingerprint(dim: int, centroids: np.ndarray, codec_params: dict, codec_arrays: Dict[str, np.ndarray],
                       normalized: bool, pooling: Optional[dict] = None) -> str:
    """SHA-256 (hex) naming trained parameters: dim, normalisation, codec parameters, the pooling
    (when there is one: an unpooled index keeps the fingerprint it had before pooling existed),
    the float32 bytes of the centroids and of every codec array (in name order)."""
    h = hashlib.sha256()
    named = {"dim": int(dim), "normalized": bool(normalized), "codec": codec_params}
    if pooling is not None:
        named["pooling"] = dict(pooling)
    h.update(json.dumps(named, sort_keys=True).encode())
    h.update(np.ascontiguousarray(centroids, np.float32).tobytes())
    for name in sorted(codec_arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(codec_arrays[name], np.float32).tobytes())
    return h.hexdigest()

"""colbert-ai (Stanford PLAID, 0.2.x) on CPU, fed precomputed token embeddings.

Run with the python of ``benchmarks/_work/venvs/colbert`` (``benchmarks/peers/install.sh``); the
protocol is ``benchmarks/_runner.py``'s.

Build: colbert-ai's own ``CollectionIndexer`` pipeline (passage sample -> faiss k-means ->
residual buckets -> chunked compression -> IVF), with the model replaced by a collection
encoder whose ``encode_passages`` returns the stored vectors of the given passages (the
"passages" of the collection are document numbers). No checkpoint is loaded.

Search: ``IndexScorer.rank(config, Q)`` on query tensors ``[1, m, dim]`` — colbert-ai's CPU
PLAID path (candidate generation, ``filter_pids`` C++ stages 2-3, ``decompress_residuals`` C++
stage 4), with ``ncells`` / ``centroid_score_threshold`` / ``ndocs`` from the setting, or
colbert-ai's own defaults by ``k`` when a setting gives none. The C++ kernels are compiled by
``prepare`` (torch's extension cache), so compilation stays out of build and search timings.

Config keys: ``nbits`` (2), ``kmeans_niters`` (4), ``seed`` (12345).
"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

from _runner import load_bundle, main  # noqa: E402


def _colbert_defaults(k: int) -> dict:
    # colbert-ai's Searcher.dense_search defaults by k
    if k <= 10:
        return {"ncells": 1, "centroid_score_threshold": 0.5, "ndocs": 256}
    if k <= 100:
        return {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024}
    return {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(k * 4, 4096)}


class ColbertEngine:
    name = "colbert-ai"
    batch_is_loop = True  # IndexScorer.rank takes one query; colbert-ai's search_all loops too

    def __init__(self, config: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
        self.nbits = int(config.get("nbits", 2))
        self.kmeans_niters = int(config.get("kmeans_niters", 4))
        self.seed = int(config.get("seed", 12345))
        self.scorer = None

    def versions(self) -> dict:
        import importlib.metadata as md

        import torch

        out = {"torch": torch.__version__}
        for p in ("colbert-ai", "faiss-cpu", "numpy"):
            try:
                out[p] = md.version(p)
            except md.PackageNotFoundError:
                pass
        return out

    @staticmethod
    def _load_kernels() -> None:
        """colbert-ai's CPU search kernels: compiled on first use into torch's extension cache,
        loaded from it afterwards. ``ColBERT``'s is normally loaded by the model's constructor."""
        from colbert.modeling.colbert import ColBERT
        from colbert.search.index_storage import IndexScorer
        from colbert.search.strided_tensor import StridedTensor

        StridedTensor.try_load_torch_extensions(False)
        IndexScorer.try_load_torch_extensions(False)
        ColBERT.try_load_torch_extensions(False)

    def prepare(self) -> dict:
        import time

        t = time.perf_counter()
        self._load_kernels()
        return {"compile_or_load_s": time.perf_counter() - t}

    def _config(self, index: str, **kw):
        from colbert.infra.config import ColBERTConfig

        return ColBERTConfig(nbits=self.nbits, dim=128, index_path=index, kmeans_niters=self.kmeans_niters,
                             rank=0, nranks=1, gpus=0, avoid_fork_if_possible=True, **kw)

    def build(self, bundle: str, index: str) -> dict:
        import torch
        from colbert.data.collection import Collection
        from colbert.indexing.collection_indexer import CollectionIndexer
        from colbert.indexing.index_saver import IndexSaver

        X, doclens, _ = load_bundle(bundle)
        offsets = np.concatenate([[0], np.cumsum(doclens)]).astype(np.int64)

        class Encoder:  # stands in for colbert-ai's CollectionEncoder: stored vectors, no model
            def encode_passages(self, passages):
                if len(passages) == 0:
                    return None, None
                pids = np.asarray(passages, np.int64)
                lens = doclens[pids]
                if len(pids) and (np.diff(pids) == 1).all():  # a contiguous chunk: one slice
                    embs = np.asarray(X[offsets[pids[0]] : offsets[pids[-1] + 1]], np.float32)
                else:
                    embs = np.concatenate([np.asarray(X[offsets[p] : offsets[p + 1]], np.float32) for p in pids])
                return torch.from_numpy(embs), [int(x) for x in lens]

        class Indexer(CollectionIndexer):
            def __init__(self, config, collection, verbose=1):  # as the parent's, minus the checkpoint
                self.verbose = verbose
                self.config = config
                self.rank, self.nranks = 0, 1
                self.use_gpu = False
                self.collection = Collection.cast(collection)
                self.encoder = Encoder()
                self.saver = IndexSaver(config)

        os.makedirs(index, exist_ok=True)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        config = self._config(index)
        Indexer(config, list(range(len(doclens)))).run([[[None]]])
        import json

        with open(os.path.join(index, "metadata.json")) as f:
            meta = json.load(f)
        return {"num_partitions": meta.get("num_partitions"), "num_embeddings": meta.get("num_embeddings")}

    def open(self, index: str, bundle: str) -> None:
        from colbert.search.index_storage import IndexScorer

        self._load_kernels()
        self.scorer = IndexScorer(index, use_gpu=False, load_index_with_mmap=False)
        self.index = index

    def search(self, queries, k: int, params: dict) -> np.ndarray:
        import torch

        p = dict(_colbert_defaults(k), **params)
        config = self._config(self.index, ncells=int(p["ncells"]),
                              centroid_score_threshold=float(p["centroid_score_threshold"]), ndocs=int(p["ndocs"]))
        out = np.full((len(queries), k), -1, np.int64)
        for i, q in enumerate(queries):
            Q = torch.from_numpy(np.ascontiguousarray(q, np.float32))[None]
            pids, _scores = self.scorer.rank(config, Q)
            pids = list(pids)[:k]
            out[i, : len(pids)] = pids
        return out


if __name__ == "__main__":
    main(ColbertEngine)

"""fast-plaid (LightOn, Rust + libtorch) on CPU, fed precomputed token embeddings.

Run with the python of ``benchmarks/_work/venvs/fastplaid`` (``benchmarks/peers/install.sh``);
the protocol is ``benchmarks/_runner.py``'s.

Build: ``FastPlaid(index, device="cpu").create(list of float16 [n_i, dim] tensors, nbits=...)``
(the list holds views of the memory-mapped bundle). Search: ``search(queries, top_k=k,
n_ivf_probe=..., n_full_scores=..., n_processes=1)`` one query per call for latency; the batch
pass hands it the whole list with ``n_processes`` = the thread count (its joblib CPU
parallelism). Settings' params: ``n_ivf_probe`` (8) and ``n_full_scores`` (4096), fast-plaid's
defaults.

Config keys: ``nbits`` (4, fast-plaid's default), ``kmeans_niters`` (4),
``max_points_per_centroid`` (256), ``seed`` (42).
"""
from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

from _runner import ids_from_lists, load_bundle, main  # noqa: E402

DEFAULTS = {"n_ivf_probe": 8, "n_full_scores": 4096}


class FastPlaidEngine:
    name = "fast-plaid"

    def __init__(self, config: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.nbits = int(config.get("nbits", 4))
        self.kmeans_niters = int(config.get("kmeans_niters", 4))
        self.max_points_per_centroid = int(config.get("max_points_per_centroid", 256))
        self.seed = int(config.get("seed", 42))
        self.fp = None

    def versions(self) -> dict:
        import importlib.metadata as md

        import torch

        out = {"torch": torch.__version__}
        for p in ("fast-plaid", "fastkmeans", "numpy"):
            try:
                out[p] = md.version(p)
            except md.PackageNotFoundError:
                pass
        return out

    def build(self, bundle: str, index: str) -> dict:
        import torch
        from fast_plaid import search

        X, doclens, _ = load_bundle(bundle)
        offsets = np.concatenate([[0], np.cumsum(doclens)]).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-writable memory map -> tensor
            Xt = torch.from_numpy(X)  # float16 view of the memory map, no copy
        docs = [Xt[offsets[i] : offsets[i + 1]] for i in range(len(doclens))]
        fp = search.FastPlaid(index=index, device="cpu")
        fp.create(documents_embeddings=docs, nbits=self.nbits, kmeans_niters=self.kmeans_niters,
                  max_points_per_centroid=self.max_points_per_centroid, seed=self.seed)
        return {}

    def open(self, index: str, bundle: str) -> None:
        from fast_plaid import search

        self.fp = search.FastPlaid(index=index, device="cpu")

    def _search(self, queries, k, params, n_processes):
        import torch

        p = dict(DEFAULTS, **params)
        qs = [torch.from_numpy(np.ascontiguousarray(q, np.float32)) for q in queries]
        res = self.fp.search(queries_embeddings=qs, top_k=k, n_ivf_probe=int(p["n_ivf_probe"]),
                             n_full_scores=int(p["n_full_scores"]), show_progress=False, n_processes=n_processes)
        return ids_from_lists([[pid for pid, _ in row] for row in res], k)

    def search(self, queries, k: int, params: dict) -> np.ndarray:
        return self._search(queries, k, params, 1)

    def search_batch(self, queries, k: int, params: dict) -> np.ndarray:
        return self._search(queries, k, params, self.threads)


if __name__ == "__main__":
    main(FastPlaidEngine)

"""How k-means sample size and iterations trade build time against fidelity (msmarco-5k).

For each setting: build time, the recall@10 ceiling (near-exhaustive search of the index:
ncells=16, ndocs=20000, no pruning) and recall@10 at default search settings, against exact
MaxSim on the original vectors. Usage::

    python benchmarks/build_params.py [--data ../shared/data/msmarco-5k] [--settings 8x4,16x4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import plaid  # noqa: E402
from _data import DEFAULT_DATA, load_bundle, recall_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--settings", default="8x4,16x4,24x3,32x3", help="points-per-centroid x iterations, comma separated")
    ap.add_argument("--codec", default="pq")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    X, doclens, queries = load_bundle(args.data)
    docs = plaid.Embeddings(X, doclens)
    exact = plaid.maxsim(queries, docs)
    tmp = tempfile.mkdtemp(prefix="plaid-bench-")
    try:
        print(f"{'setting':>10} {'build_s':>8} {'ceiling':>8} {'default':>8}")
        for setting in args.settings.split(","):
            ppc, niter = (int(v) for v in setting.split("x"))
            path = os.path.join(tmp, setting)
            t = time.perf_counter()
            plaid.Indexer(codec=args.codec, kmeans_points_per_centroid=ppc, kmeans_niter=niter,
                          show_progress=False).build(path, docs)
            build_s = time.perf_counter() - t
            s = plaid.Searcher(path)
            ceiling = recall_at(exact, s.search(queries, k=10, ncells=16, ndocs=20000,
                                                centroid_score_threshold=-1e9).ids)
            default = recall_at(exact, s.search(queries, k=10).ids)
            print(f"{setting:>10} {build_s:8.1f} {ceiling:8.3f} {default:8.3f}", flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Batch throughput with 1 and 2 worker threads, and single-query latency, interleaved in one process.

A Searcher runs a batch's queries on ``num_threads`` worker threads after one query-centroid
product; this measures what that buys on this machine. Rounds alternate the settings (a shared
machine's speed drifts); reported are the median of the rounds and the ratios::

    python benchmarks/threads.py [--index DIR] [--rounds 5]

Without ``--index`` the msmarco-5k index is built (default Indexer) under benchmarks/_work/.
Queries are msmarco-5k's 50 (repeated to ``--queries``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpora  # noqa: E402
from _data import load_bundle  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="an existing index (default: build msmarco-5k's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.queries < 1 or args.k < 1:
        ap.error("--rounds, --queries and --k must be at least 1")
    import torch

    import plaid

    torch.set_num_threads(2)
    X, doclens, queries = load_bundle(args.source)
    index = args.index or os.path.join(corpora.DEFAULT_WORK, "threads", "msmarco-5k")
    if not os.path.exists(os.path.join(index, "manifest.json")):
        plaid.Indexer(show_progress=False).build(index, plaid.Embeddings(X, doclens), overwrite=True)
    qs = (queries * (args.queries // len(queries) + 1))[: args.queries]
    searchers = {t: plaid.Searcher(index, num_threads=t) for t in (1, 2)}
    for s in searchers.values():  # warm: page cache, compiled kernels
        s.search(qs[:20], k=args.k)
    rows = {"batch_qps_1": [], "batch_qps_2": [], "single_ms": []}
    for r in range(args.rounds):
        for t in ((1, 2) if r % 2 == 0 else (2, 1)):
            t0 = time.perf_counter()
            searchers[t].search(qs, k=args.k)
            rows[f"batch_qps_{t}"].append(len(qs) / (time.perf_counter() - t0))
        lat = []
        for q in qs[:50]:
            t0 = time.perf_counter()
            searchers[1].search([q], k=args.k)
            lat.append(time.perf_counter() - t0)
        rows["single_ms"].append(float(np.median(lat)) * 1e3)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    out = {"index": index, "rounds": rows, "median": med, "speedup_2_threads": med["batch_qps_2"] / med["batch_qps_1"]}
    print(json.dumps({k: round(v, 3) for k, v in med.items()}), f"2 threads / 1 thread: x{out['speedup_2_threads']:.2f}")
    return out


if __name__ == "__main__":
    main()

"""Batch throughput with 1 and 2 worker threads, and single-query latency, interleaved in one process.

A Searcher runs a batch on ``num_threads`` threads (the query-centroid product split over them,
then one query per thread at a time); this measures what that buys on this machine. The
``cores_used`` columns (CPU seconds / wall seconds) say how many cores the process actually got:
on a busy machine 2 threads cannot get 2 cores, and the ratio means little. Rounds alternate the settings (a shared
machine's speed drifts); reported are the median of the rounds and the ratios::

    python benchmarks/threads.py [--index DIR] [--rounds 11]

Without ``--index`` the msmarco-5k index is built (default Indexer) under benchmarks/_work/.
Queries are msmarco-5k's 50 (repeated to ``--queries``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpora  # noqa: E402
from _data import load_bundle  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="an existing index (default: build msmarco-5k's)")
    ap.add_argument("--rounds", type=int, default=11)
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
    rows = {"batch_qps_1": [], "batch_qps_2": [], "single_ms_1": [], "single_ms_2": [], "cores_used_1": [], "cores_used_2": []}
    for r in range(args.rounds):
        for t in ((1, 2) if r % 2 == 0 else (2, 1)):
            c0, t0 = _cpu(), time.perf_counter()
            searchers[t].search(qs, k=args.k)
            wall = time.perf_counter() - t0
            rows[f"batch_qps_{t}"].append(len(qs) / wall)
            rows[f"cores_used_{t}"].append((_cpu() - c0) / wall)  # below t: the machine was busy
        for t in (1, 2):
            lat = []
            for q in qs[:50]:
                t0 = time.perf_counter()
                searchers[t].search([q], k=args.k)
                lat.append(time.perf_counter() - t0)
            rows[f"single_ms_{t}"].append(float(np.median(lat)) * 1e3)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    # each round's two batches ran back to back: their ratio is less exposed to the drift
    per_round = [a / b for a, b in zip(rows["batch_qps_2"], rows["batch_qps_1"])]
    out = {"index": index, "rounds": rows, "median": med, "speedup_2_threads": med["batch_qps_2"] / med["batch_qps_1"],
           "speedup_2_threads_per_round": float(np.median(per_round)), "load_average": os.getloadavg()}
    print(json.dumps({k: round(v, 3) for k, v in med.items()}),
          f"2 threads / 1 thread: x{out['speedup_2_threads']:.2f} (median of the rounds' ratios x{np.median(per_round):.2f})")
    return out


if __name__ == "__main__":
    main()

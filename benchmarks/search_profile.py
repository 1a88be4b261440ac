"""Where a single query's time goes: the pipeline's per-stage timers, the latency with 1 and 2
threads, and the floor (Q·Cᵀ plus exact MaxSim over only the final candidates), on one index.

Two threads are measured twice: as a search runs them (a large query's stage 2 and stage 4 in
parts, one per thread: ``plaid.search.kernels_cpu.search_query``) and with every query's stages
in one call on one thread (``threads_2_one_call``: the product alone split), the same ids.

Each round runs every query once per setting, the settings alternating (a shared machine's speed
drifts); reported are medians over queries and rounds. Per-stage times come from
``search(trace=True)`` (the compiled query's cycle counter, scaled to its wall time; the byte
table is stage 4's), and "other" is the rest of the call (validation, the Searcher, Python)::

    python benchmarks/search_profile.py --index DIR [--bundle FOLDER] [--rounds 3] [--queries 100] [--ndocs N]

``--bundle``: the corpus folder whose queries to use (default msmarco-5k's 50). Prints one JSON
object; nothing is written.
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

STAGES = ["centroid_scores", "stage1_candidates", "stage2_prune", "stage3_rank", "stage4_exact"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--bundle", default=corpora.DEFAULT_SOURCE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100, help="queries used (at most all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ndocs", type=int, default=None,
                    help="candidates kept by stage 2 (default: the index's, by k and its search depth)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.queries < 1:
        ap.error("--rounds and --queries must be at least 1")
    if args.ndocs is not None and args.ndocs < args.k:
        ap.error(f"--ndocs must be at least --k ({args.k}), got {args.ndocs}")
    import torch

    import plaid
    from plaid.search.pipeline import top_n

    _, _, queries = load_bundle(args.bundle)
    queries = queries[: args.queries]
    kw = {} if args.ndocs is None else {"ndocs": args.ndocs}
    searchers = {t: plaid.Searcher(args.index, num_threads=t) for t in (1, 2)}
    searchers["2one"] = plaid.Searcher(args.index, num_threads=2)
    one = searchers["2one"]._state.engine
    whole = one.search_one
    one.search_one = lambda q, R, b, trace, pool=None: whole(q, R, b, trace, None)  # the stages on one thread
    for s in searchers.values():  # warm: page cache, compiled kernels
        for q in queries[:20]:
            s.search([q], k=args.k, **kw)
    lat = {1: [], 2: [], "2one": []}
    ids = {2: [], "2one": []}
    stages = {n: [] for n in STAGES + ["other"]}
    floor = []
    s1 = searchers[1]
    p = dict(plaid.default_search_params(args.k, s1.search_depth), **kw)  # what stage 4 scores: the n3 best
    final = s1.search(queries, k=max(p["ndocs"] // 4, args.k), **p).ids
    eng = s1._state.engine
    with torch.inference_mode():
        for r in range(args.rounds):
            for i, q in enumerate(queries):
                for t in ((1, 2, "2one") if (i + r) % 2 == 0 else ("2one", 2, 1)):
                    t0 = time.perf_counter()
                    got = searchers[t].search([q], k=args.k, **kw)
                    lat[t].append(time.perf_counter() - t0)
                    if t in ids and r == 0:
                        ids[t].append(got.ids[0])
                t0 = time.perf_counter()
                res = s1.search([q], k=args.k, trace=True, **kw)
                total = time.perf_counter() - t0
                tm = res.traces[0].timings
                for n in STAGES:
                    stages[n].append(tm.get(n, 0.0))
                stages["other"].append(total - sum(tm.values()))
                docs = np.sort(final[i][final[i] >= 0])  # what stage 4 scored
                t0 = time.perf_counter()
                R = eng.centroid_scores(q)
                top_n(eng.exact_scores(q, docs, R), args.k)
                floor.append(time.perf_counter() - t0)
    if not all((a == b).all() for a, b in zip(ids[2], ids["2one"])):
        raise SystemExit("two threads in parts and in one call returned different ids")
    ms = lambda v: round(float(np.median(v)) * 1e3, 4)  # noqa: E731
    out = {"index": args.index, "queries": len(queries), "rounds": args.rounds, "ndocs": p["ndocs"],
           "median_query_tokens": int(np.median([len(q) for q in queries])),
           "latency_ms": {"threads_1": ms(lat[1]), "threads_2": ms(lat[2]), "threads_2_one_call": ms(lat["2one"])},
           "parts_over_one_call": round(float(np.median(lat[2]) / np.median(lat["2one"])), 3),
           "stages_ms_1_thread": {n: ms(v) for n, v in stages.items()},
           "floor_ms_1_thread": ms(floor), "load_average": os.getloadavg()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

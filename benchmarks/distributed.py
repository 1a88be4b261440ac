"""Sharded build and search on Ray, on this machine, and what it suggests for a cluster.

Measures, on a grown corpus (default 50k documents, ``corpora.grow``):

* **build**: a one-process ``Indexer.build`` against ``build_sharded`` with ``--shards`` shards
  encoded by as many Ray tasks (``cpus_per_task=1``, one thread each), on a local Ray of
  ``--threads`` CPUs; the training phase is the same code on the driver in both;
* **fan-out overhead**: one query per call, a local ``plaid.Searcher`` against a
  ``ShardedSearcher`` over the same index as a single shard (the per-query cost of Ray: object
  store put, one actor call, the merge), and over ``--shards`` shards;
* **throughput**: every query in one call (one message per shard), 1 actor with all threads
  against ``--shards`` actors with one thread each, and the local Searcher;
* **per-shard work**: single-thread latency of a local Searcher on indexes of 5k (msmarco-5k),
  25k (a shard) and 50k documents, fitted as ``t(n) = c * n**beta``, then put on paper for
  100M documents on M machines (the assumptions are printed with the table).

Every search pass is preceded by an untimed pass over all queries. Recall@10 (tie-tolerant,
against exhaustive MaxSim) is reported for the one-process and the sharded index. Results:
``benchmarks/results/distributed.json`` and ``distributed.md``::

    python benchmarks/distributed.py --size 50k --shards 2 --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import corpora  # noqa: E402

RESULTS = os.path.join(HERE, "results")
#: Loopback address of the local Ray (Ray rewrites 127.0.0.1 to the machine's network address).
LOOPBACK = "127.0.0.2"

log = logging.getLogger("bench.distributed")


def latencies(search, queries, cpu: list = None) -> np.ndarray:
    """Seconds per query, one query per call (after one untimed pass). ``cpu``: receives this
    process's CPU seconds per call (for a sharded searcher: the driver's own work)."""
    for q in queries:
        search([q])
    out = []
    c0 = time.process_time()
    for q in queries:
        t = time.perf_counter()
        search([q])
        out.append(time.perf_counter() - t)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / len(queries))
    return np.array(out)


def batch_qps(search, queries, rounds: int) -> float:
    """Queries per second with every query in one call (best of ``rounds``, after one untimed call)."""
    search(queries)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best


def wrap_as_one_shard(index: str, root: str) -> str:
    """A sharded index of one shard: a copy of the index folder under a sharded manifest (the same
    folder a one-shard ``build_sharded`` writes: its shard is byte-identical to a one-process build)."""
    import plaid
    from plaid.distributed.sharded import ShardedManifest, ShardEntry, commit_sharded_manifest
    from plaid.indexing.indexer import TrainedParams

    if os.path.exists(os.path.join(root, "sharded.json")):
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    shutil.copytree(index, os.path.join(root, "shard-0"))
    ix = plaid.Index(os.path.join(root, "shard-0"))
    tp = TrainedParams.from_index(ix)
    commit_sharded_manifest(root, ShardedManifest(
        generation=0, dim=ix.dim, num_documents=ix.num_documents, has_doc_ids=False, codec=ix.codec,
        normalized=tp.normalized, codec_fingerprint=tp.fingerprint(), max_shard_documents=None, next_shard=1,
        shards=(ShardEntry("shard-0", ix.generation, ix.num_documents),), routing=((0, 0, 0, ix.num_documents),)),
        new=True)
    return root


def fit_power(ns, ts):
    """(c, beta) of t = c * n**beta, least squares in log-log."""
    beta, logc = np.polyfit(np.log(ns), np.log(ts), 1)
    return float(np.exp(logc)), float(beta)


def projection(c, beta, call_s, shard_s, driver_s, bytes_per_token, tokens_per_doc, machines, cores, ram_gb,
               total_docs=100e6):
    """On paper: ``total_docs`` over M machines of ``cores`` cores, in two layouts.

    A query visits every shard. t(n) = c * n**beta is one shard's single-thread search time;
    ``call_s`` the fan-out cost of a call (1 shard, wall clock), ``driver_s`` the driver's CPU per
    call with one shard, ``shard_s`` its CPU for each further shard (one actor call, the answer, its
    part of the merge). Latency = t(n) + call_s + (S - 1) * shard_s. Throughput is the smaller of
    what the shards' cores give and what one driver can send (1 / its CPU per call).
    """
    index_gb = total_docs * tokens_per_doc * bytes_per_token / 1e9
    rows = []
    for M in machines:
        for layout, S in (("one shard per core", M * cores), ("one shard per machine", M)):
            n = total_docs / S
            t = c * n ** beta
            compute_qps = M * cores / (S * t)  # every query costs t on one core of each of the S shards
            driver_qps = 1.0 / max(1e-9, driver_s + (S - 1) * shard_s)
            rows.append({"machines": M, "layout": layout, "shards": S, "docs_per_shard": n, "shard_query_s": t,
                         "latency_s": t + call_s + (S - 1) * shard_s, "compute_qps": compute_qps,
                         "driver_qps": driver_qps, "index_gb_per_machine": index_gb / M,
                         "fits_ram": index_gb / M <= 0.8 * ram_gb})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="50k", help="grown corpus size (corpora.grow)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPUs of the local Ray and threads of the one-process runs")
    ap.add_argument("--queries", type=int, default=0, help="queries to use (0: all)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the searchers in turn (per searcher the round of the lowest median is kept)")
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--results", default=RESULTS, help="folder of distributed.json and distributed.md")
    ap.add_argument("--reuse-builds", action="store_true",
                    help="search the indexes of the last run again, with its build figures (no build)")
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    ap.add_argument("--machines", default="1,4,16,64", help="cluster sizes of the projection")
    ap.add_argument("--cores", type=int, default=16, help="cores per machine in the projection")
    ap.add_argument("--ram-gb", type=float, default=128, help="RAM per machine in the projection")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.shards < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--shards, --threads and --rounds must be at least 1")
    import torch

    import plaid
    from _data import load_bundle

    torch.set_num_threads(args.threads)
    out = {"size": args.size, "shards": args.shards, "threads": args.threads, "machine": f"{os.cpu_count()} cores"}
    bundle, meta, gt_ids, gt_scores = corpora.prepare(args.size, args.work, args.source, threads=args.threads,
                                                      log=log.info)
    X, doclens, queries = load_bundle(bundle)
    if args.queries:
        queries, gt_ids, gt_scores = queries[: args.queries], gt_ids[: args.queries], gt_scores[: args.queries]
    emb = plaid.Embeddings(X, doclens)
    out["corpus"] = {"documents": int(len(doclens)), "tokens": int(doclens.sum()), "queries": len(queries)}
    work = os.path.join(args.work, "distributed", args.size)
    os.makedirs(work, exist_ok=True)

    # -- build: one process, then sharded on a local Ray (started after, so it is not in the way) --
    one = os.path.join(work, "one")
    sharded = os.path.join(work, f"sharded{args.shards}")
    previous = None
    if args.reuse_builds:
        with open(os.path.join(args.results, "distributed.json")) as f:
            previous = json.load(f)
        if (previous["size"], previous["shards"], previous["threads"]) != (args.size, args.shards, args.threads):
            ap.error("--reuse-builds: the last results are of another --size, --shards or --threads")
        out["build_one_process"], out["build_sharded"] = previous["build_one_process"], previous["build_sharded"]
        out["builds_reused_from_an_earlier_run"] = True
        log.info("builds reused: %s, %s", one, sharded)
    else:
        ix = plaid.Indexer(show_progress=False)
        t = time.perf_counter()
        ix.build(one, emb, overwrite=True)
        out["build_one_process"] = dict(ix.last_timings, total_s=time.perf_counter() - t)
        log.info("one-process build: %.1f s (%s)", out["build_one_process"]["total_s"],
                 ", ".join(f"{k} {v:.1f}" for k, v in ix.last_timings.items()))
    local = plaid.Searcher(one)
    res_one = local.search(queries, k=10)
    torch.set_num_threads(1)
    before = latencies(lambda q: local.search(q, k=10), queries)
    torch.set_num_threads(args.threads)
    out["latency_ms_before_ray"] = {"median": float(np.median(before) * 1e3),
                                    "p95": float(np.percentile(before, 95) * 1e3)}
    import ray

    t = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=False, logging_level="WARNING")
    out["ray_init_s"] = time.perf_counter() - t
    if previous is None:
        t = time.perf_counter()
        si = plaid.build_sharded(sharded, emb, num_shards=args.shards, indexer=dict(show_progress=False),
                                 overwrite=True, cpus_per_task=1)
        bt = si.build_timings
        out["build_sharded"] = {"total_s": time.perf_counter() - t, "train_s": bt["train_s"],
                                "encode_s": bt["encode_s"], "tasks_s": [s["seconds"] for s in bt["shards"].values()],
                                "task_encode_s": [s["timings"].get("encode_s") for s in bt["shards"].values()]}
        log.info("sharded build (%d tasks): %.1f s (train %.1f, encode phase %.1f; tasks %s)", args.shards,
                 out["build_sharded"]["total_s"], bt["train_s"], bt["encode_s"],
                 ", ".join(f"{s:.1f}" for s in out["build_sharded"]["tasks_s"]))

    # -- fan-out overhead, latency, throughput: the searchers in turn, --rounds rounds, best kept. Latency
    #    one query per call with one thread everywhere (on a shared 2-core machine a 2-thread search waits
    #    for whichever core is busy: its latency is erratic); throughput every query in one call --
    single = wrap_as_one_shard(one, os.path.join(work, "one-as-shard"))
    many = f"{args.shards} shard actors"
    lat_names = ["local Searcher", "1 shard actor", many]
    with plaid.ShardedSearcher(single, threads_per_shard=1) as s1, \
            plaid.ShardedSearcher(single, threads_per_shard=args.threads) as s1t, \
            plaid.ShardedSearcher(sharded, threads_per_shard=max(1, args.threads // args.shards)) as sn:
        searchers = {"local Searcher": local, "1 shard actor": s1, f"1 shard actor, {args.threads} threads": s1t,
                     many: sn}
        out["one_shard_results_identical"] = bool(np.array_equal(s1.search(queries, k=10).ids, res_one.ids))
        res_sh = sn.search(queries, k=10)
        lat = {name: [] for name in lat_names}
        driver_cpu = {name: [] for name in lat_names}
        qps_rounds = {name: [] for name in searchers}
        torch.set_num_threads(1)  # the local Searcher: one thread, as each shard actor of the 2-shard searcher
        for r in range(args.rounds):
            for name, srch in searchers.items():
                if name in lat:
                    lat[name].append(latencies(lambda q: srch.search(q, k=10), queries, driver_cpu[name]))
                qps_rounds[name].append(batch_qps(lambda q: srch.search(q, k=10), queries, 1))
            log.info("round %d: median ms %s; q/s %s", r,
                     {k: round(float(np.median(v[-1])) * 1e3, 2) for k, v in lat.items()},
                     {k: round(v[-1], 1) for k, v in qps_rounds.items()})
        torch.set_num_threads(args.threads)
        qps = {name: max(v) for name, v in qps_rounds.items()}
    best = {name: min(v, key=np.median) for name, v in lat.items()}
    out["latency_ms"] = {k: {"median": float(np.median(v) * 1e3), "p95": float(np.percentile(v, 95) * 1e3)}
                         for k, v in best.items()}
    out["latency_ms_rounds"] = {k: [float(np.median(x) * 1e3) for x in v] for k, v in lat.items()}
    out["driver_cpu_ms"] = {k: float(min(v) * 1e3) for k, v in driver_cpu.items()}
    out["batch_qps"] = qps
    out["batch_qps_rounds"] = qps_rounds
    out["fanout_overhead_ms"] = out["latency_ms"]["1 shard actor"]["median"] - out["latency_ms"]["local Searcher"]["median"]
    recall = corpora.Recall(bundle, gt_ids, gt_scores)
    out["recall@10"] = {"one process": recall(res_one.ids, 10), f"{args.shards} shards": recall(res_sh.ids, 10)}
    log.info("latency %s", {k: round(v["median"], 2) for k, v in out["latency_ms"].items()})
    log.info("batch q/s %s; recall@10 %s", {k: round(v, 1) for k, v in qps.items()}, out["recall@10"])

    # -- per-shard work: one thread, indexes of 5k, one shard, the whole corpus --
    torch.set_num_threads(1)
    five = os.path.join(args.work, "distributed", "msmarco-5k")
    if not os.path.exists(os.path.join(five, "manifest.json")):
        X5, d5, _ = load_bundle(args.source)
        plaid.Indexer(show_progress=False).build(five, plaid.Embeddings(X5, d5), overwrite=True)
    points = []
    for path in [five, plaid.ShardedIndex(sharded).shard_paths()[0], one]:
        s = plaid.Searcher(path)
        t = np.median(latencies(lambda q: s.search(q, k=10), queries[:200]))
        points.append({"index": os.path.relpath(path, args.work), "documents": s.num_documents, "query_s": float(t)})
        log.info("1-thread latency on %d documents: %.2f ms", s.num_documents, t * 1e3)
    torch.set_num_threads(args.threads)
    c, beta = fit_power([p["documents"] for p in points], [p["query_s"] for p in points])
    info = plaid.Index(one).info()
    tokens_per_doc = info["num_tokens"] / info["num_documents"]
    machines = [int(x) for x in args.machines.split(",")]
    out["per_shard_work"] = {"points": points, "fit": {"c": c, "beta": beta}}
    call_s = max(0.0, out["fanout_overhead_ms"] / 1e3)
    # each further shard costs the driver its CPU: an actor call, its answer, its part of the merge (measured
    # as the driver's CPU time per call, which the other processes on a shared machine do not inflate)
    shard_s = max(0.0, out["driver_cpu_ms"][many] - out["driver_cpu_ms"]["1 shard actor"]) / 1e3 / max(1, args.shards - 1)
    out["projection"] = {
        "assumptions": {"documents": 100e6, "tokens_per_doc": tokens_per_doc, "bytes_per_token": info["bytes_per_token"],
                        "cores_per_machine": args.cores, "ram_gb_per_machine": args.ram_gb,
                        "call_overhead_s": call_s, "per_shard_overhead_s": shard_s,
                        "driver_cpu_s": out["driver_cpu_ms"]["1 shard actor"] / 1e3},
        "rows": projection(c, beta, call_s, shard_s, out["driver_cpu_ms"]["1 shard actor"] / 1e3,
                           info["bytes_per_token"], tokens_per_doc, machines, args.cores, args.ram_gb)}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "distributed.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.results, "distributed.md"), "w") as f:
        f.write(markdown(out))
    if started:
        ray.shutdown()
    print(markdown(out))
    return out


def markdown(r: dict) -> str:
    b1, bs = r["build_one_process"], r["build_sharded"]
    n = r["shards"]
    lines = [
        f"# Sharded build and search on Ray ({r['size']}: {r['corpus']['documents']:,} documents, "
        f"{r['corpus']['tokens']:,} tokens, {r['corpus']['queries']} queries)",
        "",
        f"One machine ({r['machine']}, shared with other work: figures drift between runs; compare the ratios), "
        f"a local Ray of {r['threads']} CPUs. Regenerate: `python benchmarks/distributed.py --size {r['size']} "
        f"--shards {n} --threads {r['threads']}`.",
        "",
        "## Build",
        "",
        "| build | total s | train s (driver) | encode s | ratio to one process |",
        "|---|---|---|---|---|",
        f"| one process, {r['threads']} threads | {b1['total_s']:.1f} | "
        f"{b1['sample_s'] + b1['kmeans_s'] + b1['codec_train_s']:.1f} | {b1['encode_s'] + b1['ivf_s']:.1f} | 1.00 |",
        f"| sharded: {n} Ray tasks of 1 thread | {bs['total_s']:.1f} | {bs['train_s']:.1f} | {bs['encode_s']:.1f} "
        f"(tasks {', '.join(f'{x:.1f}' for x in bs['tasks_s'])}) | {bs['total_s'] / b1['total_s']:.2f} |",
        "",
        ("(Build figures from an earlier run of the same settings: `--reuse-builds`.) "
         if r.get("builds_reused_from_an_earlier_run") else "")
        + f"Starting the local Ray took {r['ray_init_s']:.1f} s (not in the figures). The training phase (sample, "
        "k-means, codec) is the same code on the driver in both builds (same seed, same result), so its two "
        f"figures ({b1['sample_s'] + b1['kmeans_s'] + b1['codec_train_s']:.1f} s and {bs['train_s']:.1f} s) show "
        "how much this shared machine drifts; the encoding phase is what the tasks spread: "
        f"{bs['encode_s']:.1f} s for {n} tasks of 1 thread against {b1['encode_s'] + b1['ivf_s']:.1f} s for one "
        f"process of {r['threads']} threads (x{bs['encode_s'] / (b1['encode_s'] + b1['ivf_s']):.2f}). On one machine "
        "the sharded build can only match a one-process build that already uses every core; its gain is elsewhere: "
        "encoding on other machines, and an index no single machine has to hold.",
        "",
        "## Search (k=10)",
        "",
        "One thread per searcher process unless said (on this shared 2-core machine a 2-thread search waits for "
        "whichever core another process holds: its figures jump by up to 6x between rounds and runs, see below). Latency: one "
        "query per call; throughput: every query in one call (one message per shard).",
        "",
        "| searcher | median ms/query | p95 ms | batch q/s | recall@10 |",
        "|---|---|---|---|---|",
    ]
    rec = r["recall@10"]
    many = f"{n} shard actors"
    one_t = f"1 shard actor, {r['threads']} threads"
    for name, q in r["batch_qps"].items():
        v = r["latency_ms"].get(name)
        rc = rec[f"{n} shards"] if name == many else rec["one process"]
        cells = f"{v['median']:.2f} | {v['p95']:.2f}" if v else "– | –"
        label = {"local Searcher": "local Searcher of 1 thread (no Ray)",
                 "1 shard actor": "1 shard actor of 1 thread", one_t: f"1 shard actor of {r['threads']} threads",
                 many: f"{many} of 1 thread"}.get(name, name)
        lines.append(f"| {label} | {cells} | {q:.1f} | {rc:.3f} |")
    lines += [
        "",
        f"The local Searcher measured before Ray was started: {r['latency_ms_before_ray']['median']:.2f} ms median. "
        f"Rounds (searchers in turn, the best round kept), median ms: "
        + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in r["latency_ms_rounds"].items())
        + "; batch q/s: "
        + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in r["batch_qps_rounds"].items()) + ".",
        "",
        f"Fan-out overhead per query (1 shard actor against the local Searcher on the same index, one query per "
        f"call): **{r['fanout_overhead_ms']:.2f} ms** (the queries sent inline, one actor call, the merge; the "
        f"driver's own CPU per call: {r['driver_cpu_ms']['1 shard actor']:.2f} ms with 1 shard, "
        f"{r['driver_cpu_ms'][many]:.2f} ms with {n}). A one-shard "
        f"sharded search returns the same ids as the local one: {r['one_shard_results_identical']}. Batch "
        f"throughput of {n} actors of 1 thread (each shard half the documents) against 1 actor of 1 thread over "
        f"the whole index: {r['batch_qps'][many] / r['batch_qps']['1 shard actor']:.2f}x, and against 1 actor of "
        f"{r['threads']} threads: {r['batch_qps'][many] / r['batch_qps'][one_t]:.2f}x. Splitting an index costs "
        f"more work in all (a query searches every shard, and a shard of n/{n} documents takes more than 1/{n} "
        "of the time: the fit below), which more cores pay for.",
        "",
        "## Per-shard work, and 100M documents on paper",
        "",
        "| index | documents | 1-thread median ms/query |",
        "|---|---|---|",
    ]
    for p in r["per_shard_work"]["points"]:
        lines.append(f"| {p['index']} | {p['documents']:,} | {p['query_s'] * 1e3:.2f} |")
    f, a = r["per_shard_work"]["fit"], r["projection"]["assumptions"]
    lines += [
        "",
        f"Fit: t(n) = {f['c'] * 1e3:.4f} ms × n^{f['beta']:.3f} for a shard of n documents, one thread.",
        "",
        f"Assumptions: {a['documents'] / 1e6:.0f}M documents of {a['tokens_per_doc']:.1f} tokens at "
        f"{a['bytes_per_token']:.1f} B/token (this corpus' index); machines of {a['cores_per_machine']} cores and "
        f"{a['ram_gb_per_machine']:.0f} GB RAM; every query visits every shard, each searching it with one thread; "
        f"the fan-out costs {a['call_overhead_s'] * 1e3:.2f} ms per call (wall, above) plus "
        f"{a['per_shard_overhead_s'] * 1e3:.2f} ms of driver CPU per further shard (the driver's CPU per call: "
        f"{a['driver_cpu_s'] * 1e3:.2f} ms with 1 shard, more with {r['shards']}); latency = t(n) + that; throughput "
        "= the smaller of the shards' cores (cores × machines / (shards × t(n))) and one driver's CPU (more "
        "drivers, or an aggregating actor per machine, lift the latter). The fit is extrapolated far beyond the sizes measured "
        "(a shard of millions of documents has more centroids, longer inverted lists, colder caches): an order "
        "of magnitude, not a promise. The index is memory-mapped and must stay in page cache: the RAM column.",
        "",
        "| machines | layout | shards | documents per shard | est. latency ms | est. q/s (shards' cores) | "
        "est. q/s (one driver) | index GB per machine | fits in RAM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["projection"]["rows"]:
        lines.append(f"| {row['machines']} | {row['layout']} | {row['shards']} | {row['docs_per_shard']:,.0f} | "
                     f"{row['latency_s'] * 1e3:.0f} | {row['compute_qps']:.0f} | {row['driver_qps']:.0f} | "
                     f"{row['index_gb_per_machine']:.0f} | {'yes' if row['fits_ram'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

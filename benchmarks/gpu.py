"""Search on a CUDA device against the CPU engine, on one index, in one process.

For each search setting: single-query latency (each query alone, median and p90 over queries and
rounds), batch throughput (``--batch`` queries in one call), recall@10 against exhaustive MaxSim
(the dataset's ``exact_top100.tsv``, tie-tolerant), whether the device returns the CPU engine's
ids and scores, and the pipeline's own per-stage timers (``search(trace=True)``) on the device.
Rounds alternate the engines (a shared machine's speed drifts)::

    python benchmarks/gpu.py --index DIR [--source MSMARCO_5K] [--out-dir FOLDER] [--rounds 3]
    python benchmarks/gpu.py --synthetic 100000 --index DIR      # plaid.demo's corpus, built first

``--source`` needs only the queries and the ground truth (``query_embeddings.f16.npy``,
``query_lens.npy``, ``exact_top100.tsv``, ``doc_ids.txt``), not the document vectors.
``--synthetic N`` builds ``--index`` (default Indexer) from N documents of
:func:`plaid.demo.synthetic_corpus` (dim 128) unless it exists, with 100 of its queries and
exhaustive MaxSim (on the GPU) as the ground truth. Writes ``gpu.json`` and ``gpu.md`` to
``--out-dir`` (default: print only; ``--tag`` names them ``gpu-TAG.*``). Without a CUDA device it
exits with a message (the CPU rows alone are ``benchmarks/threads.py``'s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _data import load_queries  # noqa: E402
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "msmarco-5k")
STAGES = ["centroid_scores", "stage1_candidates", "stage2_prune", "stage3_rank", "stage4_exact"]
SETTINGS = {  # name: (k, search overrides)
    "default k=10": (10, {}),
    "ndocs=1024 k=10": (10, {"ndocs": 1024}),
    "default k=100": (100, {}),
}


def load_truth(source: str) -> List[Dict[int, float]]:
    """Per query (file order of query_ids.txt): {document position: exact MaxSim} of its exact top 100."""
    with open(os.path.join(source, "doc_ids.txt")) as f:
        pos = {line.strip(): i for i, line in enumerate(f) if line.strip()}
    with open(os.path.join(source, "query_ids.txt")) as f:
        qids = [line.strip() for line in f if line.strip()]
    rows: Dict[str, Dict[int, float]] = {q: {} for q in qids}
    with open(os.path.join(source, "exact_top100.tsv")) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[0] in rows:
                rows[parts[0]][pos[parts[1]]] = float(parts[3])
    return [rows[q] for q in qids]


def synthetic(n: int, index: str) -> Tuple[List[np.ndarray], List[Dict[int, float]], float]:
    """(queries, ground truth as :func:`load_truth` gives it, build seconds or 0 when reused) of
    ``n`` documents of plaid.demo's corpus, indexed at ``index``."""
    import plaid
    from plaid.demo import synthetic_corpus, synthetic_queries

    docs = synthetic_corpus(n, dim=128, seed=0)
    queries = synthetic_queries(docs, 100, seed=1)
    build_s = 0.0
    if not os.path.exists(os.path.join(index, "manifest.json")):
        t = time.perf_counter()
        plaid.Indexer(show_progress=False).build(index, docs, overwrite=True)
        build_s = time.perf_counter() - t
    exact = plaid.maxsim(queries, docs, device="cuda")  # float32 [nq, n]
    top = np.argsort(-exact, axis=1, kind="stable")[:, :100]
    truth = [{int(d): float(exact[i, d]) for d in row} for i, row in enumerate(top)]
    return queries, truth, build_s


def recall10(truth: List[Dict[int, float]], ids: np.ndarray, tol: float = 1e-4) -> float:
    """Tie-tolerant recall@10: a returned document counts when its exact score is at least the
    10th exact score minus ``tol`` (a document outside the exact top 100 cannot)."""
    hits = 0
    for t, row in zip(truth, ids):
        kth = sorted(t.values(), reverse=True)[9] - tol
        hits += sum(1 for d in row[:10].tolist() if d in t and t[d] >= kth)
    return hits / (10 * len(ids))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--source", default=os.environ.get("PLAID_MSMARCO_5K", DEFAULT_SOURCE))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1000, help="queries in a batch call (the queries repeated)")
    ap.add_argument("--cpu-threads", type=int, default=0, help="the CPU engine's threads (0: every core)")
    ap.add_argument("--synthetic", type=int, default=0, help="documents of a synthetic corpus (0: --source's)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", default="", help="write gpu-TAG.json / gpu-TAG.md")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.cpu_threads < 0 or args.synthetic < 0:
        ap.error("--rounds and --batch must be at least 1, --cpu-threads and --synthetic at least 0")
    import torch

    import plaid

    if not torch.cuda.is_available():
        sys.exit("gpu.py: torch sees no CUDA device")
    threads = args.cpu_threads or os.cpu_count() or 1
    build_s = 0.0
    if args.synthetic:
        queries, truth, build_s = synthetic(args.synthetic, args.index)
    else:
        queries, truth = load_queries(args.source), load_truth(args.source)
    batch = (queries * (args.batch // len(queries) + 1))[: args.batch]
    t0 = time.perf_counter()
    gpu = plaid.Searcher(args.index, device="cuda", num_threads=threads)
    load_s = time.perf_counter() - t0
    engines = {"cpu 1 thread": plaid.Searcher(args.index, num_threads=1),
               f"cpu {threads} threads": plaid.Searcher(args.index, num_threads=threads),
               "cuda 1 thread": plaid.Searcher(args.index, device="cuda", num_threads=1),
               f"cuda {threads} threads": gpu}
    rows = []
    for name, (k, kw) in SETTINGS.items():
        for s in engines.values():  # warm: compiled kernels, CUDA context and allocator
            s.search(batch[:64], k=k, **kw)
            s.search(queries[0], k=k, **kw)
        single: Dict[str, List[float]] = {e: [] for e in engines}
        qps: Dict[str, List[float]] = {e: [] for e in engines}
        for _ in range(args.rounds):
            for e, s in engines.items():
                for q in queries:
                    t = time.perf_counter()
                    s.search(q, k=k, **kw)
                    single[e].append(time.perf_counter() - t)
                t = time.perf_counter()
                s.search(batch, k=k, **kw)
                qps[e].append(len(batch) / (time.perf_counter() - t))
        ref = engines["cpu 1 thread"].search(queries, k=k, **kw)
        traces = [engines["cuda 1 thread"].search(q, k=k, trace=True, **kw).traces[0] for q in queries]  # one at a time
        stage_ms = {st: 1e3 * statistics.median(t.timings.get(st, 0.0) for t in traces) for st in STAGES}
        for e, s in engines.items():
            res = ref if e == "cpu 1 thread" else s.search(queries, k=k, **kw)
            lat = np.array(single[e]) * 1e3
            rows.append({
                "setting": name, "engine": e,
                "single_ms_median": float(np.median(lat)), "single_ms_p90": float(np.percentile(lat, 90)),
                "batch_qps": float(np.median(qps[e])),
                "recall@10": recall10(truth, res.ids),
                "ids_equal_cpu": float((res.ids == ref.ids).mean()),
                "max_score_diff_cpu": float(np.abs(res.scores - ref.scores).max()),
                "stage_ms": stage_ms if e == "cuda 1 thread" else None,
            })
            print(json.dumps(rows[-1]), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "plaid": plaid.__version__, "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
           "index": os.path.abspath(args.index), "num_documents": plaid.Index(args.index).num_documents,
           "num_tokens": plaid.Index(args.index).num_tokens,
           "corpus": f"synthetic (plaid.demo, {args.synthetic} documents)" if args.synthetic else os.path.basename(
               os.path.normpath(args.source)), "build_s": build_s,
           "queries": len(queries), "batch": len(batch), "rounds": args.rounds, "cuda_load_s": load_s, "rows": rows}
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        name = f"gpu-{args.tag}" if args.tag else "gpu"
        with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
            f.write(report(out))
    print(report(out))
    return out


def report(out: dict) -> str:
    """The markdown table of :func:`main`'s result."""
    lines = [f"# Search on {out['gpu']} against the CPU engine ({out['date']})", "",
             f"{out['corpus']}: {out['num_documents']:,} documents, {out['num_tokens']:,} tokens, "
             f"{out['queries']} queries; torch {out['torch']}, "
             f"{out['cpu_cores']} CPU cores; batch = {out['batch']} queries in one call; medians over "
             f"{out['rounds']} rounds. Loading the index onto the device: {out['cuda_load_s']:.2f} s.", "",
             "| setting | engine | single query ms (median) | p90 | batch queries/s | recall@10 | ids = CPU's | max score diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['setting']} | {r['engine']} | {r['single_ms_median']:.2f} | {r['single_ms_p90']:.2f} | "
                     f"{r['batch_qps']:.0f} | {r['recall@10']:.3f} | {r['ids_equal_cpu']:.3f} | {r['max_score_diff_cpu']:.1e} |")
    lines += ["", "Per-stage time of one query on the device, queries one at a time (ms, median; the "
              "pipeline's own timers, host time around each stage's device work):", "",
              "| setting | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for r in out["rows"]:
        if r["stage_ms"]:
            lines.append(f"| {r['setting']} | " + " | ".join(f"{r['stage_ms'][s]:.3f}" for s in STAGES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

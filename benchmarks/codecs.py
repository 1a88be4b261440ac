"""Codec × bytes/token × recall@10 × nDCG@10 × latency × build time (issue 14's table).

For each corpus size and each plaid Indexer configuration (the presets, the former default PQ 32
bytes without rotation, the scalar codec, token pooling factors 1-4 with the default codec) it
builds the index once (cached under ``benchmarks/_work/codecs/``), then measures, with the default
search parameters at k=10:

* bytes/token of the whole index folder, per *input* token (a pooled index stores fewer vectors;
  dividing by the input tokens makes the figures comparable) and per stored vector;
* recall@10 against exhaustive MaxSim on the original (unpooled) vectors, tie-tolerant (1e-4);
* nDCG@10 against the qrels where the corpus has them (msmarco-5k), with exhaustive MaxSim's
  nDCG@10 on the same queries for reference (ir-measures);
* median single-query latency (one query per call), the configurations interleaved query by
  query in one process so that a slow phase of the shared machine falls on all of them alike;
* build time (one build per configuration, in this process; the machine's load average noted).

colbert-ai's 2- and 4-bit points are copied from ``benchmarks/results/results.json`` (the same
corpora and queries, measured by ``benchmarks/run.py`` on this machine: latency ratios across
the two files are only indicative), when present.

Usage::

    python benchmarks/codecs.py --sizes 5k              # ~10 minutes on 2 cores
    python benchmarks/codecs.py --sizes 50k --configs balanced,accurate,compact,pq32,pool2
    python benchmarks/codecs.py --report-only           # redo codecs.md from codecs.json

Results merge into ``benchmarks/results/codecs.json`` (rows of the same size and configuration
replaced) and ``codecs.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import corpora  # noqa: E402
from _data import load_bundle  # noqa: E402

RESULTS = os.path.join(HERE, "results")

#: name -> (plaid.Indexer keyword arguments, what it is)
CONFIGS: Dict[str, tuple] = {
    "compact": ({"preset": "compact"}, "preset compact: rotated PQ, 16 bytes"),
    "balanced": ({}, "default (preset balanced): rotated PQ, 34 bytes"),
    "accurate": ({"preset": "accurate"}, "preset accurate: rotated PQ, 64 bytes, search depth 4"),
    "pq32": ({"pq_m": 32, "pq_rotation": False}, "PQ 32 bytes, no rotation (the former default)"),
    "pq64": ({"pq_m": 64, "pq_rotation": False}, "PQ 64 bytes, no rotation"),
    "vpq32": ({"pq_m": 32}, "rotated PQ, 32 bytes"),
    "scalar2": ({"codec": "scalar", "nbits": 2}, "ColBERTv2 scalar, 2 bits/dim"),
    "pool2": ({"pool_factor": 2}, "default codec, token pooling factor 2"),
    "pool3": ({"pool_factor": 3}, "default codec, token pooling factor 3"),
    "pool4": ({"pool_factor": 4}, "default codec, token pooling factor 4"),
}
DEFAULT_CONFIGS = "compact,balanced,accurate,pq32,pq64,scalar2,pool2,pool3,pool4"


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if not f.startswith("."))


def _ndcg(ids: np.ndarray, scores: np.ndarray, bundle: str, k: int = 10) -> Optional[float]:
    """nDCG@k of a ranking against the bundle's qrels (None when it has none)."""
    qrels_path = os.path.join(bundle, "qrels", "test.tsv")
    if not (os.path.exists(qrels_path) and os.path.exists(os.path.join(bundle, "query_ids.txt"))):
        return None
    from plaid.evaluation import evaluate, load_qrels

    with open(os.path.join(bundle, "doc_ids.txt")) as f:
        doc_ids = [line.rstrip("\n") for line in f]
    with open(os.path.join(bundle, "query_ids.txt")) as f:
        query_ids = [line.rstrip("\n") for line in f]
    run = {q: {doc_ids[d]: float(s) for d, s in zip(ids[i], scores[i]) if d >= 0}
           for i, q in enumerate(query_ids)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate(run, load_qrels(qrels_path), [f"nDCG@{k}"])
    return float(res["metrics"][f"nDCG@{k}"])


def measure(size: str, names: List[str], work: str, rounds: int, log=print) -> List[dict]:
    import plaid

    bundle, meta, gt_ids, gt_scores = corpora.prepare(size, work=work, log=log)
    X, doclens, queries = load_bundle(bundle)
    recall = corpora.Recall(bundle, gt_ids, gt_scores)
    tokens = int(doclens.sum())
    exact_ndcg = _ndcg(gt_ids[:, :10], gt_scores[:, :10], bundle)
    rows, searchers = [], {}
    for name in names:
        kwargs, what = CONFIGS[name]
        path = os.path.join(work, "codecs", f"{size}-{name}")
        build_s = None
        info_path = path + ".build.json"
        if not os.path.exists(os.path.join(path, "manifest.json")):
            shutil.rmtree(path, ignore_errors=True)
            load = os.getloadavg()[0]
            t = time.perf_counter()
            plaid.Indexer(show_progress=False, **kwargs).build(path, plaid.Embeddings(X, doclens))
            build_s = time.perf_counter() - t
            with open(info_path, "w") as f:
                json.dump({"build_s": build_s, "loadavg_1min": load}, f)
            log(f"  {size} {name}: built in {build_s:.0f}s")
        with open(info_path) as f:
            binfo = json.load(f)
        index = plaid.Index(path)
        s = plaid.Searcher(path)
        res = s.search(queries, k=10)
        nbytes = _folder_bytes(path)
        rows.append({"corpus": size, "config": name, "what": what, "kwargs": kwargs,
                     "codec": index.codec, "pooling": index.manifest.get("pooling"),
                     "bytes_per_token": nbytes / tokens, "bytes_per_vector": nbytes / index.num_tokens,
                     "vectors_per_token": index.num_tokens / tokens, "index_bytes": nbytes,
                     "recall@10": recall(res.ids, 10), "ndcg@10": _ndcg(res.ids, res.scores, bundle),
                     "exact_ndcg@10": exact_ndcg, "build_s": binfo["build_s"],
                     "build_loadavg_1min": binfo.get("loadavg_1min")})
        searchers[name] = s
    # latency: single queries, the configurations interleaved (ABAB...), after one untimed pass
    for s in searchers.values():
        s.search(queries, k=10)
    times: Dict[str, List[float]] = {n: [] for n in searchers}
    order = list(searchers)
    for r in range(rounds):
        for q in queries:
            for n in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                searchers[n].search(q, k=10)
                times[n].append(time.perf_counter() - t)
    for row in rows:
        row["median_ms"] = 1e3 * float(np.median(times[row["config"]]))
        row["latency_queries"] = len(times[row["config"]])
        row["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        row["loadavg_1min_after"] = os.getloadavg()[0]
    return rows


def _colbert_rows(sizes: List[str]) -> List[dict]:
    """colbert-ai's k=10 default-setting rows of results.json at these sizes."""
    path = os.path.join(RESULTS, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        res = json.load(f)
    out = []
    for r in res.get("runs", []):
        if r.get("engine") != "colbert" or r["corpus"] not in sizes or "settings" not in r:
            continue
        for st in r["settings"]:
            if st["label"] in ("k10 nc1 th0.5 nd256", "k10 nc2 th0.45 nd1024"):
                out.append({"corpus": r["corpus"], "config": f"{r['key']} {st['label']}",
                            "bytes_per_token": r["build"]["bytes_per_token"], "recall@10": st["recall@10"],
                            "median_ms": st["median_ms"], "build_s": r["build"]["build_s"], "date": r.get("date")})
    return out


def _run_of(row: dict) -> str:
    """The day and minute a row was measured (rows of one run share it, to the minute or so)."""
    d = str(row.get("date") or "")
    return d[:16] if d else "–"


def write_report(data: dict, path: str) -> None:
    lines = ["# Codecs: bytes per token against recall, nDCG, latency and build time", "",
             "Generated by `python benchmarks/codecs.py` (see its docstring). Default search (k=10). "
             "Bytes/token: the whole index folder over the corpus's input tokens (a pooled index stores "
             "fewer vectors: the stored-vector share is in its own column). Recall@10 against exhaustive "
             "MaxSim on the original, unpooled vectors (tie-tolerant). nDCG@10: msmarco-5k's qrels "
             "(exhaustive MaxSim in the last column). Latency: median single-query milliseconds, the "
             "configurations of one run interleaved in one process (2 shared cores: compare rows of one run, "
             "the same `run` date). Build: one build per configuration on the same machine, its load average "
             "in parentheses.", ""]
    for size in sorted({r["corpus"] for r in data["rows"]}, key=corpora.parse_size):
        order = list(CONFIGS)
        rows = sorted((r for r in data["rows"] if r["corpus"] == size),
                      key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
        lines += [f"## {size}", "",
                  "| configuration | codec | B/token | vectors/token | recall@10 | nDCG@10 (exhaustive) | median ms | build s "
                  "| run |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["codec"]
            codec = (f"pq m={c['m']}" + (" rotated" if c.get("rotation") else "")) if c["name"] == "pq" \
                else f"scalar {c['nbits']}-bit"
            nd = "–" if r["ndcg@10"] is None else f"{r['ndcg@10']:.4f} ({r['exact_ndcg@10']:.4f})"
            load = "" if r.get("build_loadavg_1min") is None else f" ({r['build_loadavg_1min']:.1f})"
            lines.append(f"| {r['config']}: {r['what']} | {codec} | {r['bytes_per_token']:.2f} | "
                         f"{r['vectors_per_token']:.2f} | {r['recall@10']:.3f} | {nd} | {r['median_ms']:.2f} | "
                         f"{r['build_s']:.0f}{load} | {_run_of(r)} |")
        col = [r for r in data.get("colbert", []) if r["corpus"] == size]
        for r in col:
            lines.append(f"| colbert-ai {r['config']} (results.json) | ColBERTv2 scalar | "
                         f"{r['bytes_per_token']:.2f} | 1.00 | {r['recall@10']:.3f} | – | {r['median_ms']:.2f} | "
                         f"{r['build_s']:.0f} | {_run_of(r)} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5k")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"any of {', '.join(CONFIGS)}")
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds over all queries")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        try:
            corpora.parse_size(s)
        except ValueError as e:
            ap.error(str(e))
    out_json = os.path.join(args.results, "codecs.json")
    data = {"rows": [], "colbert": []}
    if os.path.exists(out_json):
        with open(out_json) as f:
            data = json.load(f)
    if not args.report_only:
        for size in sizes:
            new = measure(size, names, args.work, args.rounds)
            keep = {(r["corpus"], r["config"]) for r in new}
            data["rows"] = [r for r in data["rows"] if (r["corpus"], r["config"]) not in keep] + new
        data["colbert"] = _colbert_rows(sorted({r["corpus"] for r in data["rows"]}))
        os.makedirs(args.results, exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(data, f, indent=1)
    write_report(data, os.path.join(args.results, "codecs.md"))
    return data


if __name__ == "__main__":
    main()

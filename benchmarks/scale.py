"""plaid from 5k to a million documents (issue 15): build time and memory, search latency, recall
and memory against corpus size, with log-log fits.

For every corpus size and plaid configuration: a build in a child process (``/usr/bin/time -v``:
wall time and peak RSS; the Indexer's own phase timings), the index's bytes per token, the
assignment's accuracy on a sample of tokens (share given their exact nearest centroid; per-token
cost of the grouped and of the exact search, single-threaded), then search passes in child
processes: median / p95 single-query latency at k=10 with the default parameters over the first
``--latency-queries`` queries (200), recall@10 against the exact ground truth
(``benchmarks/corpora.py``), the search process' resident set after its queries (the index
memory-mapped) and its peak, and the structures the Searcher holds in memory (bytes per document
and per token). Search passes of all configurations of a size are interleaved (a shared machine's
slow phases fall on each alike); per setting the fastest pass is kept.

Results go to ``benchmarks/results/scale.{json,md}`` (merged: a size can be rerun alone) and the
plots ``scale_build.png`` (build time against documents, log-log, fitted slope per configuration)
and ``scale_latency.png`` (median latency against documents, same style). Ratios to the 50k
figures are computed from runs of the same ``--session`` only (latency drifts between sessions
on a shared machine).

Usage (the 1M corpus is ~20 GB float16 and its ground truth an hour or more: generate them once
with ``python benchmarks/corpora.py --sizes 1m``)::

    python benchmarks/scale.py --sizes 5k,50k,200k,1m                 # default and accurate codecs
    python benchmarks/scale.py --sizes 200k --configs peer --peer-timeout 7200   # colbert-ai, if installed
    python benchmarks/scale.py --report-only                           # table and plots again

``--configs`` names configurations of :data:`CONFIGS` (or gives JSON: ``{"key": {Indexer kwargs}}``).
Builds are redone unless ``--reuse-builds`` (a cached build of older code would mislead).
``--ndocs N`` searches the default configuration at k=10 with ``ndocs=N`` instead of its index's
default (768: a build made before the balanced preset recorded search depth 3, searched as a new
build would be); the other configurations keep their defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import corpora  # noqa: E402
import run  # noqa: E402

DEFAULT_RESULTS = os.path.join(HERE, "results")
#: The configurations: the default Indexer (preset balanced), the most accurate preset (rotated
#: PQ, 64 bytes a token at 128-d), and colbert-ai (2-bit residuals) as the peer.
CONFIGS: Dict[str, dict] = {
    "default": {"engine": "plaid", "key": "scale-default", "config": {}},
    "accurate": {"engine": "plaid", "key": "scale-accurate", "config": {"preset": "accurate"}},
    "peer": {"engine": "colbert", "key": "scale-colbert-nbits2", "config": {"nbits": 2}},
}
#: Search settings: k=10 with the engine's defaults (plaid's by k; colbert-ai's (1, 0.5, 256)).
SETTINGS = [{"label": "k10 default", "k": 10, "params": {}}]


def settings_for(ndocs: Optional[int]) -> List[dict]:
    """The search settings of a pass: the index's defaults, or k=10 with ``ndocs`` given (to search
    an index built before a preset's search depth changed as a new build of it would be)."""
    if ndocs is None:
        return SETTINGS
    return [{"label": f"k10 default, ndocs {ndocs}", "k": 10, "params": {"ndocs": int(ndocs)}}]
#: Tokens sampled per index to measure the assignment's accuracy and per-token cost.
ASSIGN_SAMPLE = 1 << 16


def log(msg: str) -> None:
    print(msg, flush=True)


# -- assignment accuracy (a child step) -------------------------------------------------------------
def measure_assignment(index: str, bundle: str, out: str, sample: int = ASSIGN_SAMPLE) -> dict:
    """Share of sampled tokens given their exact nearest centroid by the index's assigner (same
    centroids and seed as the build), the residual-norm cost of the others, and the per-token CPU
    cost of grouped and exact search (one thread). Written to ``out`` (JSON)."""
    import faiss

    import plaid
    from plaid.indexing.kmeans import CentroidAssigner, sample_token_ids

    faiss.omp_set_num_threads(1)
    idx = plaid.Index(index)
    cent = np.ascontiguousarray(idx._snap.centroids[: int(idx.manifest["build"].get("initial_centroids",
                                                                                 idx.num_centroids))])
    X = np.load(os.path.join(bundle, "doc_embeddings.f16.npy"), mmap_mode="r")
    ids = sample_token_ids(X.shape[0], sample, seed=12345)
    x = np.asarray(X[ids], np.float32)
    t = time.thread_time()
    grouped = CentroidAssigner(cent, seed=int(idx.manifest["build"].get("seed", 0)))
    build_s = time.thread_time() - t
    t = time.thread_time()
    a = grouped.assign(x)
    grouped_s = time.thread_time() - t
    exact = CentroidAssigner(cent, exact=True)
    n_exact = min(len(x), 1 << 14)  # exact search is the slow one: time it on a part
    t = time.thread_time()
    e = exact.assign(x[:n_exact])
    exact_s = time.thread_time() - t
    e_all = np.concatenate([e, exact.assign(x[n_exact:])]) if n_exact < len(x) else e
    r_approx = np.linalg.norm(x - cent[a], axis=1)
    r_exact = np.linalg.norm(x - cent[e_all], axis=1)
    res = {"num_centroids": int(len(cent)), "sample": int(len(x)), "grouped": not grouped.exact,
           "share_exact": float(np.mean(a == e_all)),
           "mean_residual_increase": float(np.mean(r_approx - r_exact)),
           "mean_relative_residual_increase_of_misassigned":
               float(np.mean((r_approx / np.maximum(r_exact, 1e-12) - 1)[a != e_all])) if (a != e_all).any() else 0.0,
           "distances_per_token": float(grouped.cost),
           "grouped_us_per_token": grouped_s / len(x) * 1e6, "exact_us_per_token": exact_s / n_exact * 1e6,
           "assigner_build_s": build_s}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def assignment_step(index: str, bundle: str, runs: str, key: str, threads: int) -> Optional[dict]:
    out = os.path.join(runs, f"{key}.assignment.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "assignment", "--index", index, "--bundle", bundle,
                        "--out", out], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        log(f"    assignment measurement failed: {p.stderr[-800:]}")
        return None
    with open(out) as f:
        return json.load(f)


# -- one size ---------------------------------------------------------------------------------------
def run_size(size: str, specs: List[dict], args) -> (List[dict], dict):
    log(f"== {size}")
    t = time.perf_counter()
    bundle, meta, gt_ids, gt_scores = corpora.prepare(size, args.work, args.source, 0, args.threads, log=log)
    gt_meta = {}
    gt_meta_path = os.path.join(args.work, "gt", os.path.basename(os.path.normpath(bundle)), "meta.json")
    if os.path.exists(gt_meta_path):
        with open(gt_meta_path) as f:
            gt_meta = json.load(f)
    corpus = {k: meta.get(k) for k in ("kind", "num_docs", "num_tokens", "num_queries", "generate_s")
              if meta.get(k) is not None}
    corpus["ground_truth_s"] = gt_meta.get("compute_s")
    log(f"  corpus ready ({time.perf_counter() - t:.0f}s): {meta['num_docs']} documents, {meta['num_tokens']} tokens")
    recall = corpora.Recall(bundle, gt_ids, gt_scores)
    ctxs = []
    for spec in specs:
        # --ndocs searches the default configuration as a new build of it would be; the others keep
        # their own defaults (accurate's depth 4, colbert-ai's (1, 0.5, 256))
        spec = dict(spec, settings=settings_for(args.ndocs if spec["key"] == CONFIGS["default"]["key"] else None))
        timeout = args.peer_timeout if spec["engine"] != "plaid" else None
        ctx = run.build_engine(spec, size, bundle, meta, args.work, args.threads, not args.reuse_builds, log,
                               timeout=timeout)
        if "spec" in ctx and spec["engine"] == "plaid":
            ctx["assignment"] = assignment_step(ctx["index"], bundle, ctx["runs"], spec["key"], args.threads)
            if ctx["assignment"]:
                a = ctx["assignment"]
                log(f"  {spec['key']}: assignment {100 * a['share_exact']:.2f}% exact over {a['sample']} tokens, "
                    f"{a['grouped_us_per_token']:.1f} vs {a['exact_us_per_token']:.1f} us/token exact (C={a['num_centroids']})")
        ctxs.append(ctx)
    live = [c for c in ctxs if "spec" in c]
    for rep in range(max(1, args.search_repeats)):
        for c in (live if rep % 2 == 0 else live[::-1]):
            run.search_pass(c, rep, meta, args.latency_queries, log, 0, args.batch_repeats)
    rows = []
    for c in ctxs:
        if "spec" not in c:
            rows.append(c)
            continue
        row = run.finish_engine(c, meta, recall)
        row["session"] = args.session
        row["assignment"] = c.get("assignment")
        if "settings" in row:
            extra = c["passes"][0][0]["search"].get("extra", {})
            row["search"]["rss_after_queries_mb"] = min(p[0]["search"].get("extra", {}).get("rss_after_queries_mb",
                                                                                         float("inf")) for p in c["passes"])
            row["search"]["rss_after_open_mb"] = extra.get("rss_after_open_mb")
            for k in ("rss_anon_after_queries_mb", "rss_file_after_queries_mb"):
                row["search"][k] = extra.get(k)
            row["search"]["memory"] = extra.get("memory")
            row["build"]["timings"] = (c["build"].get("build") or {}).get("timings")
        rows.append(row)
    return rows, corpus


# -- report -----------------------------------------------------------------------------------------
def fit_slope(xs, ys) -> Optional[float]:
    """Least-squares slope of log(y) against log(x) (None with fewer than two points)."""
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def series(results: dict, key: str, field) -> List[tuple]:
    """(documents, value, size label) of every size run of ``key``, by size."""
    out = []
    for r in results["runs"]:
        if r.get("key") == key and "settings" in r:
            v = field(r)
            if v is not None:
                out.append((results["corpora"][r["corpus"]]["num_docs"], v, r["corpus"]))
    return sorted(out)


def k10(r: dict) -> Optional[dict]:
    return next((s for s in r.get("settings", []) if s["k"] == 10), None)


def summary(results: dict) -> dict:
    """Per configuration: fitted slopes (build time, latency against documents) and the ratios of
    each size to 50k within one session."""
    out = {}
    for key in sorted({r["key"] for r in results["runs"] if "settings" in r}):
        b = series(results, key, lambda r: r["build"]["build_s"])
        lat = series(results, key, lambda r: (k10(r) or {}).get("median_ms"))
        item = {"build_slope": fit_slope([p[0] for p in b], [p[1] for p in b]),
                "latency_slope": fit_slope([p[0] for p in lat], [p[1] for p in lat]), "vs_50k": {}}
        runs = {r["corpus"]: r for r in results["runs"] if r.get("key") == key and "settings" in r}
        base = runs.get("50k")
        for size, r in runs.items():
            if base is None or size == "50k" or r.get("session") != base.get("session"):
                continue
            item["vs_50k"][size] = {"latency_ratio": (k10(r)["median_ms"] / k10(base)["median_ms"]),
                                    "build_ratio": r["build"]["build_s"] / base["build"]["build_s"],
                                    "documents_ratio": results["corpora"][size]["num_docs"]
                                    / results["corpora"]["50k"]["num_docs"]}
        out[key] = item
    return out


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def memory_rows(mem: dict) -> List[str]:
    N, T = mem["num_documents"], mem["num_tokens"]
    rows = []
    for name, b in sorted(mem["bytes"].items(), key=lambda kv: -kv[1]):
        rows.append(f"| {name} | {b / 2**20:.1f} | {b / N:.2f} | {b / T:.3f} |")
    tot = mem["total_bytes"]
    rows.append(f"| **total** | **{tot / 2**20:.1f}** | **{tot / N:.2f}** | **{tot / T:.3f}** |")
    return rows


def write_markdown(results: dict, path: str) -> None:
    m = results["machine"]
    lines = ["# plaid at scale: 5k to 1M documents", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['threads']} threads; "
             f"{results['date']}. Generated by `python benchmarks/scale.py` (raw figures: scale.json).", "",
             "Build: wall time and peak RSS of the build process; B/token: index folder / tokens. Assignment: "
             "share of 65,536 sampled tokens given their exact nearest centroid, and the per-token CPU cost of "
             "the grouped search against exact search (one thread). Search: k=10, default parameters, "
             "single queries over the first 200 queries (median, p95); recall@10 against exhaustive MaxSim "
             "(tie-tolerant) over all queries; RSS after queries: the search process' resident set after every "
             "query once, the warm-up and the timed passes (index memory-mapped); Searcher memory: the "
             "structures it holds in RAM (below).", "",
             "| corpus | config | docs | tokens | C | build s | build RSS MB | B/token | assign exact | assign us/token (exact) "
             "| R@10 | median ms | p95 ms | search RSS MB: all / anon / files (peak) | Searcher MB | load | session |",
             "|---" * 17 + "|"]
    for r in sorted(results["runs"], key=lambda r: (run.size_order(r["corpus"]), r["key"])):
        c = results["corpora"].get(r["corpus"], {})
        if "settings" not in r:
            lines.append(f"| {r['corpus']} | {r['key']} | {r.get('skipped') or 'failed: ' + str(r.get('failed'))} |"
                         + " |" * 14)
            continue
        s, b, a = k10(r) or {}, r["build"], r.get("assignment") or {}
        info = b.get("info") or {}
        mem = (r["search"].get("memory") or {}).get("total_bytes")
        lines.append(
            f"| {r['corpus']} | {r['key']} | {c.get('num_docs', 0):,} | {c.get('num_tokens', 0):,} | "
            f"{_f(info.get('num_centroids'), '{}')} | {b['build_s']:.1f} | {_f(b['peak_rss_mb'], '{:.0f}')} | "
            f"{b['bytes_per_token']:.1f} | {_f(a.get('share_exact'), '{:.4f}')} | "
            f"{_f(a.get('grouped_us_per_token'), '{:.1f}')} ({_f(a.get('exact_us_per_token'), '{:.1f}')}) | "
            f"{_f(s.get('recall@10'), '{:.3f}')} | {_f(s.get('median_ms'))} | {_f(s.get('p95_ms'))} | "
            f"{_f(r['search'].get('rss_after_queries_mb'), '{:.0f}')} / {_f(r['search'].get('rss_anon_after_queries_mb'), '{:.0f}')} / "
            f"{_f(r['search'].get('rss_file_after_queries_mb'), '{:.0f}')} ({_f(r['search'].get('peak_rss_mb'), '{:.0f}')}) | "
            f"{_f(mem / 2**20 if mem else None, '{:.0f}')} | {r['search']['loadavg_1min_before']:.1f} | {r.get('session', '')} |")
    lines.append("")
    given = [f"{r['corpus']} {r['key']} ({r.get('session', '')}): {k10(r)['label']}" for r in results["runs"]
             if "settings" in r and k10(r) and k10(r).get("label") != "k10 default"]
    if given:
        lines += ["Searched with parameters given (`--ndocs`) rather than the index's defaults: " + "; ".join(given)
                  + ".", ""]
    summ = results.get("summary", {})
    if summ:
        lines += ["## Growth", "", "Slopes: least-squares fit of log(value) against log(documents) over the sizes "
                  "measured. Ratios: a size against 50k measured in the same session.", "",
                  "| config | build-time slope | latency slope | ratios to 50k |", "|---|---|---|---|"]
        for key, it in summ.items():
            ratios = "; ".join(f"{size}: {v['documents_ratio']:.3g}x documents, build x{v['build_ratio']:.1f}, "
                               f"latency x{v['latency_ratio']:.2f}" for size, v in it["vs_50k"].items())
            lines.append(f"| {key} | {_f(it['build_slope'])} | {_f(it['latency_slope'])} | {ratios or '–'} |")
        lines.append("")
    phases = [(r["corpus"], r["key"], r["build"].get("timings")) for r in results["runs"]
              if "settings" in r and r["build"].get("timings")]
    if phases:
        names = ["sample_s", "kmeans_s", "codec_train_s", "encode_s", "ivf_s", "total_s"]
        lines += ["## Build phases (s)", "", "| corpus | config | " + " | ".join(n[:-2] for n in names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for size, key, t in sorted(phases, key=lambda x: (run.size_order(x[0]), x[1])):
            lines.append(f"| {size} | {key} | " + " | ".join(_f(t.get(n), "{:.1f}") for n in names) + " |")
        lines.append("")
    big = max((r for r in results["runs"] if "settings" in r and (r["search"].get("memory") or {}).get("bytes")),
              key=lambda r: (run.size_order(r["corpus"]), r["key"]), default=None)
    if big is not None:
        mem = big["search"]["memory"]
        lines += [f"## What the Searcher holds in memory ({big['corpus']}, {big['key']})", "",
                  f"{mem['num_documents']:,} documents, {mem['num_tokens']:,} tokens, {mem['num_centroids']:,} "
                  f"centroids, {mem['ivf_pairs']:,} inverted-file entries ({mem['ivf_pairs'] / mem['num_tokens']:.2f} "
                  "a token). The per-token arrays (centroid ids, residual codes, norms) stay memory-mapped: the RSS "
                  "counts the pages the queries touched.", "",
                  "| structure | MB | bytes / document | bytes / token |", "|---|---|---|---|"] + memory_rows(mem) + [""]
    corp = results.get("corpora", {})
    if corp:
        lines += ["## Corpora", "", "| corpus | documents | tokens | generated in s | ground truth s |", "|---|---|---|---|---|"]
        for size, c in sorted(corp.items(), key=lambda kv: run.size_order(kv[0])):
            lines.append(f"| {size} | {c.get('num_docs', 0):,} | {c.get('num_tokens', 0):,} | "
                         f"{_f(c.get('generate_s'), '{:.0f}')} | {_f(c.get('ground_truth_s'), '{:.0f}')} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plots(results: dict, outdir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    keys = sorted({r["key"] for r in results["runs"] if "settings" in r})
    written = []
    for name, field, ylabel, slope_key in [
            ("scale_build.png", lambda r: r["build"]["build_s"], "build time (s)", "build_slope"),
            ("scale_latency.png", lambda r: (k10(r) or {}).get("median_ms"), "median single-query latency, k=10 (ms)",
             "latency_slope")]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, key in enumerate(keys):
            pts = series(results, key, field)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            slope = results.get("summary", {}).get(key, {}).get(slope_key)
            ax.plot(xs, ys, "o-", color=plt.cm.tab10(i % 10),
                    label=f"{key}" + (f" (slope {slope:.2f})" if slope is not None else ""))
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
            if slope is not None and len(pts) >= 2:  # the fitted line
                c = np.polyfit(np.log(xs), np.log(ys), 1)
                fx = np.array([min(xs), max(xs)])
                ax.plot(fx, np.exp(np.polyval(c, np.log(fx))), "--", lw=0.8, color=plt.cm.tab10(i % 10))
        if name == "scale_build.png" and ax.lines:  # the linear reference through the smallest point
            ax.set_title("build time against corpus size (log-log; slope 1 = linear)")
        else:
            ax.set_title("search latency against corpus size (log-log)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("documents")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(outdir, name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    a_as = sub.add_parser("assignment", help="(internal) measure one index's assignment accuracy")
    a_as.add_argument("--index", required=True)
    a_as.add_argument("--bundle", required=True)
    a_as.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="5k,50k")
    ap.add_argument("--configs", default="default,accurate",
                    help="names of CONFIGS (default, accurate, peer) or JSON {key: {Indexer kwargs}}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE, help="msmarco-5k folder (or $PLAID_MSMARCO_5K)")
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--results", default=DEFAULT_RESULTS)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--search-repeats", type=int, default=1)
    ap.add_argument("--batch-repeats", type=int, default=1)
    ap.add_argument("--ndocs", type=int, default=None,
                    help="k=10 searches of the default configuration keep this many candidates (default: the "
                         "index's; 768 is the balanced preset's depth 3, for builds made before it recorded one)")
    ap.add_argument("--session", default=time.strftime("%Y-%m-%d"),
                    help="label of this series of runs: ratios to 50k use runs of one session")
    ap.add_argument("--peer-timeout", type=float, default=7200, help="seconds a peer's build may take")
    ap.add_argument("--reuse-builds", action="store_true", help="reuse cached builds of the same configuration")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "assignment":
        return measure_assignment(args.index, args.bundle, args.out)
    if args.ndocs is not None and args.ndocs < 10:
        ap.error(f"--ndocs must be at least k=10, got {args.ndocs}")
    os.makedirs(args.results, exist_ok=True)
    rpath = os.path.join(args.results, "scale.json")
    if args.report_only:
        with open(rpath) as f:
            results = json.load(f)
    else:
        os.environ["PLAID_MSMARCO_5K"] = args.source
        if args.configs.lstrip().startswith("{"):
            specs = [{"engine": "plaid", "key": k, "config": v} for k, v in json.loads(args.configs).items()]
        else:
            unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
            if unknown:
                ap.error(f"unknown configs {unknown}; choose among {sorted(CONFIGS)} or pass JSON")
            specs = [CONFIGS[c] for c in args.configs.split(",")]
        new_runs, corpora_meta = [], {}
        for size in args.sizes.split(","):
            rows, corpus = run_size(size, specs, args)
            new_runs += rows
            corpora_meta[size] = corpus
        results = run.merge_results(rpath, new_runs, corpora_meta, run.machine_info(args.threads))
        results["command"] = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    results["summary"] = summary(results)
    with open(rpath + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(rpath + ".tmp", rpath)
    write_markdown(results, os.path.join(args.results, "scale.md"))
    plots = write_plots(results, args.results)
    log(f"wrote {rpath}, scale.md" + (f", {len(plots)} plots" if plots else ""))
    return results


if __name__ == "__main__":
    main()

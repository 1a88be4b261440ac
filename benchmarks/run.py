"""The benchmark harness (issue 4): plaid vs exhaustive MaxSim, colbert-ai PLAID and fast-plaid.

One command::

    bash benchmarks/peers/install.sh          # once: peers into benchmarks/_work/venvs/ (optional)
    python benchmarks/run.py --sizes 5k,50k   # writes benchmarks/results/results.{json,md} + PNGs

For every corpus size and engine setting it measures, at a fixed thread count, on the same
embeddings: build time, bytes/token (index folder / tokens), peak RSS of the build and of the
search process (separate processes, ``/usr/bin/time -v``), median and p95 single-query latency,
batch throughput, recall@10 and recall@100 against exhaustive MaxSim (tie-tolerant, 1e-4), and
for plaid the floor (Q·Cᵀ plus exact MaxSim over only the final candidates) and a per-stage
profile. Search parameters are swept for recall–latency curves.

Corpora (``benchmarks/corpora.py``): ``5k`` is msmarco-5k itself (its 50 real queries); larger
sizes are grown from it by span mixing (the 50 real queries + 300 pseudo-queries), generated
under ``benchmarks/_work/`` with their ground truth on first use.

Engines run as separate processes through ``benchmarks/_runner.py``'s protocol: plaid and
exhaustive with this python (``benchmarks/plaid_runner.py``), colbert-ai and fast-plaid with
their own virtual environments (``benchmarks/peers/``). A peer that is not installed is skipped
and reported as such. Each engine's search runs ``--search-repeats`` times, in rounds that
interleave the engines (every engine once per round, the order alternating), keeping per setting
each engine's fastest pass: the machine may be shared, and a slow phase then falls on every engine
alike. Builds are cached (``benchmarks/_work/indexes/``, reused while the engine
config is unchanged; ``--rebuild`` forces them). Results merge into an existing results.json,
replacing the (size, engine) rows that were rerun, so parts can be rerun alone::

    python benchmarks/run.py --sizes 50k --engines colbert          # one engine at one size
    python benchmarks/run.py --report-only                          # redo the table and plots

Engines: plaid (several codecs), exhaustive, colbert, fastplaid. ``--quick`` runs one plaid codec
at two settings (the smoke test uses it on a tiny corpus).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

import corpora  # noqa: E402

REPO = os.path.dirname(HERE)
DEFAULT_RESULTS = os.path.join(HERE, "results")

# -- engine settings ------------------------------------------------------------------------------
# PLAID-family sweep at k=10: (ncells, centroid_score_threshold, ndocs), cheapest to most thorough.
PLAID_SWEEP = [(1, 0.5, 256), (2, 0.5, 256), (2, 0.45, 1024), (4, 0.4, 1024), (4, 0.4, 4096), (8, 0.3, 8192)]


def _plaid_setting(nc, th, nd, k=10, **extra):
    return {"label": f"k{k} nc{nc} th{th} nd{nd}", "k": k,
            "params": {"ncells": nc, "centroid_score_threshold": th, "ndocs": nd}, **extra}


def _k100(label="k100 default"):
    return {"label": label, "k": 100, "params": {}}


def engine_specs(quick: bool = False) -> List[dict]:
    """Every engine setting the harness knows. ``engine`` selects with --engines."""
    if quick:
        return [{"engine": "plaid", "key": "plaid-scalar2", "config": {"codec": "scalar", "nbits": 2},
                 "settings": [_plaid_setting(2, 0.5, 256, profile=True), _k100()]},
                {"engine": "exhaustive", "key": "exhaustive", "config": {},
                 "settings": [{"label": "k10 exact", "k": 10, "params": {}}, {"label": "k100 exact", "k": 100, "params": {}}]},
                {"engine": "colbert", "key": "colbert-nbits2", "config": {"nbits": 2}, "settings": [_plaid_setting(1, 0.5, 256)]},
                {"engine": "fastplaid", "key": "fastplaid-nbits4", "config": {"nbits": 4},
                 "settings": [{"label": "k10 probe8 full4096", "k": 10, "params": {}}]}]
    # (2, 0.5, 768): the balanced preset's default at k=10 since it records search depth 3
    full = [_plaid_setting(*s, profile=(s == (2, 0.5, 256))) for s in PLAID_SWEEP[:2]] + [_plaid_setting(2, 0.5, 768)] \
        + [_plaid_setting(*s) for s in PLAID_SWEEP[2:]] + [_k100()]
    some = [_plaid_setting(1, 0.5, 256), _plaid_setting(2, 0.5, 256), _plaid_setting(2, 0.45, 1024),
            _plaid_setting(4, 0.4, 4096), _k100()]
    return [
        # the presets (format 3: rotated PQ of 16 / 34 / 64 bytes at 128-d), the former default
        # (PQ 32 bytes, no rotation), token pooling with the default codec
        {"engine": "plaid", "key": "plaid-balanced", "config": {}, "settings": full},
        {"engine": "plaid", "key": "plaid-compact", "config": {"preset": "compact"}, "settings": some},
        {"engine": "plaid", "key": "plaid-accurate", "config": {"preset": "accurate"}, "settings": some},
        {"engine": "plaid", "key": "plaid-pool2", "config": {"pool_factor": 2}, "settings": some},
        {"engine": "plaid", "key": "plaid-pq32", "config": {"codec": "pq", "pq_m": 32, "pq_rotation": False},
         "settings": some},
        {"engine": "plaid", "key": "plaid-pq16", "config": {"codec": "pq", "pq_m": 16, "pq_rotation": False},
         "settings": some},
        {"engine": "plaid", "key": "plaid-pq64", "config": {"codec": "pq", "pq_m": 64, "pq_rotation": False},
         "settings": some},
        {"engine": "plaid", "key": "plaid-scalar2", "config": {"codec": "scalar", "nbits": 2}, "settings": some},
        {"engine": "exhaustive", "key": "exhaustive", "config": {},
         "settings": [{"label": "k10 exact", "k": 10, "params": {}}, {"label": "k100 exact", "k": 100, "params": {}}]},
        # colbert-ai: the same PLAID parameters; its own default at k=10 is (1, 0.5, 256)
        {"engine": "colbert", "key": "colbert-nbits2", "config": {"nbits": 2},
         "settings": [_plaid_setting(*s) for s in PLAID_SWEEP] + [_k100()]},
        # its 4-bit residuals: the colbert-ai setting that reaches recall@10 >= 0.95 (build it with --keys)
        {"engine": "colbert", "key": "colbert-nbits4", "config": {"nbits": 4},
         "settings": [_plaid_setting(*s) for s in PLAID_SWEEP] + [_k100()]},
        # fast-plaid: n_ivf_probe x n_full_scores; its default is (8, 4096)
        {"engine": "fastplaid", "key": "fastplaid-nbits4", "config": {"nbits": 4},
         "settings": [{"label": f"k10 probe{p} full{f}", "k": 10, "params": {"n_ivf_probe": p, "n_full_scores": f}}
                      for p, f in ((2, 256), (4, 512), (8, 1024), (8, 4096), (16, 4096), (32, 8192))]
         + [{"label": "k100 default", "k": 100, "params": {}}]},
    ]


# columns of the per-stage profile table, in pipeline order (older results may name other stages)
PROFILE_ORDER = ["centroid_scores_QCt", "stage1_candidates", "stage2_3_centroid_table", "stage2_surviving_centroids",
                 "stage2_pruned_maxsim", "stage2_3_document_cells", "stage2_prune", "stage2_3_approx_maxsim", "stage4_score_table", "stage4_adc",
                 "stage4_centroid_terms_and_norms", "stage4_maxsim_reduce", "top_n"]



def runner_command(engine: str, work: str) -> Optional[List[str]]:
    """argv prefix of an engine's runner, or None when its environment is not installed."""
    if engine in ("plaid", "exhaustive"):
        return [sys.executable, os.path.join(HERE, "plaid_runner.py"), "--engine", engine]
    venv = {"colbert": "colbert", "fastplaid": "fastplaid"}[engine]
    py = os.path.join(work, "venvs", venv, "bin", "python")
    if not os.path.exists(py):
        return None
    return [py, os.path.join(HERE, "peers", f"{venv}_runner.py")]


# -- processes ------------------------------------------------------------------------------------
def _time_v() -> List[str]:
    return ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []


def _peak_rss_mb(time_file: str, fallback: Optional[float]) -> Optional[float]:
    try:
        with open(time_file) as f:
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    return fallback


def run_step(argv: List[str], out: str, log, timeout: Optional[float] = None) -> Optional[dict]:
    """Run one runner step under /usr/bin/time -v; returns its JSON (with peak_rss_mb) or None."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for p in (out, out + ".ids.npz"):
        if os.path.exists(p):
            os.remove(p)
    with open(out + ".log", "w") as so, open(out + ".time", "w") as se:
        t = time.perf_counter()
        try:
            p = subprocess.run(_time_v() + argv + ["--out", out], stdout=so, stderr=se, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - t
    if rc != 0 or not os.path.exists(out):
        with open(out + ".time") as f:
            tail = f.read()[-1500:]
        log(f"    FAILED ({rc}) after {wall:.0f}s: {' '.join(argv[:3])} ...\n{tail}")
        return None
    with open(out) as f:
        res = json.load(f)
    res["process_wall_s"] = wall
    res["peak_rss_mb"] = _peak_rss_mb(out + ".time", res.get("peak_rss_self_mb"))
    return res


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".lock"):
                continue
            total += os.path.getsize(os.path.join(root, f))
    return total


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "python": platform.python_version(), "threads": threads}


# -- one (size, engine) ----------------------------------------------------------------------------
# An engine is built once (or its cached build reused), then searched in R passes; the harness
# interleaves the passes of all engines of a size (pass 1 of every engine, then pass 2, ...), so
# that a phase of a shared machine's load (its speed drifted 2.5x within minutes here) falls on
# every engine alike, and keeps per setting each engine's fastest pass.
def build_engine(spec: dict, size: str, bundle: str, meta: dict, work: str, threads: int, rebuild: bool,
                 log, timeout: Optional[float] = None) -> dict:
    """Build (or reuse) one engine's index. Returns a context for :func:`search_pass`, or a row
    with ``skipped`` / ``failed`` (a build past ``timeout`` seconds fails)."""
    engine, key = spec["engine"], spec["key"]
    cmd = runner_command(engine, work)
    if cmd is None:
        log(f"  {key}: skipped (not installed: bash benchmarks/peers/install.sh {engine})")
        return {"corpus": size, "engine": engine, "key": key, "skipped": "not installed"}
    runs = os.path.join(work, "runs", size)
    index = os.path.join(work, "indexes", size, key)
    cfg = json.dumps(spec["config"], sort_keys=True)
    common = ["--bundle", bundle, "--index", index, "--config", cfg, "--threads", str(threads)]
    if engine == "colbert":  # compile its C++ kernels once, outside every timing
        run_step(cmd + ["prepare", "--config", cfg, "--threads", str(threads)],
                 os.path.join(work, "runs", "colbert.prepare.json"), log)

    build_out = os.path.join(runs, f"{key}.build.json")
    build = None
    if not rebuild and os.path.exists(build_out) and os.path.isdir(index):
        with open(build_out) as f:
            old = json.load(f)
        if json.dumps(old.get("config"), sort_keys=True) == cfg:
            build = old
            build["peak_rss_mb"] = _peak_rss_mb(build_out + ".time", old.get("peak_rss_self_mb"))
            log(f"  {key}: reusing the build of {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(build_out)))}")
    if build is None:
        shutil.rmtree(index, ignore_errors=True)
        log(f"  {key}: building ...")
        build = run_step(cmd + ["build"] + common, build_out, log, timeout=timeout)
        if build is None:
            return {"corpus": size, "engine": engine, "key": key,
                    "failed": "build" + (f" (not finished within {timeout:.0f} s)" if timeout else "")}
        log(f"  {key}: built in {build['build_s']:.1f}s, peak RSS {build['peak_rss_mb']:.0f} MB")
    return {"spec": spec, "size": size, "cmd": cmd, "common": common, "build": build, "index": index,
            "bundle": bundle, "runs": runs, "passes": []}


def search_settings(spec: dict, tokens: int, latency_queries: int, batch_repeats: int, max_ndocs: int):
    """(settings, latency queries, batch repeats, passes cap) of one engine at a corpus size."""
    lq = latency_queries
    cap = None
    if spec["engine"] == "exhaustive" and tokens > 2_000_000:
        lq = min(lq or 10**9, 100)  # seconds per query at this size: time a subset, score all
    settings = [st for st in spec["settings"] if not max_ndocs or max(
        st["params"].get("ndocs", 0), st["params"].get("n_full_scores", 0)) <= max_ndocs]
    batch_repeats = batch_repeats or 2
    if spec["engine"] == "exhaustive" and tokens > 8_000_000:  # a second per query or more: one pass,
        lq, batch_repeats, cap = min(lq, 20), 1, 1  # k=10 only (k=100 costs the same; exact either way)
        settings = [s for s in settings if s["k"] == 10]
    return settings, lq, batch_repeats, cap


def search_pass(ctx: dict, rep: int, meta: dict, latency_queries: int, log, max_ndocs: int = 0,
                batch_repeats: int = 0) -> None:
    """One search process of an engine (pass ``rep``), appended to ``ctx["passes"]``."""
    if ctx.get("failed"):
        return
    spec = ctx["spec"]
    settings, lq, br, cap = search_settings(spec, int(meta["num_tokens"]), latency_queries, batch_repeats,
                                            max_ndocs)
    if cap is not None and rep >= cap:
        return
    out = _pass_path(ctx["runs"], spec["key"], rep)
    load0 = os.getloadavg()[0]
    res = run_step(ctx["cmd"] + ["search"] + ctx["common"] + ["--settings", json.dumps(settings),
                                                             "--latency-queries", str(lq),
                                                             "--batch-repeats", str(br)], out, log)
    if res is None:
        ctx["failed"] = "search"
        return
    res["loadavg"] = [load0, os.getloadavg()[0]]
    with open(out, "w") as f:  # the load too, so that --from-passes can reassemble this pass
        json.dump(res, f)
    ctx["passes"].append((res, np.load(out + ".ids.npz")))
    log(f"  {spec['key']}: search pass {rep + 1} done ({res['process_wall_s']:.0f}s)")


def _pass_path(runs: str, key: str, rep: int) -> str:
    """The result file of search pass ``rep`` (0-based) of engine ``key``."""
    return os.path.join(runs, f"{key}.search.json" if rep == 0 else f"{key}.search{rep + 1}.json")


def load_passes(ctx: dict, log) -> None:
    """The search passes of an engine already on disk (``runs/<size>/<key>.search*.json``, complete
    ones only), appended to ``ctx["passes"]``: results of an interrupted run, without searching again.
    Stops at the first missing pass, or one whose settings differ from the first's (an older run)."""
    key, rep = ctx["spec"]["key"], 0
    while os.path.exists(out := _pass_path(ctx["runs"], key, rep)) and os.path.exists(out + ".ids.npz"):
        with open(out) as f:
            res = json.load(f)
        labels = [st["label"] for st in res["search"]["settings"]]
        if ctx["passes"] and labels != [st["label"] for st in ctx["passes"][0][0]["search"]["settings"]]:
            break
        rep += 1
        res.setdefault("loadavg", [float("nan"), float("nan")])  # not recorded by older runs
        res.setdefault("peak_rss_mb", _peak_rss_mb(out + ".time", res.get("peak_rss_self_mb")))
        ctx["passes"].append((res, np.load(out + ".ids.npz")))
    if not ctx["passes"]:
        ctx["failed"] = "search"
    log(f"  {key}: {len(ctx['passes'])} search pass(es) read from disk")


def finish_engine(ctx: dict, meta: dict, recall) -> dict:
    """The result row of a built and searched engine."""
    spec, build = ctx["spec"], ctx["build"]
    engine, key, size = spec["engine"], spec["key"], ctx["size"]
    if ctx.get("failed") or not ctx["passes"]:
        return {"corpus": size, "engine": engine, "key": key, "failed": ctx.get("failed", "search")}
    tokens = int(meta["num_tokens"])
    if engine == "exhaustive":
        index_bytes = os.path.getsize(os.path.join(ctx["bundle"], "doc_embeddings.f16.npy"))
    else:
        index_bytes = folder_bytes(ctx["index"])
    passes = ctx["passes"]
    search = passes[0][0]
    ids = passes[0][1]
    extra = search["search"].get("extra", {})
    best_rows = []
    for i, st in enumerate(search["search"]["settings"]):
        cands = [p[0]["search"]["settings"][i] for p in passes]
        best_rows.append(dict(min(cands, key=lambda c: c["latency"]["median_ms"]),
                              all_medians_ms=[c["latency"]["median_ms"] for c in cands]))
    search["peak_rss_mb"] = max((p[0]["peak_rss_mb"] or 0) for p in passes) or None
    rows = []
    for st in best_rows:
        got = ids[st["label"]]
        row = {"label": st["label"], "k": st["k"], "params": st["params"],
               "median_ms": st["latency"]["median_ms"], "p95_ms": st["latency"]["p95_ms"],
               "latency_queries": st["latency"]["n"], "batch_qps": st["batch_qps"],
               "batch_ms_per_query": st["batch_ms_per_query"],
               "single_batch_top10_agreement": st["single_batch_top10_agreement"],
               "recall@10": recall(got, 10), "recall@100": recall(got, 100) if st["k"] >= 100 else None,
               "medians_of_passes_ms": st["all_medians_ms"]}
        if st["label"] in extra.get("floor", {}):
            row["floor"] = extra["floor"][st["label"]]
        rows.append(row)
    loads = [p[0]["loadavg"] for p in passes]
    return {"corpus": size, "engine": engine, "key": key, "config": spec["config"], "threads": search["threads"],
            "versions": build.get("versions", {}),
            "build": {"build_s": build["build_s"], "peak_rss_mb": build["peak_rss_mb"], "info": build.get("build"),
                      "loadavg_1min": build.get("loadavg_1min"),
                      "index_bytes": index_bytes, "bytes_per_token": index_bytes / tokens},
            "search": {"peak_rss_mb": search["peak_rss_mb"], "open_s": search["search"]["open_s"],
                       "num_queries": search["search"]["num_queries"], "passes": len(passes),
                       "loadavg_1min_before": min(l[0] for l in loads),
                       "extra": {k: v for k, v in extra.items() if k not in ("floor", "profile")},
                       "loadavg_1min_after": min(l[1] for l in loads)},
            "settings": rows, "profile": extra.get("profile", {}),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- report ---------------------------------------------------------------------------------------
def size_order(label: str) -> int:
    try:
        return corpora.parse_size(label)
    except ValueError:
        return 0


def best_at(run: dict, min_recall: float = 0.95, k: int = 10) -> Optional[dict]:
    """The fastest (median) setting of a run at k=``k`` with recall@10 >= min_recall, or None."""
    ok = [r for r in run.get("settings", []) if r["k"] == k and (r["recall@10"] or 0) >= min_recall]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def headline(results: dict, min_recall: float = 0.95) -> List[dict]:
    """Per corpus: each engine's fastest setting at recall@10 >= min_recall, and plaid's ratios."""
    out = []
    by_size: Dict[str, List[dict]] = {}
    for r in results["runs"]:
        if "settings" in r:
            by_size.setdefault(r["corpus"], []).append(r)
    for size in sorted(by_size, key=size_order):
        runs = by_size[size]
        best = {r["key"]: (r, best_at(r, min_recall)) for r in runs}
        plaid_keys = [k for k in best if k.startswith("plaid") and best[k][1]]
        pk = min(plaid_keys, key=lambda k: best[k][1]["median_ms"]) if plaid_keys else None
        for key, (r, b) in best.items():
            row = {"corpus": size, "key": key, "setting": b["label"] if b else None,
                   "median_ms": b["median_ms"] if b else None, "recall@10": b["recall@10"] if b else None,
                   "build_s": r["build"]["build_s"], "bytes_per_token": r["build"]["bytes_per_token"]}
            if pk and b and key != pk:
                pb = best[pk]
                row["plaid_key"] = pk
                row["plaid_latency_ratio"] = pb[1]["median_ms"] / b["median_ms"]  # < 1: plaid faster
                row["plaid_build_ratio"] = (pb[0]["build"]["build_s"] / r["build"]["build_s"]
                                            if r["build"]["build_s"] > 0.5 else None)
                row["plaid_size_ratio"] = pb[0]["build"]["bytes_per_token"] / r["build"]["bytes_per_token"]
            out.append(row)
    return out


def versus(results: dict) -> List[dict]:
    """plaid against each peer at equal or better recall@10: for each peer setting at k=10, the
    fastest plaid setting (any codec) whose recall@10 is at least the peer's."""
    out = []
    runs = [r for r in results["runs"] if "settings" in r]
    for size in sorted({r["corpus"] for r in runs}, key=size_order):
        plaid_pts = [(r["key"], s) for r in runs if r["corpus"] == size and r["engine"] == "plaid"
                     for s in r["settings"] if s["k"] == 10]
        for r in (r for r in runs if r["corpus"] == size and r["engine"] != "plaid"):
            for s in (s for s in r["settings"] if s["k"] == 10):
                ok = [(k, p) for k, p in plaid_pts if (p["recall@10"] or 0) >= (s["recall@10"] or 0) - 1e-9]
                row = {"corpus": size, "key": r["key"], "setting": s["label"], "recall@10": s["recall@10"],
                       "median_ms": s["median_ms"], "batch_qps": s["batch_qps"]}
                if ok:
                    k, p = min(ok, key=lambda x: x[1]["median_ms"])
                    row.update(plaid_key=k, plaid_setting=p["label"], plaid_recall=p["recall@10"],
                               plaid_median_ms=p["median_ms"], latency_ratio=p["median_ms"] / s["median_ms"],
                               batch_ratio=s["batch_qps"] / p["batch_qps"])
                out.append(row)
    return out


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def write_markdown(results: dict, path: str) -> None:
    m = results["machine"]
    lines = ["# Benchmark results", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; threads fixed at {m['threads']}; "
             f"python {m['python']}; {results['date']}. Generated by `python benchmarks/run.py` "
             "(see benchmarks/run.py); the raw figures are in results.json.", ""]
    lines += ["Corpora: " + "; ".join(f"{s}: {c['num_docs']:,} documents, {c['num_tokens']:,} tokens, "
                                      f"{c['num_queries']} queries ({c['kind']})"
                                      for s, c in sorted(results["corpora"].items(), key=lambda x: size_order(x[0]))), ""]
    # runs merged from several invocations: say when each was measured (a shared machine drifts,
    # so only figures of one date compare directly)
    when: dict = {}
    for r in results["runs"]:
        when.setdefault(r.get("date", "?")[:16], []).append(f"{r['corpus']} {r['key']}")
    if len(when) > 1:
        lines += ["Measured in " + str(len(when)) + " runs: " + "; ".join(
            f"{d}: {', '.join(sorted(keys, key=lambda k: (size_order(k.split()[0]), k)))}"
            for d, keys in sorted(when.items())) + ".", ""]
    hl = headline(results)
    if hl:
        lines += ["## At recall@10 ≥ 0.95: each engine's fastest setting", "",
                  "Ratios are plaid's best (fastest plaid setting at recall@10 ≥ 0.95) over the engine's "
                  "(< 1: plaid is faster / smaller).", "",
                  "| corpus | engine | setting | recall@10 | median ms | build s | B/token | plaid latency ratio | plaid build ratio | plaid size ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for h in hl:
            lines.append(f"| {h['corpus']} | {h['key']} | {h['setting'] or 'none reaches 0.95'} | {_f(h['recall@10'], '{:.3f}')} | "
                         f"{_f(h['median_ms'])} | {_f(h['build_s'], '{:.1f}')} | {_f(h['bytes_per_token'], '{:.1f}')} | "
                         f"{_f(h.get('plaid_latency_ratio'))} | {_f(h.get('plaid_build_ratio'))} | {_f(h.get('plaid_size_ratio'))} |")
        lines.append("")
    vs = versus(results)
    if vs:
        lines += ["## plaid against each peer at equal or better recall@10", "",
                  "For each setting of a peer (k=10): the fastest plaid setting, any codec, whose recall@10 is at "
                  "least the peer's. Latency ratio = plaid median / peer median; batch ratio = peer q/s / plaid "
                  "q/s (< 1: plaid is faster).", "",
                  "| corpus | peer | peer setting | peer R@10 | peer median ms | plaid | plaid R@10 | plaid median ms | latency ratio | batch ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v in vs:
            lines.append(f"| {v['corpus']} | {v['key']} | {v['setting']} | {_f(v['recall@10'], '{:.3f}')} | {v['median_ms']:.2f} | "
                         + (f"{v['plaid_key']} {v['plaid_setting']} | {v['plaid_recall']:.3f} | {v['plaid_median_ms']:.2f} | "
                            f"{v['latency_ratio']:.2f} | {v['batch_ratio']:.2f} |" if "plaid_key" in v else
                            "no plaid setting reaches this recall | | | | |"))
        lines.append("")
    lines += ["## All settings", "",
              "Latency: one query per call (median, p95); batch: all queries in one call (fast-plaid: "
              "`n_processes` = threads; colbert-ai has no batch API, so its batch figure is a loop of single "
              "queries). Floor (plaid): Q·Cᵀ + exact MaxSim of the final candidates only. RSS: peak of the "
              "build process and of the search process.", "",
              "Load: the machine's 1-minute load average before/after the search process (2 cores; it is "
              "shared, and latencies of multi-threaded code degrade sharply when it is above ~2).", "",
              "| corpus | engine | setting | R@10 | R@100 | median ms | p95 ms | batch q/s | floor ms | build s | B/token | build RSS MB | search RSS MB | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (size_order(r["corpus"]), r["key"])):
        if "settings" not in r:
            lines.append(f"| {r['corpus']} | {r['key']} | {r.get('skipped') or 'failed: ' + str(r.get('failed'))} |"
                         + " |" * 11)
            continue
        b, s = r["build"], r["search"]
        for i, st in enumerate(r["settings"]):
            lines.append(
                f"| {r['corpus']} | {r['key']} | {st['label']} | {_f(st['recall@10'], '{:.3f}')} | {_f(st['recall@100'], '{:.3f}')} | "
                f"{st['median_ms']:.2f} | {st['p95_ms']:.2f} | {st['batch_qps']:.1f} | "
                f"{_f(st.get('floor', {}).get('median_ms'))} | "
                + (f"{b['build_s']:.1f} | {b['bytes_per_token']:.1f} | {_f(b['peak_rss_mb'], '{:.0f}')} | {_f(s['peak_rss_mb'], '{:.0f}')} | "
                   f"{s['loadavg_1min_before']:.1f}/{s['loadavg_1min_after']:.1f} |"
                   if i == 0 else "| | | | |"))
    lines.append("")
    prof = [(r["corpus"], r["key"], lab, p) for r in results["runs"] for lab, p in r.get("profile", {}).items()]
    if prof:
        lines += ["## plaid: where single-query time goes", "",
                  "Median ms per query of each stage (share of the mean total in parentheses).", ""]
        names = sorted({n for *_, p in prof for n in p["median_ms"]} - {"other", "total"},
                       key=lambda n: (PROFILE_ORDER.index(n) if n in PROFILE_ORDER else len(PROFILE_ORDER), n))
        names += ["other", "total"]
        lines += ["| corpus | engine | setting | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
        for size, key, lab, p in sorted(prof, key=lambda x: (size_order(x[0]), x[1])):
            cells = [f"{p['median_ms'].get(n, 0):.2f}" + (f" ({100 * p['share_of_mean'][n]:.0f}%)"
                                                          if n in p["share_of_mean"] else "") for n in names]
            lines.append(f"| {size} | {key} | {lab} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plots(results: dict, outdir: str, log) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    runs = [r for r in results["runs"] if "settings" in r]
    sizes = sorted({r["corpus"] for r in runs}, key=size_order)
    if not runs:
        return []
    keys = sorted({r["key"] for r in runs})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
    written = []

    # recall@10 vs median latency, one panel per corpus size
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for r in (r for r in runs if r["corpus"] == size):
            pts = sorted((s["median_ms"], s["recall@10"]) for s in r["settings"] if s["k"] == 10)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[r["key"]], label=r["key"], ms=4)
        ax.set_xscale("log")
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{size} documents (k=10)")
        ax.set_xlabel("median single-query latency (ms, log)")
        ax.set_ylabel("recall@10 vs exhaustive")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:  # one legend for every engine of every panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend([handles[k] for k in sorted(handles)], sorted(handles), fontsize=7, loc="lower center",
               ncol=min(len(handles), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(handles) - 1) // 5), 1, 1))
    p = os.path.join(outdir, "recall_vs_latency.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # latency vs corpus size (log-log): fastest setting at recall@10 >= 0.95 (hollow: best recall below it)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key in keys:
        xs, ys, hollow = [], [], []
        for r in sorted((r for r in runs if r["key"] == key), key=lambda r: size_order(r["corpus"])):
            b = best_at(r)
            if b is None:
                k10 = [s for s in r["settings"] if s["k"] == 10]
                if not k10:
                    continue
                b = max(k10, key=lambda s: s["recall@10"] or 0)
                hollow.append(len(xs))
            xs.append(corpora.parse_size(r["corpus"]))
            ys.append(b["median_ms"])
        if xs:
            ax.plot(xs, ys, "o-", color=colors[key], label=key)
            for i in hollow:
                ax.plot(xs[i], ys[i], "o", mfc="white", color=colors[key])
    anchor = [l.get_ydata()[0] for l in ax.get_lines() if l.get_label().startswith("plaid")]
    if len(sizes) > 1 and anchor:  # a √N line through plaid's fastest point at the smallest size
        x0 = corpora.parse_size(sizes[0])
        xs = np.array([x0, corpora.parse_size(sizes[-1])], float)
        ax.plot(xs, min(anchor) * np.sqrt(xs / x0), "k:", lw=0.8, label="∝ √N from plaid's first point")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("documents")
    ax.set_ylabel("median latency (ms), fastest setting at recall@10 ≥ 0.95")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(outdir, "latency_vs_size.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # bytes/token and build time per engine, grouped by corpus size
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        bpt, bs = [], []
        for size in sizes:
            r = next((r for r in runs if r["key"] == key and r["corpus"] == size), None)
            bpt.append(r["build"]["bytes_per_token"] if r else 0)
            bs.append(r["build"]["build_s"] if r and r["engine"] != "exhaustive" else 0)  # exhaustive: no build
        x = np.arange(len(sizes)) + j * width
        a1.bar(x, bpt, width, color=colors[key], label=key)
        a2.bar(x, bs, width, color=colors[key], label=key)
    for ax, title in ((a1, "index bytes per token (exhaustive: the float16 vectors)"),
                      (a2, "build time (s, log; exhaustive has none)")):
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2)
        ax.set_xticklabels(sizes)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    a2.set_yscale("log")
    a1.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(outdir, "size_and_build.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def merge_results(path: str, new_runs: List[dict], corpora_meta: dict, machine: dict) -> dict:
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    done = {(r["corpus"], r["key"]) for r in new_runs}
    runs = [r for r in old.get("runs", []) if (r["corpus"], r["key"]) not in done] + new_runs
    return {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
            "corpora": {**old.get("corpora", {}), **corpora_meta}, "runs": runs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5k,50k", help="comma separated: 5k (msmarco-5k itself), 50k, 200k, 500k, ...")
    ap.add_argument("--engines", default="plaid,exhaustive,colbert,fastplaid")
    ap.add_argument("--keys", default="", help="only these engine keys (e.g. plaid-pq32,colbert-nbits2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE, help="msmarco-5k folder (or $PLAID_MSMARCO_5K)")
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="folder of results.json, results.md and the PNGs")
    ap.add_argument("--seed", type=int, default=0, help="corpus generator seed")
    ap.add_argument("--pseudo-queries", type=int, default=corpora.GROW_DEFAULTS["pseudo_queries"])
    ap.add_argument("--latency-queries", type=int, default=0, help="time only the first N queries (0: all)")
    ap.add_argument("--search-repeats", type=int, default=1,
                    help="search passes per engine, interleaved across engines (round 1 of every engine, "
                         "then round 2, ...); per setting the pass with the lowest median is kept")
    ap.add_argument("--max-ndocs", type=int, default=0,
                    help="skip settings that rerank more than N documents (ndocs / n_full_scores; 0: none)")
    ap.add_argument("--batch-repeats", type=int, default=2, help="batch passes per setting (best kept)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild indexes even when a cached build matches")
    ap.add_argument("--quick", action="store_true", help="one plaid codec, two settings (smoke test)")
    ap.add_argument("--build-only", action="store_true", help="build (or reuse) the indexes, measure no search")
    ap.add_argument("--from-passes", action="store_true",
                    help="search nothing: assemble the results from the passes already on disk (an interrupted run)")
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md and plots from results.json")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    for size in args.sizes.split(","):
        try:
            corpora.parse_size(size)
        except ValueError as e:
            ap.error(str(e))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    os.makedirs(args.results, exist_ok=True)
    rpath = os.path.join(args.results, "results.json")
    machine = machine_info(args.threads)
    if args.report_only:
        with open(rpath) as f:
            results = json.load(f)
        results["headline"], results["versus"] = headline(results), versus(results)
        with open(rpath, "w") as f:
            json.dump(results, f, indent=1)
    else:
        os.environ["PLAID_MSMARCO_5K"] = args.source
        engines = set(args.engines.split(","))
        keys = set(filter(None, args.keys.split(",")))
        specs = [s for s in engine_specs(args.quick) if s["engine"] in engines and (not keys or s["key"] in keys)]
        new_runs, corpora_meta = [], {}
        for size in args.sizes.split(","):
            log(f"== {size}")
            bundle, meta, gt_ids, gt_scores = corpora.prepare(size, args.work, args.source, args.seed, args.threads,
                                                              log=log, pseudo_queries=args.pseudo_queries)
            corpora_meta[size] = {k: meta.get(k) for k in ("kind", "num_docs", "num_tokens", "num_queries", "seed",
                                                           "span_min", "span_max", "query_span_min", "query_span_max",
                                                           "pseudo_queries", "noise", "generator_version")
                                  if meta.get(k) is not None}
            recall = corpora.Recall(bundle, gt_ids, gt_scores)
            ctxs = [build_engine(spec, size, bundle, meta, args.work, args.threads, args.rebuild, log)
                    for spec in specs]
            if args.build_only:
                continue
            live = [c for c in ctxs if "spec" in c]
            if args.from_passes:
                for c in live:
                    load_passes(c, log)
            else:
                for rep in range(max(1, args.search_repeats)):  # interleaved: every engine once per round,
                    for c in (live if rep % 2 == 0 else live[::-1]):  # in alternating order
                        search_pass(c, rep, meta, args.latency_queries, log, args.max_ndocs, args.batch_repeats)
            new_runs += [finish_engine(c, meta, recall) if "spec" in c else c for c in ctxs]
        if args.build_only:
            log("built; no search measured (--build-only)")
            return {}
        results = merge_results(rpath, new_runs, corpora_meta, machine)
        results["headline"], results["versus"] = headline(results), versus(results)
        with open(rpath + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(rpath + ".tmp", rpath)
    write_markdown(results, os.path.join(args.results, "results.md"))
    plots = [] if args.no_plots else write_plots(results, args.results, log)
    log(f"wrote {rpath}, results.md" + (f", {len(plots)} plots" if plots else ""))
    return results


if __name__ == "__main__":
    main()

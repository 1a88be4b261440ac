"""The engine-runner protocol shared by every engine of ``benchmarks/run.py``.

Each engine runs in processes of its own, with its own Python (peers live in their own virtual
environments under ``benchmarks/_work/venvs/``), so this module needs only the standard library
and numpy. A runner script defines an engine class and calls :func:`main`; the harness runs it as

    PY RUNNER build  --bundle DIR --index DIR --config JSON --threads N --out FILE.json
    PY RUNNER search --bundle DIR --index DIR --config JSON --settings JSON --threads N --out FILE.json
    PY RUNNER prepare --config JSON --threads N --out FILE.json   # one-off warm-up (e.g. compile kernels)

each under ``/usr/bin/time -v`` (peak RSS), build and search in separate processes.

An engine class has::

    name: str
    def __init__(self, config: dict, threads: int)
    def versions(self) -> dict
    def build(self, bundle: str, index: str) -> dict          # extra facts, may be {}
    def open(self, index: str, bundle: str) -> None
    def search(self, queries: list, k: int, params: dict) -> np.ndarray   # int64 [nq, k], -1 = none
    def search_batch(self, queries, k, params) -> np.ndarray  # optional, defaults to search
    batch_is_loop: bool                                        # optional: no batch API (see below)
    warm_cache: bool                                           # optional (default True): one untimed batch first
    def prepare(self) -> dict                                  # optional
    def extra(self, queries, settings) -> dict                 # optional, after the timed passes

``search`` mode: first the whole query list once, untimed, at the first setting (a memory-mapped
index is read from disk on first touch; ``warm_cache = False`` skips it), then for each setting
``{"label", "k", "params"}``: a warm-up on a few queries, then
one call per query on the first ``latency_queries`` queries (median / p95 wall time), then the
whole query list in one ``search_batch`` call (best of ``batch_repeats``; throughput), whose ids
are written to ``<out>.ids.npz`` under the setting's label for the harness to score recall.
An engine with ``batch_is_loop = True`` has no batch API: its batch figure is the single-query
pass itself (sum of the per-query times), not a second identical loop.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _data import load_bundle  # noqa: E402  (numpy only)


def set_thread_env(threads: int) -> None:
    """Thread caps for every runtime an engine may use; call before importing torch/faiss."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ[var] = str(threads)


def load_queries(bundle: str) -> List[np.ndarray]:
    return load_bundle(bundle)[2]


def _stats_ms(times: List[float]) -> dict:
    a = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean()),
            "n": int(len(a))}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_search(engine, bundle: str, index: str, settings: list, latency_queries: int, batch_repeats: int, out: str) -> dict:
    queries = load_queries(bundle)
    nlat = min(latency_queries, len(queries)) if latency_queries > 0 else len(queries)
    t = time.perf_counter()
    engine.open(index, bundle)
    open_s = time.perf_counter() - t
    batch_fn = getattr(engine, "search_batch", engine.search)
    rows, ids_out = [], {}
    if settings and getattr(engine, "warm_cache", True):
        # every query once, untimed, before the first setting: a memory-mapped index is read from
        # disk on first touch, and a few warm-up queries would leave that cost to the first setting
        batch_fn(queries, int(settings[0]["k"]), dict(settings[0].get("params", {})))
    for st in settings:
        k, params, label = int(st["k"]), dict(st.get("params", {})), st["label"]
        for q in queries[:10]:  # warm-up: caches, lazy loads, kernel dispatch
            engine.search([q], k, params)
        times, single_ids = [], []
        for q in queries[:nlat]:
            t0 = time.perf_counter()
            r = engine.search([q], k, params)
            times.append(time.perf_counter() - t0)
            single_ids.append(np.asarray(r)[0])
        if getattr(engine, "batch_is_loop", False) and nlat == len(queries):
            # no batch API: a batch is a loop of single queries, which the pass above just timed
            best, ids = float(sum(times)), np.stack([_pad_ids(s[None], k)[0] for s in single_ids])
        else:
            best, ids = None, None
            for _ in range(max(1, batch_repeats)):
                t0 = time.perf_counter()
                ids = np.asarray(batch_fn(queries, k, params))
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
        ids = _pad_ids(ids, k)
        agree = float(np.mean([np.array_equal(_pad_ids(s[None], k)[0, :10], ids[i, :10])
                               for i, s in enumerate(single_ids)]))
        ids_out[label] = ids
        rows.append({"label": label, "k": k, "params": params, "latency": _stats_ms(times),
                     "batch_s": best, "batch_qps": len(queries) / best, "batch_ms_per_query": best / len(queries) * 1e3,
                     "single_batch_top10_agreement": agree})
        print(f"  {engine.name} {label}: median {rows[-1]['latency']['median_ms']:.2f} ms, "
              f"p95 {rows[-1]['latency']['p95_ms']:.2f} ms, batch {rows[-1]['batch_qps']:.1f} q/s", flush=True)
    np.savez_compressed(out + ".ids.npz", **ids_out)
    result = {"open_s": open_s, "num_queries": len(queries), "latency_queries": nlat, "settings": rows}
    extra = getattr(engine, "extra", None)
    if extra is not None:
        result["extra"] = extra(queries, settings)
    return result


def _pad_ids(ids: np.ndarray, k: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.shape[1] < k:
        ids = np.concatenate([ids, np.full((len(ids), k - ids.shape[1]), -1, np.int64)], 1)
    return ids[:, :k]


def ids_from_lists(lists, k: int) -> np.ndarray:
    """[[id, ...], ...] of possibly unequal lengths -> int64 [nq, k] padded with -1."""
    out = np.full((len(lists), k), -1, np.int64)
    for i, row in enumerate(lists):
        row = list(row)[:k]
        out[i, : len(row)] = row
    return out


def main(engine_cls) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["build", "search", "prepare"])
    ap.add_argument("--bundle")
    ap.add_argument("--index")
    ap.add_argument("--config", default="{}")
    ap.add_argument("--settings", default="[]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-queries", type=int, default=0, help="0: all")
    ap.add_argument("--batch-repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    set_thread_env(a.threads)
    config = json.loads(a.config)
    engine = engine_cls(config, a.threads)
    res = {"engine": engine.name, "mode": a.mode, "config": config, "threads": a.threads,
           "python": platform.python_version(), "versions": engine.versions()}
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    if a.mode == "prepare":
        res["prepare"] = getattr(engine, "prepare", lambda: {})()
    elif a.mode == "build":
        t0 = time.perf_counter()
        info = engine.build(a.bundle, a.index) or {}
        res["build_s"] = time.perf_counter() - t0
        res["build"] = info
    else:
        res["search"] = run_search(engine, a.bundle, a.index, json.loads(a.settings), a.latency_queries, a.batch_repeats, a.out)
    res["wall_s"] = time.perf_counter() - t
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]  # the machine's load before/after (it may be shared)
    res["peak_rss_self_mb"] = _peak_rss_mb()
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.out + ".tmp", a.out)

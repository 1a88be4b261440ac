"""The engine benchmark (issue 2): plaid vs exhaustive MaxSim on msmarco-5k, in one run.

Reports, at a fixed thread count: build time, bytes/token (whole folder and per-token payload),
recall@10 (and recall@100 at k=100) against exhaustive MaxSim on the original vectors
(tie-tolerant, 1e-4), median single-query latency and batched throughput at k=10 and k=100.
The baseline is exhaustive MaxSim in torch on the same queries, measured two ways with the
documents preloaded in float32: "flat" (all tokens in one [T, d] matrix, one product per query,
per-document max by segment; the fastest exhaustive we know) and "padded" (documents padded to
[N, L, d], the common formulation). Ratios use the faster one.

``--big`` also builds from a memory-mapped float16 file of ~5M tokens (msmarco-5k repeated with
perturbation, written once under benchmarks/_work/) in a child process under ``/usr/bin/time -v``
and reports build time and peak RSS.

Usage::

    python benchmarks/engine.py [--data DIR] [--threads 2] [--codecs pq32,pq64,scalar2] [--big]
                                [--out benchmarks/results/engine.json]
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
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import plaid  # noqa: E402
from _data import DEFAULT_DATA, load_bundle, recall_at  # noqa: E402
from plaid.maxsim import segment_max  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CODECS = {"pq32": dict(codec="pq", pq_m=32), "pq64": dict(codec="pq", pq_m=64), "pq16": dict(codec="pq", pq_m=16),
          "scalar1": dict(codec="scalar", nbits=1), "scalar2": dict(codec="scalar", nbits=2),
          "scalar4": dict(codec="scalar", nbits=4)}


def median_latency_ms(fn, queries, repeats: int = 5) -> float:
    """Median over ``repeats`` passes of each query's wall time (one query per call)."""
    fn(queries[0])
    times = []
    for _ in range(repeats):
        for q in queries:
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def batch_ms_per_query(fn, queries, repeats: int = 3) -> float:
    """Best of ``repeats`` calls on the whole query list, per query."""
    fn(queries)
    best = min(_timed(fn, queries) for _ in range(repeats))
    return best / len(queries) * 1e3


def _timed(fn, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


class FlatExhaustive:
    """Exhaustive MaxSim with all document tokens preloaded as one float32 [T, d] tensor."""

    def __init__(self, X, doclens):
        self.D = torch.from_numpy(np.asarray(X, dtype=np.float32))
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(doclens)]).astype(np.int64))

    def scores(self, q):
        qs = q if isinstance(q, list) else [q]
        Q = torch.from_numpy(np.concatenate(qs))
        best = segment_max(self.D @ Q.T, self.offsets)  # [N, sum m]
        bounds = np.concatenate([[0], np.cumsum([len(x) for x in qs])])
        return np.stack([best[:, a:b].sum(1).numpy() for a, b in zip(bounds[:-1], bounds[1:])])

    def search(self, q, k=10):
        s = torch.from_numpy(self.scores(q))
        return torch.topk(s, k, dim=1).indices.numpy()


class PaddedExhaustive:
    """Exhaustive MaxSim with documents padded to float32 [N, L, d] (masked padding)."""

    def __init__(self, X, doclens):
        N, L, d = len(doclens), int(doclens.max()), X.shape[1]
        self.P = torch.zeros(N, L, d)
        offs = np.concatenate([[0], np.cumsum(doclens)])
        Xf = np.asarray(X, dtype=np.float32)
        for i in range(N):
            self.P[i, : doclens[i]] = torch.from_numpy(Xf[offs[i] : offs[i + 1]])
        self.mask = torch.arange(L)[None, :] < torch.from_numpy(doclens)[:, None]

    def search(self, q, k=10):
        qs = q if isinstance(q, list) else [q]
        out = []
        for x in qs:
            s = torch.einsum("md,nld->nlm", torch.from_numpy(x), self.P)
            s = s.masked_fill_(~self.mask[:, :, None], float("-inf")).amax(1).sum(1)
            out.append(torch.topk(s, k).indices.numpy())
        return np.stack(out)


def make_big(X, doclens, path: str, target_tokens: int, seed: int = 0):
    """Write ~target_tokens float16 tokens: msmarco-5k repeated, each copy jittered and renormalised."""
    if os.path.exists(path + ".npy") and os.path.exists(path + ".doclens.npy"):
        return
    rng = np.random.default_rng(seed)
    reps = -(-target_tokens // len(X))
    out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float16, shape=(reps * len(X), X.shape[1]))
    for r in range(reps):
        block = np.asarray(X, dtype=np.float32) + rng.normal(0, 0.02, X.shape).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[r * len(X) : (r + 1) * len(X)] = block.astype(np.float16)
    out.flush()
    del out
    os.replace(path + ".tmp.npy", path + ".npy")
    np.save(path + ".doclens.npy", np.tile(doclens, reps))


def big_build(X, doclens, threads: int) -> dict:
    work = os.path.join(HERE, "_work")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "big5m")
    make_big(X, doclens, base, 5_000_000)
    idx = os.path.join(work, "big5m-index")
    shutil.rmtree(idx, ignore_errors=True)
    code = (f"import numpy as np, torch, faiss, plaid; torch.set_num_threads({threads}); faiss.omp_set_num_threads({threads});"
            f"v = np.load({base + '.npy'!r}, mmap_mode='r'); d = np.load({base + '.doclens.npy'!r});"
            f"i = plaid.Indexer(show_progress=False).build({idx!r}, plaid.Embeddings(v, d));"
            f"print('INFO', i.num_tokens, i.num_centroids, i.bytes_per_token())")
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    info = [ln for ln in p.stdout.splitlines() if ln.startswith("INFO")][0].split()
    shutil.rmtree(idx, ignore_errors=True)
    return {"tokens": int(info[1]), "centroids": int(info[2]), "bytes_per_token": float(info[3]),
            "build_s": wall, "peak_rss_mb": rss_kb / 1024, "input_gb": os.path.getsize(base + ".npy") / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codecs", default="pq32,pq64,scalar2")
    ap.add_argument("--big", action="store_true", help="also build from a 5M-token memory-mapped file")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    X, doclens, queries = load_bundle(args.data)
    docs = plaid.Embeddings(X, doclens)
    exact = plaid.maxsim(queries, docs)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "threads": args.threads, "torch": torch.__version__, "faiss": faiss.__version__,
                           "numpy": np.__version__, "plaid": plaid.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")},
               "data": {"documents": len(doclens), "tokens": int(doclens.sum()), "queries": len(queries)}}

    flat, padded = FlatExhaustive(X, doclens), PaddedExhaustive(X, doclens)
    base = {}
    for name, ex in (("flat", flat), ("padded", padded)):
        base[name] = {
            "median_latency_ms": median_latency_ms(lambda q: ex.search(q, 10), queries, repeats=2),
            "batch_ms_per_query": batch_ms_per_query(lambda qs: ex.search(qs, 10), queries, repeats=2),
        }
    results["exhaustive"] = base
    fastest = min(b["median_latency_ms"] for b in base.values())
    print(f"exhaustive: flat {base['flat']['median_latency_ms']:.1f} ms/query ({base['flat']['batch_ms_per_query']:.1f} batched), "
          f"padded {base['padded']['median_latency_ms']:.1f} ms/query ({base['padded']['batch_ms_per_query']:.1f} batched)")

    tmp = tempfile.mkdtemp(prefix="plaid-bench-")
    results["plaid"] = {}
    try:
        for cname in args.codecs.split(","):
            path = os.path.join(tmp, cname)
            t = time.perf_counter()
            index = plaid.Indexer(show_progress=False, **CODECS[cname]).build(path, docs)
            build_s = time.perf_counter() - t
            s = plaid.Searcher(path)
            row = {"build_s": build_s, "bytes_per_token": index.bytes_per_token(),
                   "payload_bytes_per_token": index.payload_bytes_per_token()}
            for k in (10, 100):
                res = s.search(queries, k=k)
                row[f"k{k}"] = {
                    "recall@10": recall_at(exact, res.ids, 10),
                    **({"recall@100": recall_at(exact, res.ids, 100)} if k == 100 else {}),
                    "median_latency_ms": median_latency_ms(lambda q: s.search(q, k=k), queries),
                    "batch_ms_per_query": batch_ms_per_query(lambda qs: s.search(qs, k=k), queries),
                    "params": plaid.default_search_params(k, s.search_depth),
                }
            row["k10"]["speedup_vs_exhaustive"] = fastest / row["k10"]["median_latency_ms"]
            results["plaid"][cname] = row
            k10, k100 = row["k10"], row["k100"]
            print(f"{cname:8s} build {build_s:5.1f}s  {row['bytes_per_token']:5.1f} B/tok (payload {row['payload_bytes_per_token']})  "
                  f"k=10: recall@10 {k10['recall@10']:.3f}, {k10['median_latency_ms']:.2f} ms/q, "
                  f"{k10['batch_ms_per_query']:.2f} ms/q batched, {k10['speedup_vs_exhaustive']:.1f}x vs exhaustive  "
                  f"k=100: recall@100 {k100['recall@100']:.3f}, {k100['median_latency_ms']:.2f} ms/q, {k100['batch_ms_per_query']:.2f} batched",
                  flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.big:
        results["big_build"] = big_build(X, doclens, args.threads)
        b = results["big_build"]
        print(f"big build: {b['tokens']} tokens ({b['input_gb']:.2f} GB float16, memory-mapped), {b['centroids']} centroids, "
              f"{b['build_s']:.0f}s, peak RSS {b['peak_rss_mb']:.0f} MB, {b['bytes_per_token']:.1f} B/token")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

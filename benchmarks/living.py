"""Measurements of the living index (issue 5), on a ~50k-document index. Nothing is asserted.

* Peak RSS of a process that opens a memory-mapped Searcher and runs the 50 msmarco-5k queries,
  against the same with ``load_all=True`` (separate processes under ``/usr/bin/time -v``; a third
  process that only imports plaid and loads the queries gives the baseline), and the resident set
  at the end split into anonymous and file-backed pages (``/proc/self/status``): touched pages of
  a memory-mapped file count in RSS (with the kernel's fault-around, up to 64 KiB around each
  touched page when the file is in the page cache) but are clean page cache the kernel can drop.
  Each is run with the index's files in the page cache (warm) and evicted first (cold,
  ``posix_fadvise(DONTNEED)`` on the index's own files).
* Wall time of ``Index.delete`` of 1,000 documents (by external id, then by internal id) on the
  50k index and on a 5k one (the cost should follow what is deleted, not the index size), of
  ``compact()`` afterwards, and search latency before / after the deletes / after compaction.

The corpus is msmarco-5k repeated 10 times, each copy jittered (N(0, 0.02) per dimension) and
renormalised (``engine.make_big``), written once as float16 under ``benchmarks/_work/`` with the
index built from it (both reused by later runs; the folder is git-ignored).

Usage::

    python benchmarks/living.py [--data DIR] [--reps 10] [--threads 2] [--out benchmarks/_work/living.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import plaid  # noqa: E402
from _data import DEFAULT_DATA, load_bundle  # noqa: E402
from engine import make_big  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")

SEARCH_CHILD = """
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
import plaid
sys.path.insert(0, {here!r})
from _data import load_bundle
_, _, queries = load_bundle({data!r})
out = {{"after_import_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
mode = {mode!r}
if mode != "baseline":
    t = time.perf_counter()
    s = plaid.Searcher({index!r}, load_all=(mode == "load_all"))
    out["open_s"] = time.perf_counter() - t
    out["after_open_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    for q in queries:
        s.search(q, k=10)
    out["search_50_s"] = time.perf_counter() - t
    s.search(queries, k=10)
out["after_search_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open("/proc/self/status") as f:  # resident memory now, split: anonymous vs file-backed pages
    for ln in f:
        if ln.startswith(("RssAnon", "RssFile", "VmRSS")):
            out[ln.split(":")[0] + "_mb"] = int(ln.split()[1]) / 1024
print("RESULT", json.dumps(out))
"""


def drop_from_page_cache(path: str) -> None:
    """Ask the kernel to evict the index's files from the page cache (cold start; our files only)."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss(mode: str, index: str, data: str, threads: int) -> dict:
    code = SEARCH_CHILD.format(threads=threads, here=HERE, data=data, mode=mode, index=index)
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][0][7:])
    out["peak_rss_mb"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return out


def median_ms(searcher, queries) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        searcher.search(q, k=10)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def delete_and_compact(path: str, queries, rng, n: int = 1000) -> dict:
    """Delete n documents by external id, n more by internal id, then compact (on ``path``)."""
    index = plaid.Index(path)
    s = plaid.Searcher(path)
    out = {"documents": index.num_documents, "tokens": index.num_tokens,
           "search_median_ms_before": median_ms(s, queries)}
    pick = rng.choice(index.num_documents, size=2 * n, replace=False)
    names = index.external_ids(pick[:n]) if index.doc_ids is not None else None
    index = plaid.Index(path)  # a fresh handle: no cached external ids
    t = time.perf_counter()
    index.delete(names if names is not None else pick[:n].tolist())
    out["delete_by_external_id_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index.delete(pick[n:].tolist())
    out["delete_by_internal_id_s"] = time.perf_counter() - t
    t = time.perf_counter()
    s.reload()
    out["reload_s"] = time.perf_counter() - t
    out["search_median_ms_after_delete"] = median_ms(s, queries)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    t = time.perf_counter()
    index.compact(show_progress=False)
    out["compact_s"] = time.perf_counter() - t
    out["bytes_before_compact"] = size
    out["bytes_after_compact"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    s.reload()
    out["search_median_ms_after_compact"] = median_ms(s, queries)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--reps", type=int, default=10, help="copies of msmarco-5k (10: 50k documents)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(WORK, "living.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    os.makedirs(WORK, exist_ok=True)
    X, doclens, queries = load_bundle(args.data)
    with open(os.path.join(args.data, "doc_ids.txt")) as f:
        names5k = [ln.strip() for ln in f]
    base = os.path.join(WORK, f"living{args.reps}x")
    make_big(X, doclens, base, args.reps * len(X))
    vectors = np.load(base + ".npy", mmap_mode="r")
    big_doclens = np.load(base + ".doclens.npy")
    big_names = [f"{r}:{x}" for r in range(args.reps) for x in names5k]
    index_path = base + "-index"
    results = {"machine": {"threads": args.threads, "torch": torch.__version__, "numpy": np.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}}
    try:
        if plaid.Index(index_path).num_documents != len(big_doclens):
            raise plaid.IndexNotFoundError("stale")
        print(f"reusing {index_path}")
    except plaid.PlaidError:
        shutil.rmtree(index_path, ignore_errors=True)
        t = time.perf_counter()
        plaid.Indexer(show_progress=False).build(index_path, plaid.Embeddings(vectors, big_doclens), doc_ids=big_names)
        results["build_s"] = time.perf_counter() - t
        print(f"built {index_path} in {results['build_s']:.0f}s", flush=True)
    index = plaid.Index(index_path)
    arrays = index.manifest["arrays"]
    per_token = sum(e["bytes"] for n, e in arrays.items() if n.endswith(("_codes", "_residuals")))
    results["index"] = {"documents": index.num_documents, "tokens": index.num_tokens,
                        "centroids": index.num_centroids, "bytes": index.nbytes(),
                        "codes_and_residuals_bytes": per_token}
    print(f"index: {index.num_documents} documents, {index.num_tokens} tokens, {index.num_centroids} centroids, "
          f"{index.nbytes() / 2**20:.0f} MiB ({per_token / 2**20:.0f} MiB codes + residuals)", flush=True)

    results["rss"] = {}
    for mode, cache in (("baseline", "warm"), ("mmap", "warm"), ("load_all", "warm"), ("mmap", "cold"),
                        ("load_all", "cold"), ("mmap", "warm"), ("load_all", "warm")):
        if cache == "cold":
            drop_from_page_cache(index_path)
        r = peak_rss(mode, index_path, args.data, args.threads)
        results["rss"][f"{mode}-{cache}"] = r
        print(f"peak RSS {mode:9s} ({cache} page cache): {r['peak_rss_mb']:.0f} MB (at the end: anonymous {r['RssAnon_mb']:.0f} MB, "
              f"file-backed {r['RssFile_mb']:.0f} MB)"
              + (f", after open {r['after_open_mb']:.0f} MB, open {r['open_s']:.2f}s, 50 queries "
                 f"{r['search_50_s']:.2f}s" if mode != "baseline" else ""), flush=True)

    rng = np.random.default_rng(0)
    work = index_path + "-deletes"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(index_path, work)
    results["delete_50k"] = delete_and_compact(work, queries, rng)
    shutil.rmtree(work, ignore_errors=True)
    small = os.path.join(WORK, "living-5k-index")
    shutil.rmtree(small, ignore_errors=True)
    plaid.Indexer(show_progress=False).build(small, plaid.Embeddings(X, doclens), doc_ids=names5k)
    results["delete_5k"] = delete_and_compact(small, queries, rng)
    shutil.rmtree(small, ignore_errors=True)
    for name in ("delete_5k", "delete_50k"):
        d = results[name]
        print(f"{name}: delete 1000 by external id {d['delete_by_external_id_s'] * 1e3:.0f} ms, "
              f"by internal id {d['delete_by_internal_id_s'] * 1e3:.0f} ms, reload {d['reload_s'] * 1e3:.0f} ms, "
              f"compact {d['compact_s']:.2f}s ({d['bytes_before_compact'] / 2**20:.1f} -> "
              f"{d['bytes_after_compact'] / 2**20:.1f} MiB); search median {d['search_median_ms_before']:.2f} ms "
              f"before, {d['search_median_ms_after_delete']:.2f} after deleting, "
              f"{d['search_median_ms_after_compact']:.2f} after compact", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

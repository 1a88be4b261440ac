"""Before / after: single-query latency of two plaid revisions, measured in alternating processes.

An optimisation is judged against the code it replaces, on the same machine, the same index data
and the same queries, in the same period of time (a shared machine's speed drifts: 2.5x within
minutes was seen here). This script checks the base revision out into a git worktree under
``benchmarks/_work/versions/`` (the working tree stays as it is), builds one index per revision
and corpus with that revision's own code, then runs R rounds of single-query searches, each round
one process per revision (alternating which goes first), and reports every round's median
latency and the ratio of the best rounds::

    python benchmarks/versions.py --base fbdf2e1 --sizes 5k,50k --codecs pq32,pq64 --rounds 4
    python benchmarks/versions.py --base fbdf2e1 --sizes 1m --index INDEX   # both on one index

``--index``: an index already built (readable by both revisions) that both sides search instead
of building their own (a change of search code only, at a size whose build takes half an hour).

The new side is the working tree (uncommitted changes included). Corpora are those of
``benchmarks/run.py`` (``5k`` = msmarco-5k; larger ones are grown by ``benchmarks/corpora.py``);
searches use each revision's default parameters at k=10, 2 threads. Results go to
``benchmarks/_work/versions/results.json``; nothing under ``benchmarks/results/`` is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import corpora  # noqa: E402

CODECS = {"default": {}, "pq16": {"codec": "pq", "pq_m": 16}, "pq32": {"codec": "pq", "pq_m": 32},
          "pq64": {"codec": "pq", "pq_m": 64}, "scalar2": {"codec": "scalar", "nbits": 2}}

# Runs inside a revision's own code (PYTHONPATH = its tree): build, or time single queries.
CHILD = r"""
import json, sys, time
import numpy as np, torch
import plaid
sys.path.insert(0, {here!r})
from _data import load_bundle
torch.set_num_threads({threads})
mode, bundle, index, config, nq = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
assert plaid.__file__.startswith({code!r}), plaid.__file__
X, doclens, queries = load_bundle(bundle)
if mode == "build":
    t = time.perf_counter()
    plaid.Indexer(show_progress=False, **config).build(index, plaid.Embeddings(X, doclens), overwrite=True)
    print(json.dumps({{"build_s": time.perf_counter() - t}}))
else:
    queries = queries[:nq]
    s = plaid.Searcher(index)
    times = []
    with torch.inference_mode():
        for q in queries[:20]:
            s.search([q], k=10)
        for q in queries:
            t = time.perf_counter()
            s.search([q], k=10)
            times.append(time.perf_counter() - t)
    ids = s.search(queries, k=10).ids
    print(json.dumps({{"median_ms": float(np.median(times) * 1e3), "ids": ids.tolist()}}))
"""


def worktree(rev: str, root: str) -> str:
    """A checkout of ``rev`` (reused when present)."""
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = os.path.join(root, sha[:12])
    if not os.path.isdir(os.path.join(path, "plaid")):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-f", path, sha], check=True,
                       capture_output=True)
    return path


def base_worktree(ap: argparse.ArgumentParser, rev: str, work: str) -> str:
    """:func:`worktree` of ``rev`` under ``work/versions`` (``ap.error`` when it is not a commit)."""
    if subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet", rev + "^{commit}"],
                      capture_output=True).returncode != 0:
        ap.error(f"--base {rev!r} is not a commit of {REPO}")
    root = os.path.join(work, "versions")
    os.makedirs(root, exist_ok=True)
    return worktree(rev, root)


def child(code: str, args, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    script = CHILD.format(here=HERE, code=code, threads=threads)
    p = subprocess.run([sys.executable, "-c", script] + [str(a) for a in args], env=env, capture_output=True,
                       text=True, cwd="/")
    if p.returncode != 0:
        raise RuntimeError(f"{code}: {' '.join(map(str, args[:1]))} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--sizes", default="5k")
    ap.add_argument("--codecs", default="default",
                    help=f"comma separated, of {', '.join(CODECS)} (default: each revision's default Indexer)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--queries", type=int, default=200, help="queries timed per round (at most all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="keep an index already built under the work folder (same indexing code on both sides)")
    ap.add_argument("--index", help="an existing index of the (one) --sizes corpus that both revisions search")
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    args = ap.parse_args(argv)
    if args.index and (len(args.sizes.split(",")) != 1 or len(args.codecs.split(",")) != 1
                       or not os.path.exists(os.path.join(args.index, "manifest.json"))):
        ap.error("--index needs an index folder (with manifest.json) and one --sizes and --codecs")
    bad = [c for c in args.codecs.split(",") if c not in CODECS]
    if bad:
        ap.error(f"unknown codec(s) {', '.join(bad)}: choose from {', '.join(CODECS)}")
    args.work = os.path.abspath(args.work)
    root = os.path.join(args.work, "versions")
    sides = {"base": base_worktree(ap, args.base, args.work), "new": REPO}
    out = {"base": args.base, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads, "runs": []}
    for size in args.sizes.split(","):
        bundle, meta, gt_ids, gt_scores = corpora.prepare(size, args.work, args.source, threads=args.threads,
                                                          log=print)
        recall = corpora.Recall(bundle, gt_ids, gt_scores)
        for codec in args.codecs.split(","):
            cfg = json.dumps(CODECS[codec])
            idx = {s: (args.index and os.path.abspath(args.index)) or os.path.join(root, "indexes", f"{size}-{codec}-{s}") for s in sides}
            builds = {s: (float("nan") if args.index or args.reuse and os.path.exists(os.path.join(idx[s], "manifest.json"))
                          else child(code, ["build", bundle, idx[s], cfg, 0], args.threads)["build_s"])
                      for s, code in sides.items()}
            rounds = {s: [] for s in sides}
            ids = {}
            for r in range(args.rounds):
                for s in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    res = child(sides[s], ["search", bundle, idx[s], cfg, args.queries], args.threads)
                    rounds[s].append(res["median_ms"])
                    ids[s] = res["ids"]
            row = {"size": size, "codec": codec, "build_s": builds, "median_ms_per_round": rounds,
                   "recall@10": {s: recall(np.array(ids[s]), 10) for s in sides},
                   "ratio_best": min(rounds["new"]) / min(rounds["base"]),
                   "ratio_median": float(np.median(rounds["new"]) / np.median(rounds["base"]))}
            out["runs"].append(row)
            print(f"{size} {codec}: base {' '.join(f'{x:.2f}' for x in rounds['base'])} ms | new "
                  f"{' '.join(f'{x:.2f}' for x in rounds['new'])} ms | new/base best {row['ratio_best']:.2f}, "
                  f"median {row['ratio_median']:.2f} | recall@10 {row['recall@10']['base']:.3f} -> "
                  f"{row['recall@10']['new']:.3f} | build {builds['base']:.1f} -> {builds['new']:.1f} s", flush=True)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

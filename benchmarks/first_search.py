"""The first searches of a fresh process (warm numba cache), for two plaid revisions alternating.

A Searcher loads its compiled kernels in the background when it opens an index; this measures
what searches issued right after the open pay, in fresh processes, rounds alternating between the
base revision (a git worktree under ``benchmarks/_work/versions/``) and the working tree::

    python benchmarks/first_search.py --base a0141e1 --index DIR [--rounds 3]

Per process: ``single``: the first single query, the first 10, and the extra time of the first 100
single queries over 100 times their steady median (queries after the 60th); ``batch``: the extra
time of a first 1,000-query call over the same call repeated, with 1 and 2 threads. The numba
cache must be warm for both revisions (one unmeasured process of each runs first). Queries are
msmarco-5k's 50 (``--source``). Prints one JSON object; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import corpora  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import plaid
mode, index, source, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, {here!r})
from _data import load_queries
qs = load_queries(source)
s = plaid.Searcher(index, num_threads=threads)
out = {{}}
if mode == "single":
    lat = []
    for i in range(100):
        t = time.perf_counter(); s.search(qs[i % len(qs)], k=10); lat.append(time.perf_counter() - t)
    steady = float(np.median(lat[60:]))
    out = {{"first_s": lat[0], "first10_s": sum(lat[:10]), "extra100_s": sum(lat) - 100 * steady}}
else:
    batch = (qs * (1000 // len(qs) + 1))[:1000]
    t = time.perf_counter(); s.search(batch, k=10); first = time.perf_counter() - t
    t = time.perf_counter(); s.search(batch, k=10); again = time.perf_counter() - t
    out = {{"extra1000_s": first - again}}
print(json.dumps(out))
"""


def child(tree: str, mode: str, index: str, source: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    r = subprocess.run([sys.executable, "-c", CHILD.format(here=HERE), mode, index, source, str(threads)], env=env,
                       capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare with (a git commit)")
    ap.add_argument("--index", required=True, help="an index both revisions can read")
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    base = os.path.join(HERE, "_work", "versions", f"tree-{args.base}")
    if not os.path.exists(os.path.join(base, "plaid")):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "-f", base, args.base], check=True, capture_output=True)
    trees = {"base": base, "new": REPO}
    index, source = os.path.abspath(args.index), os.path.abspath(args.source)
    for tree in trees.values():  # compile / load each revision's kernels once (warm caches)
        child(tree, "single", index, source, 1)
    rows = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            row = child(trees[name], "single", index, source, 1)
            for th in (1, 2):
                row[f"extra1000_{th}t_s"] = child(trees[name], "batch", index, source, th)["extra1000_s"]
            rows[name].append(row)
            print(name, json.dumps(row), file=sys.stderr, flush=True)
    out = {name: {k: [float(np.min([x[k] for x in v])), float(np.max([x[k] for x in v]))] for k in v[0]}
           for name, v in rows.items()}
    out["rounds"] = rows
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

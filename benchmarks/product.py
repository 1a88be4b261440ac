"""The query-centroid product alone: the compiled kernel's time for a few shapes, one thread, and
against another revision in alternating processes (the same random data on both sides).

    python benchmarks/product.py                         # this tree
    python benchmarks/product.py --base 8e38f10 --rounds 4

Shapes are centroids x rows: 8,192 x 7 (a msmarco-5k query), 8,192 x 56 (a batch part of 8
queries), 65,536 x 7 (a query at a million documents), 65,536 x 56. Each process reports the best
of 7 x 10 calls per shape; the script prints the best and the median over rounds per side and
their ratios. A revision whose kernel takes float32 panels (before the int8 rows) is given the
same rows times their factors in float32. Nothing is written but the base revision's worktree
(under ``--work``, as ``versions.py`` makes it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from versions import REPO, base_worktree  # noqa: E402

import corpora  # noqa: E402

SHAPES = [(8192, 7), (8192, 56), (65536, 7), (65536, 56)]

CHILD = r"""
import inspect, json, sys, time
import numpy as np
import plaid
import plaid.search.kernels_cpu as K
assert plaid.__file__.startswith(sys.argv[1]), plaid.__file__
K.wait()
rng = np.random.default_rng(0)
res = {}
for C, m in %r:
    S = rng.integers(-127, 128, (C, 128)).astype(np.int8)
    f = (rng.random(C) / 100).astype(np.float32)
    Q = rng.standard_normal((m, 128)).astype(np.float32)
    out = np.empty((m, C), np.float32)
    if "factor" in inspect.signature(K.scores_product).parameters:
        P = K.product_panels(S)
        call = lambda: K.scores_product(Q, P, f, out, 0, C)
    else:
        P = K.product_panels(S.astype(np.float32) * f[:, None])
        call = lambda: K.scores_product(Q, P, out, 0, C)
    assert call(), "the compiled kernels are not in use"
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(10):
            call()
        best = min(best, (time.perf_counter() - t) / 10)
    res["%%dx%%d" %% (C, m)] = best * 1e3
print(json.dumps(res))
""" % (SHAPES,)


def child(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD, code], env=env, capture_output=True, text=True, cwd="/")
    if p.returncode != 0:
        raise RuntimeError(f"{code}: the product benchmark failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="git revision to compare this tree against")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    args = ap.parse_args(argv)
    args.work = os.path.abspath(args.work)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    sides = {"new": REPO}
    if args.base:
        sides = {"base": base_worktree(ap, args.base, args.work), "new": REPO}
    runs = {s: [] for s in sides}
    for r in range(args.rounds):
        for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[s].append(child(sides[s]))
    out = {}
    for C, m in SHAPES:
        key = f"{C}x{m}"
        row = {s: {"best_ms": min(x[key] for x in runs[s]), "median_ms": float(np.median([x[key] for x in runs[s]]))}
               for s in sides}
        line = f"{C:>6} centroids x {m:>2} rows: " + ", ".join(
            f"{s} {row[s]['best_ms']:.3f} ms (median {row[s]['median_ms']:.3f})" for s in sides)
        if "base" in row:
            row["ratio_best"] = row["new"]["best_ms"] / row["base"]["best_ms"]
            row["ratio_median"] = row["new"]["median_ms"] / row["base"]["median_ms"]
            line += f" | new/base best {row['ratio_best']:.2f}, median {row['ratio_median']:.2f}"
        print(line, flush=True)
        out[key] = row
    return out


if __name__ == "__main__":
    main()

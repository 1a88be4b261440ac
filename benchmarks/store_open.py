"""Before / after: the cost of opening a Searcher and of ``Index.verify()``, in alternating processes.

The store layer checks more than the code it replaced (every manifest field, every file's type
and header, the in-memory arrays at open; every token's centroid id and norm in ``verify``).
This script measures what that costs on one index, built once by the working tree's code (the
format is the same, so both revisions read it), with the base revision checked out as a git
worktree (see ``versions.py``). Each round runs one process per revision, alternating which goes
first; a process opens a Searcher ``--opens`` times (after one untimed open) and runs
``verify()`` ``--verifies`` times. Reported: each round's medians and the ratio of the best
rounds (new / base)::

    python benchmarks/store_open.py --base 763d098 --size 50k --rounds 3

Results go to ``benchmarks/_work/store_open.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import corpora  # noqa: E402
from versions import worktree  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np, torch
import plaid
torch.set_num_threads({threads})
assert plaid.__file__.startswith({code!r}), plaid.__file__
index, opens, verifies = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plaid.Searcher(index)
t_open = []
for _ in range(opens):
    t = time.perf_counter(); s = plaid.Searcher(index); t_open.append(time.perf_counter() - t); del s
t_verify = []
for _ in range(verifies):
    t = time.perf_counter(); problems = plaid.Index(index).verify(); t_verify.append(time.perf_counter() - t)
    assert problems == [], problems
print(json.dumps({{"open_s": float(np.median(t_open)), "verify_s": float(np.median(t_verify))}}))
"""


def run_child(code: str, index: str, opens: int, verifies: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", CHILD.format(code=code, threads=threads), index, str(opens),
                        str(verifies)], env=env, capture_output=True, text=True, cwd="/")
    if p.returncode != 0:
        raise RuntimeError(f"{code}: failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--size", default="50k", help="corpus: 5k (msmarco-5k) or a grown size such as 50k")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--verifies", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    args = ap.parse_args(argv)
    for name in ("rounds", "opens", "verifies", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    import numpy as np
    import plaid

    bundle = corpora.corpus_path(args.work, args.size, args.source) if args.size != "5k" else args.source
    if args.size != "5k" and not corpora.bundle_files_exist(bundle):
        corpora.grow(args.source, bundle, corpora.parse_size(args.size))
    index = os.path.join(args.work, "store_open", f"index-{args.size}")
    if not os.path.exists(os.path.join(index, "manifest.json")):
        sys.path.insert(0, HERE)
        from _data import load_bundle

        X, doclens, _ = load_bundle(bundle)
        plaid.Indexer(show_progress=False).build(index, plaid.Embeddings(X, doclens), overwrite=True)
    base = worktree(args.base, os.path.join(args.work, "versions"))
    sides = {"base": base, "new": REPO}
    rounds = []
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        row = {side: run_child(sides[side], index, args.opens, args.verifies, args.threads) for side in order}
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{s} open {row[s]['open_s'] * 1e3:.0f} ms verify {row[s]['verify_s']:.2f} s"
                                         for s in ("base", "new")), flush=True)
    best = {s: {k: min(r[s][k] for r in rounds) for k in ("open_s", "verify_s")} for s in sides}
    out = {"base": args.base, "size": args.size, "index": index, "rounds": rounds, "best": best,
           "ratio_open": best["new"]["open_s"] / best["base"]["open_s"],
           "ratio_verify": best["new"]["verify_s"] / best["base"]["verify_s"],
           "plaid_tokens": plaid.Index(index).num_tokens}
    print(f"best rounds: open {best['base']['open_s'] * 1e3:.0f} -> {best['new']['open_s'] * 1e3:.0f} ms "
          f"(x{out['ratio_open']:.2f}); verify {best['base']['verify_s']:.2f} -> {best['new']['verify_s']:.2f} s "
          f"(x{out['ratio_verify']:.2f})")
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "store_open.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

"""Fuzz plaid's index reader outside CI: many seeded damage trials, counts per outcome and damage kind.

    python benchmarks/fuzz.py --trials 2000 --seed 1

Uses the harness of ``tests/test_fuzz.py`` (``tests/fuzz_harness.py``): each trial damages a copy
of a small pristine index once and has a worker process search it, verify it and count its
documents under a watchdog. Exit status 1 when any trial failed (an exception other than a
PlaidError, a hang, a crash, or a wrong answer that verify() does not flag).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import fuzz_harness  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a trial may take before it counts as a hang")
    p.add_argument("--kinds", nargs="+", choices=fuzz_harness.DAMAGE_KINDS, default=None,
                   help="only these damage kinds (default: all)")
    p.add_argument("--engines", nargs="+", choices=["numpy", "torch"], default=["numpy", "numpy", "torch"],
                   help="engine of each trial, drawn from this list")
    p.add_argument("--max-failures", type=int, default=100, help="failures listed in full")
    p.add_argument("--json", metavar="FILE", default=None, help="also write counts and failures as JSON")
    args = p.parse_args(argv)
    if args.trials <= 0 or args.workers <= 0:
        p.error("--trials and --workers must be positive")
    summary = fuzz_harness.run_fuzz(args.trials, args.seed, workers=args.workers, timeout=args.timeout,
                                    engines=tuple(args.engines), kinds=args.kinds,
                                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(summary.report(max_failures=args.max_failures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trials": args.trials, "seed": args.seed, "seconds": summary.seconds,
                       "counts": dict(summary.counts), "by_kind": {k: dict(v) for k, v in summary.by_kind.items()},
                       "failures": summary.failures}, f, indent=1)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())

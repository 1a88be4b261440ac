"""Seeded fuzzing of the index folder: one random damage per trial, never a crash, hang or lie.

Each trial copies a small pristine index (build + add + delete: two segments, external ids, a
tombstone array), applies one random damage — a file truncated at a random length, 1-8 random
bytes flipped in a random file (often its ``.npy`` header), a file removed, or a random manifest
edit (a key deleted, a number changed, a value of another type, two array entries or their files
swapped, a list shortened, duplicated, reversed or extended) — and then, in a long-lived worker
process under a watchdog (``tests/fuzz_harness.py``), opens a Searcher, searches, calls
``Index.verify()`` and ``len(Index)``. Outcomes:

* ``plaid_error`` — a PlaidError was raised (searching, or opening the Index);
* ``verify_names_file`` — search answered differently from the pristine index, but ``verify()``
  raised a PlaidError or returned a problem naming the damaged file (any problem for damage to
  ``manifest.json``);
* ``correct`` — the same ids, scores and external ids as the pristine index, and the same length;
* failures: ``exception`` (anything but a PlaidError), ``hang`` (killed by the watchdog),
  ``crash`` (the worker died, e.g. of a signal; it is restarted), ``wrong_answer`` (a different
  answer that ``verify()`` does not flag).

``PLAID_FUZZ_TRIALS`` and ``PLAID_FUZZ_SEED`` change the number of trials and the seed;
``benchmarks/fuzz.py`` runs the same harness for longer, outside CI.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_harness  # noqa: E402

TRIALS = int(os.environ.get("PLAID_FUZZ_TRIALS", "300"))
SEED = int(os.environ.get("PLAID_FUZZ_SEED", "0"))


def test_fuzzed_index_folders_never_crash_hang_or_lie(tmp_path, capsys):
    summary = fuzz_harness.run_fuzz(TRIALS, SEED, workers=2, timeout=20.0, root=str(tmp_path))
    report = summary.report()
    with capsys.disabled():
        print("\n" + report)
    assert sum(summary.counts.values()) == TRIALS
    assert not summary.failures, report


def test_the_watchdog_catches_hangs_and_crashes():
    """The harness itself: a hang is killed and reported, a signal is reported, the worker restarts."""
    with fuzz_harness.Worker() as w:
        r = w.call([["sleep", 30]], timeout=2)
        assert r.status == "timeout" and r.step == 0
        r = w.call([["signal", 11]], timeout=60)
        assert r.status == "crash" and r.returncode == -11
        r = w.call([["len", "/nonexistent/plaid-index"]], timeout=60)
        assert r.status == "done" and not r.results[0]["ok"] and r.results[0]["plaid"]
        assert "IndexNotFoundError" in r.results[0]["mro"]
        assert w.starts == 3

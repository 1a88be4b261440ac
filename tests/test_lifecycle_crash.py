"""Crash safety: a writer process running add / delete / compact is SIGKILLed at random instants.

After every kill the index must open, pass ``verify()``, be at the generation the writer last
reported committed or the next one, and answer exactly like that committed state: same external
ids and deletions as the state computed independently from the seed, decompressed vectors that
belong to the right documents, searches that return only live documents and equal exhaustive
MaxSim where they must. Files a killed writer left behind are gone after the next commit.

``PLAID_CRASH_TRIALS`` sets the number of kills (default 50), ``PLAID_CRASH_SEED`` the seed,
``PLAID_CRASH_REPORT`` a path where the outcomes are written as JSON.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import plaid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lifecycle_crash_child as child  # noqa: E402
from lifecycle_util import assert_exact_topk, decompressed_docs, flat_maxsim, unreferenced_files  # noqa: E402

TRIALS = int(os.environ.get("PLAID_CRASH_TRIALS", "50"))
SEED = int(os.environ.get("PLAID_CRASH_SEED", "1234"))
MAX_DELAY_S = 0.25     # the kill comes uniformly within this long after the writer is forked
INJECT = ["before_rename", "after_rename", "mid_cleanup"]  # every 5th trial (see lifecycle_crash_child)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                                reason="the crash test forks writers and reads /proc (Linux)")


def _wait_dead(pid: int, timeout: float) -> None:
    """Wait until ``pid`` has exited (a zombie until the zygote reaps it), at most ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.005)


class Zygote:
    def __init__(self, path: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, child.__file__, "serve", path, str(SEED)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.p.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"crash-test zygote died (exit {self.p.wait()})")
        return line

    def go(self, log: str, inject: str) -> int:
        self.p.stdin.write(f"go {log} {inject}\n")
        self.p.stdin.flush()
        return int(self._read().split()[1])

    def reap(self, pid: int) -> str:
        self.p.stdin.write(f"reap {pid}\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()
            self.p.wait()


def check_committed_state(path: str, state: child.State, generation: int, rng: np.random.Generator) -> None:
    """The index at ``path`` answers exactly like ``state`` (generation ``generation``)."""
    index = plaid.Index(path)
    assert index.verify() == []
    assert index.generation == generation
    assert index.doc_ids == list(state.ids)
    assert index.deleted_ids().tolist() == sorted(state.deleted)
    live = np.array(state.live(), np.int64)
    assert len(index) == len(live) and index.num_documents == len(state.ids)

    s = plaid.Searcher(path)
    assert s.generation == generation
    # every live document's stored tokens are its own (no mix of generations or documents):
    # mean cosine with its original vectors >= 0.97 for in-distribution documents, 0.89-0.98 for
    # the rotated ones; <= 0.48 against another document's vectors
    X, offs = decompressed_docs(s, live)
    for j, d in enumerate(live):
        orig = child.doc_vectors(SEED, state.ids[d])
        dec = X[offs[j] : offs[j + 1]]
        assert dec.shape == orig.shape, f"document {state.ids[d]}: {dec.shape[0]} tokens, expected {orig.shape[0]}"
        assert np.einsum("ij,ij->i", dec, orig).mean() > 0.8, f"document {state.ids[d]}: vectors of another document"

    # self-queries: the default pipeline returns live documents only, each with its exact score
    # (stage 4); with ndocs large enough to keep every candidate, it is exhaustive search.
    # (Not "the default finds the exact top-1": with ~8 live documents per centroid here, many
    # documents tie on the centroid-level scores of stage 3, and some queries lose their best one.)
    probe = rng.choice(live, size=min(8, len(live)), replace=False)
    queries = [child.doc_vectors(SEED, state.ids[d])[:6] for d in probe]
    exact = flat_maxsim(queries, X, offs)
    res = s.search(queries, k=5)
    for qi in range(len(queries)):
        got = res.ids[qi][res.ids[qi] >= 0]
        assert np.isin(got, live).all(), "a deleted or unknown document was returned"
        np.testing.assert_allclose(res.scores[qi, : len(got)], exact[qi, np.searchsorted(live, got)], atol=1e-4)
    res = s.search(queries, k=5, ndocs=4 * len(live))
    assert_exact_topk(res.ids, res.scores, live, exact, 5)

    # a filtered search by external ids is exact within the subset
    sub = np.sort(rng.choice(live, size=min(120, len(live)), replace=False))
    res = s.search(queries, k=5, subset=[state.ids[d] for d in sub])
    assert_exact_topk(res.ids, res.scores, sub, exact[:, np.searchsorted(live, sub)], 5)


def test_crash_kill_at_random_instants(tmp_path):
    path = str(tmp_path / "index")
    child.build(path, SEED)
    states = child.expected_states(SEED, 64)
    rng = np.random.default_rng(SEED)
    outcomes = collections.Counter()
    killed_in = collections.Counter()
    committed_ops = collections.Counter()
    leftovers_seen = 0      # trials after which the killed writer had left files behind
    cleanups = 0            # trials whose writer committed in a folder holding such files
    had_leftovers = False
    generation = 0
    zygote = Zygote(path)
    try:
        for t in range(TRIALS):
            log = str(tmp_path / f"trial{t}.log")
            inject = INJECT[(t // 5) % len(INJECT)] if t % 5 == 4 else "none"
            pid = zygote.go(log, inject)
            if inject == "none":
                time.sleep(rng.uniform(0, MAX_DELAY_S))
            else:
                _wait_dead(pid, 60)  # it kills itself at the injected point
            os.kill(pid, signal.SIGKILL)
            how = zygote.reap(pid)
            lines = open(log).read().splitlines() if os.path.exists(log) else []
            errors = [ln for ln in lines if ln.startswith("error")]
            assert not errors, f"trial {t}: the writer failed: {errors}"
            assert how == "reaped signal 9", f"trial {t}: writer ended with {how}"
            commits = [int(ln.split()[1]) for ln in lines if ln.startswith("commit")]
            begun = [ln.split()[1:] for ln in lines if ln.startswith("begin")]
            last = commits[-1] if commits else generation
            assert commits == list(range(generation + 1, last + 1)), f"trial {t}: log {lines}"
            committed_ops.update(ln.split()[2] for ln in lines if ln.startswith("commit"))

            now = plaid.Index(path).generation
            in_flight = begun[-1][1] if begun and int(begun[-1][0]) == last + 1 else None
            assert now == last or (now == last + 1 and in_flight is not None), \
                f"trial {t}: generation {now}, the writer last reported {last} (log {lines})"
            outcomes["next" if now == last + 1 else "last"] += 1
            killed_in[f"{in_flight or 'between ops'}" + (f" ({inject})" if inject != "none" else "")] += 1
            if now >= len(states) - 1:
                states = child.expected_states(SEED, 2 * now)
            check_committed_state(path, states[now], now, rng)

            # a killed writer's files are gone once a later writer has completed a commit: after
            # every commit the writer logged, the folder held only what the manifest references
            leftovers = {ln.split()[1]: ln.split()[4:] for ln in lines if ln.startswith("commit")}
            assert all(not v for v in leftovers.values()), f"trial {t}: files survived a commit: {leftovers}"
            if commits and had_leftovers:
                cleanups += 1
            had_leftovers = bool(unreferenced_files(path))
            leftovers_seen += had_leftovers
            generation = now
    finally:
        zygote.close()

    # one more successful write removes whatever the last killed writer left
    index = plaid.Index(path)
    index.compact(show_progress=False)
    assert unreferenced_files(path) == []
    assert index.verify() == []
    check_committed_state(path, states[generation], generation + 1, rng)

    report = {"trials": TRIALS, "seed": SEED, "generations_committed": generation,
              "outcome": dict(outcomes), "killed_during": dict(killed_in),
              "ops_committed": dict(committed_ops), "trials_leaving_files": leftovers_seen,
              "commits_over_leftovers": cleanups,
              "final_documents": len(states[generation].ids), "final_live": len(states[generation].live()),
              "final_centroids": index.num_centroids}
    print("crash trials:", json.dumps(report))
    if os.environ.get("PLAID_CRASH_REPORT"):
        with open(os.environ["PLAID_CRASH_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    # the harness really crashed writers in the middle of their work, of every kind
    assert sum(v for k, v in killed_in.items() if not k.startswith("between")) >= TRIALS // 2
    assert all(committed_ops[op] > 0 for op in ("add", "delete", "compact")), committed_ops
    assert cleanups >= 1
    if TRIALS >= 15:
        assert outcomes["next"] >= 1  # the after_rename / mid_cleanup injections end there

"""Writer side of the crash test (``tests/test_lifecycle_crash.py``), and the op sequence both sides share.

The op sequence is a pure function of a seed: generation ``g`` of the index is always produced by
``plan(seed, g, state(g - 1))`` applied to ``state(g - 1)``, whether the writer that commits it is the
first to try or the third (earlier attempts were killed). So the parent can compute the expected
state of any generation without trusting anything the writer wrote.

Run as a script, this module is a *zygote*: ``python lifecycle_crash_child.py serve INDEX SEED`` imports
plaid once (torch takes seconds to import; a fork takes milliseconds), then forks one writer per
line ``go LOG INJECT`` read on stdin, prints the writer's pid, and on ``reap PID`` waits for it and
prints how it ended. Each writer is a separate process that runs add / delete / compact in a loop
until the parent SIGKILLs it. It appends ``begin <g> <op>`` to LOG before each mutation and
``commit <g> <op>`` after it returns, with the files then in the folder that the manifest does not reference (unbuffered
``os.write``: a SIGKILL loses nothing written).

INJECT places the kill at an instant random timing almost never hits, on the writer's first
commit: ``before_rename`` (every array file written and fsynced, the manifest's temporary file
too, the rename not done), ``after_rename`` (manifest switched, old files not yet removed),
``mid_cleanup`` (after removing the first unreferenced file). ``none``: only the parent's kill.
"""
from __future__ import annotations

import os
import signal
import sys
import zlib
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

DIM = 32
BASE_DOCS = 200
MIN_LIVE = 40


class State(NamedTuple):
    ids: Tuple[str, ...]        # external id of every internal id ever assigned (position = internal id)
    deleted: frozenset          # deleted internal ids

    def live(self) -> List[int]:
        return [i for i in range(len(self.ids)) if i not in self.deleted]


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(repr(key).encode())])


def _topics(seed: int) -> np.ndarray:
    t = _rng("topics", seed).normal(size=(24, DIM)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(_rng("rotation", seed).normal(size=(DIM, DIM)))
    return q.astype(np.float32)


def shifted_generation(g: int) -> bool:
    """Documents added at these generations are rotated away from the training distribution."""
    return g % 7 == 3


def doc_vectors(seed: int, ext_id: str) -> np.ndarray:
    """The float32 [n, DIM] unit vectors of the document called ``ext_id`` ("g<gen>-<i>")."""
    rng = _rng("doc", seed, ext_id)
    topics = _topics(seed)
    n = int(rng.integers(4, 17))
    mix = rng.choice(len(topics), size=2, replace=False)
    x = topics[rng.choice(mix, size=n)] + rng.normal(scale=0.6 / np.sqrt(DIM), size=(n, DIM)).astype(np.float32)
    if shifted_generation(int(ext_id[1:].split("-")[0])):
        x = x @ _rotation(seed)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def initial_state() -> State:
    return State(tuple(f"g0-{i}" for i in range(BASE_DOCS)), frozenset())


def plan(seed: int, g: int, state: State) -> dict:
    """The mutation that produces generation ``g`` (>= 1) from ``state`` (generation g - 1)."""
    rng = _rng("op", seed, g)
    u = rng.random()
    live = state.live()
    if u < 0.45 or len(live) <= MIN_LIVE + 5:
        n = int(rng.integers(5, 31))
        return {"op": "add", "ids": [f"g{g}-{i}" for i in range(n)]}
    if u < 0.85:
        n = int(rng.integers(1, min(16, len(live) - MIN_LIVE) + 1))
        pick = np.sort(rng.choice(len(live), size=n, replace=False))
        # half the time by external id, else by internal id (both are accepted)
        by_name = bool(rng.random() < 0.5)
        return {"op": "delete", "internal": [live[i] for i in pick], "by_name": by_name}
    return {"op": "compact"}


def apply(state: State, op: dict) -> State:
    if op["op"] == "add":
        return State(state.ids + tuple(op["ids"]), state.deleted)
    if op["op"] == "delete":
        return State(state.ids, state.deleted | frozenset(op["internal"]))
    return state


def expected_states(seed: int, upto: int) -> List[State]:
    """State of every generation 0..upto."""
    states = [initial_state()]
    for g in range(1, upto + 1):
        states.append(apply(states[-1], plan(seed, g, states[-1])))
    return states


def build(path: str, seed: int) -> None:
    import plaid

    st = initial_state()
    plaid.Indexer(pq_m=8, show_progress=False, seed=seed).build(
        path, [doc_vectors(seed, x) for x in st.ids], doc_ids=list(st.ids))


# -- writer process -------------------------------------------------------------------------------
def _install_injection(mode: str) -> None:
    """Make this process SIGKILL itself at a chosen point of its first commit."""
    if mode == "none":
        return
    import plaid.store.writer as store_writer

    real_replace, real_remove, real_unref = os.replace, os.unlink, store_writer.remove_superseded
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731

    def replace(src, dst, *a, **kw):
        if mode == "before_rename" and str(dst).endswith("manifest.json"):
            die()
        return real_replace(src, dst, *a, **kw)

    def remove_superseded(path, names):
        if mode == "after_rename":
            die()
        if mode == "mid_cleanup":
            def remove(p, *a, **kw):
                real_remove(p, *a, **kw)
                die()
            os.unlink = remove
        return real_unref(path, names)

    os.replace = replace
    store_writer.remove_superseded = remove_superseded


def writer(path: str, seed: int, log_path: str, inject: str) -> None:
    """Mutate the index forever (until killed), logging each begun and committed generation."""
    import plaid

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _install_injection(inject)
    index = plaid.Index(path)
    while True:
        index.refresh()
        g = index.generation + 1
        state = State(tuple(index.doc_ids), frozenset(index.deleted_ids().tolist()))
        op = plan(seed, g, state)
        os.write(log, f"begin {g} {op['op']}\n".encode())
        if op["op"] == "add":
            index.add([doc_vectors(seed, x) for x in op["ids"]], doc_ids=op["ids"], show_progress=False)
        elif op["op"] == "delete":
            ids = [state.ids[i] for i in op["internal"]] if op["by_name"] else op["internal"]
            assert index.delete(ids) == len(ids)
        else:
            index.compact(show_progress=False)
        assert index.generation == g, (index.generation, g)
        # once a commit has returned, the folder holds nothing its manifest does not reference
        # (in particular no file left by an earlier, killed writer)
        keep = {e["file"] for e in index.manifest["arrays"].values()} | {"manifest.json", ".plaid-lock", ".plaid-journal"}
        extra = sorted(set(os.listdir(path)) - keep)
        os.write(log, f"commit {g} {op['op']} {len(extra)} {' '.join(extra)}\n".encode())


def serve(path: str, seed: int) -> None:
    """Fork a writer per ``go`` command; report pids and how reaped writers ended."""
    import plaid  # noqa: F401  (imported once here; every forked writer inherits it)
    import plaid.indexing.index  # noqa: F401  (plaid loads its parts lazily: load them before forking)
    import plaid.search.searcher  # noqa: F401
    from plaid.codecs import _PQ

    encode = _PQ.get()  # the compiled PQ encoder: numba and its cached code, loaded before forking
    if encode is not None:
        encode(np.zeros((1, 8), np.float32), np.zeros((8, 1, 256), np.float32), np.zeros((1, 8), np.uint8))

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "go":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    writer(path, seed, cmd[1], cmd[2])
                except BaseException as e:  # an error in the writer is a test failure: report it
                    with open(cmd[1], "a") as f:
                        f.write(f"error {type(e).__name__}: {e}\n")
                    code = 3
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
            print(f"reaped {how}", flush=True)
        elif cmd[0] == "quit":
            return


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "build":
        build(sys.argv[2], int(sys.argv[3]))

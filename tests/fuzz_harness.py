"""Worker processes that run plaid on untrusted index folders under a watchdog, and the fuzz loop.

Shared by ``tests/test_hostile.py``, ``tests/test_fuzz.py``, ``tests/test_diskfull.py`` and
``benchmarks/fuzz.py`` (not a test module). Only plaid's public API is used.

* :class:`Worker` — a long-lived child interpreter (``python fuzz_harness.py --worker``) that
  imports plaid once and then executes requests read as JSON lines on stdin: a list of *steps*
  (build, search, verify, len, add, delete, compact, cli), each answered with its value or the
  exception it raised (type, MRO, message). Every request is guarded by a watchdog: a worker that
  does not answer in time is killed (``status == "timeout"``, with the step it was in), one that
  dies is reported with its return code (``status == "crash"``, negative = signal) and restarted
  on the next call. A hostile index can therefore neither hang nor kill the test process.
* Manifest/array helpers: :func:`read_manifest`, :func:`write_manifest`, :func:`npy_bytes`,
  :func:`put_array` (rewrite an array and update ``dtype``, ``shape``, ``bytes``, ``crc32``).
* The fuzz loop: :func:`apply_random_damage`, :func:`classify`, :func:`run_fuzz`.

The parent side imports numpy only; plaid (and torch) are imported in the workers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import random
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HARNESS = os.path.abspath(__file__)

# -- the corpora (generated identically in every process) ------------------------------------------
DIM = 32
K = 5
#: name -> (number of documents, seed, external-id prefix)
DOCSETS = {"base": (60, 7, "d"), "extra": (20, 9, "e"), "add": (8, 11, "a"), "rebuild": (40, 13, "r"),
           "big": (400, 17, "b"), "big2": (400, 19, "c")}
#: the pristine index deletes "d3" and the best hits of these queries (so that a lost tombstone shows)
PRISTINE_DELETE_TOP_OF = (4, 5, 3, 2)


def docset(name: str):
    """(documents, external ids) of a named synthetic document set (dim 32, 3-12 tokens)."""
    from plaid.demo import synthetic_corpus

    if name == "bad_dim":  # documents plaid refuses (wrong dimension): makes ``add`` fail cleanly
        n, seed, prefix = 4, 15, "bad"
        docs = synthetic_corpus(n, dim=DIM // 2, num_topics=4, seed=seed, min_len=3, max_len=6)
    else:
        n, seed, prefix = DOCSETS[name]
        docs = synthetic_corpus(n, dim=DIM, num_topics=8, seed=seed, min_len=3, max_len=12)
    return docs, [f"{prefix}{i}" for i in range(n)]


def queries():
    """6 queries drawn from the base and extra documents (both segments of the pristine index)."""
    from plaid.demo import synthetic_queries

    return synthetic_queries(docset("base")[0] + docset("extra")[0], 6, seed=8)


def make_pristine(path: str, codec: str = "pq") -> None:
    """Build (60 docs) + add (20 docs) + delete 3: generation 2, segments seg0 and seg1, one tombstone
    array holding "d3" and the best hits of two queries (other than the best hits of queries 0 and 1)."""
    import plaid

    kw = dict(show_progress=False, pq_m=16) if codec == "pq" else dict(show_progress=False, codec="scalar", nbits=2)
    docs, ids = docset("base")
    index = plaid.Indexer(**kw).build(path, docs, doc_ids=ids)
    docs, ids = docset("extra")
    index.add(docs, doc_ids=ids, show_progress=False)
    top = plaid.Searcher(path).search(queries(), k=1).ids[:, 0].tolist()
    victims = [3]
    for q in PRISTINE_DELETE_TOP_OF:
        if len(victims) < 3 and top[q] not in victims + top[:2]:
            victims.append(top[q])
    index.delete(victims)


# -- manifest and array helpers (parent side, no plaid) ------------------------------------------------
def read_manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def write_manifest(path: str, manifest, raw: Optional[str] = None) -> None:
    """Replace ``manifest.json`` (a new file, so a copy never shares it): the JSON of ``manifest``
    or the text ``raw``."""
    full = os.path.join(path, "manifest.json")
    if os.path.lexists(full):
        os.remove(full)
    with open(full, "w") as f:
        f.write(raw if raw is not None else json.dumps(manifest, indent=1))


def npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=allow_pickle)
    return buf.getvalue()


def file_crc32(full: str) -> int:
    with open(full, "rb") as f:
        return zlib.crc32(f.read())


def put_array(path: str, name: str, arr: np.ndarray, *, file: Optional[str] = None, allow_pickle: bool = False,
              manifest: Optional[dict] = None) -> dict:
    """Write ``arr`` as array ``name`` of the index at ``path`` (into its current file, or ``file``)
    and make the manifest entry match it: file, dtype, shape, bytes and CRC-32 of the whole file.
    Returns the (written) manifest."""
    m = manifest if manifest is not None else read_manifest(path)
    entry = m["arrays"][name]
    fname = file or entry["file"]
    full = fname if os.path.isabs(fname) else os.path.join(path, fname)
    data = npy_bytes(arr, allow_pickle=allow_pickle)
    if os.path.lexists(full) and not os.path.isdir(full):
        os.remove(full)  # a new inode: never write through a link shared with the pristine copy
    with open(full, "wb") as f:
        f.write(data)
    arr = np.asanyarray(arr)
    entry.update(file=fname, dtype=arr.dtype.str, shape=[int(s) for s in arr.shape], bytes=len(data),
                 crc32=zlib.crc32(data))
    write_manifest(path, m)
    return m


def load_array(path: str, name: str, manifest: Optional[dict] = None) -> np.ndarray:
    """An array of a pristine (trusted) index, read by the test itself."""
    m = manifest if manifest is not None else read_manifest(path)
    return np.load(os.path.join(path, m["arrays"][name]["file"]), allow_pickle=False)


# -- the worker (child side) ----------------------------------------------------------------------------
def _exc_info(e: BaseException) -> dict:
    import plaid

    return {"ok": False, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
            "plaid": isinstance(e, plaid.PlaidError), "msg": str(e)[:800],
            "tb": "".join(traceback.format_exception(type(e), e, e.__traceback__)[-4:])[-1500:]}


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


_QUERIES = None


def _step(step: list):
    import plaid

    global _QUERIES
    op = step[0]
    if op == "pristine":
        make_pristine(step[1], *(step[2:3]))
        return None
    if op == "query_bundle":  # ["query_bundle", dir]: the queries as a bundle for `plaid search`
        qs = queries()
        os.makedirs(step[1], exist_ok=True)
        np.save(os.path.join(step[1], "query_embeddings.f16.npy"), np.concatenate(qs).astype(np.float16))
        np.save(os.path.join(step[1], "query_lens.npy"), np.array([len(q) for q in qs], np.int64))
        with open(os.path.join(step[1], "query_ids.txt"), "w") as f:
            f.write("".join(f"q{i}\n" for i in range(len(qs))))
        return None
    if op == "build":  # ["build", path, docset, codec, overwrite]
        _, path, name, codec, overwrite = step
        kw = dict(show_progress=False, pq_m=16) if codec == "pq" else dict(show_progress=False, codec="scalar",
                                                                              nbits=2)
        docs, ids = docset(name)
        plaid.Indexer(**kw).build(path, docs, doc_ids=ids, overwrite=bool(overwrite))
        return None
    if op == "search":  # ["search", path, engine, k]
        _, path, engine, k = step
        if _QUERIES is None:
            _QUERIES = queries()
        res = plaid.Searcher(path, engine=engine).search(_QUERIES, k=k)
        return {"ids": res.ids.tolist(), "scores": res.scores.tolist(), "doc_ids": res.doc_ids()}
    if op == "verify":
        return list(plaid.Index(step[1]).verify())
    if op == "len":
        return len(plaid.Index(step[1]))
    if op == "delete":  # ["delete", path, ids]
        return plaid.Index(step[1]).delete(step[2])
    if op == "add":  # ["add", path, docset]
        docs, ids = docset(step[2])
        return plaid.Index(step[1]).add(docs, doc_ids=ids, show_progress=False).tolist()
    if op == "compact":
        plaid.Index(step[1]).compact(show_progress=False)
        return None
    if op == "cli":  # ["cli", argv]
        from plaid.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(step[1]))
        return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
    if op == "warm":  # ["warm"]: compile (or load from numba's cache) the token-pooling kernel, which an
        from plaid.indexing import pooling  # add to a pooled index runs, and the search kernels for both
        from plaid.search import kernels_cpu  # centroid-id widths (a planted int32 codes file makes a

        for dtype in (np.uint16, np.int32):  # search compile them): not within a case's time limit
            kernels_cpu.warmup(dtype)
        return pooling.backend()
    if op == "sleep":  # for testing the watchdog
        time.sleep(float(step[1]))
        return None
    if op == "signal":  # for testing crash detection
        os.kill(os.getpid(), int(step[1]))
        return None
    raise ValueError(f"unknown step {op!r}")


def serve() -> None:
    """Worker main loop: one JSON request per stdin line; replies as JSON lines on the original stdout."""
    import faulthandler
    import resource

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything plaid or a library prints goes to stderr, never into the protocol
    faulthandler.enable()
    limit = int(os.environ.get("PLAID_WORKER_MEMORY", str(6 << 30)))
    if limit > 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    warnings.simplefilter("ignore")
    import plaid  # noqa: F401
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out.write(json.dumps({"ready": os.getpid(), "plaid": plaid.__file__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        results = []
        for i, step in enumerate(req["steps"]):
            out.write(json.dumps({"step": i}) + "\n")
            t0 = time.perf_counter()
            try:
                results.append({"ok": True, "value": _jsonable(_step(step))})
            except Exception as e:  # noqa: BLE001 - everything is reported to the parent
                results.append(_exc_info(e))
            results[-1]["s"] = round(time.perf_counter() - t0, 4)
        out.write(json.dumps({"done": results}) + "\n")


# -- the worker (parent side) ---------------------------------------------------------------------------
@dataclass
class Reply:
    status: str  # "done", "timeout" or "crash"
    results: List[dict] = field(default_factory=list)
    step: int = -1  # the step running when the worker timed out or died
    returncode: Optional[int] = None
    stderr: str = ""

    def describe(self, steps=None) -> str:
        if self.status == "done":
            return "done"
        what = steps[self.step][0] if steps is not None and 0 <= self.step < len(steps) else f"step {self.step}"
        if self.status == "timeout":
            return f"HANG in {what} (killed by the watchdog)"
        return f"CRASH in {what} (worker exit code {self.returncode}{_signal_name(self.returncode)}; " \
               f"{crash_site(self.stderr)})"


def _signal_name(rc) -> str:
    import signal

    if isinstance(rc, int) and rc < 0:
        try:
            return f" = {signal.Signals(-rc).name}"
        except ValueError:
            pass
    return ""


def crash_site(stderr: str) -> str:
    """The faulthandler report of a dead worker, shortened: the error and the innermost frames."""
    lines = stderr.splitlines()
    fatal = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("Fatal Python error")), None)
    if fatal is None:
        return "stderr: " + " / ".join(x.strip() for x in lines[-3:])[-300:]
    current = next((i for i in range(fatal, len(lines)) if lines[i].startswith("Current thread")), fatal)
    frames = [x.strip() for x in lines[current:] if x.strip().startswith("File ")][:3]
    return lines[fatal].strip() + "; at " + " <- ".join(f.replace(REPO + os.sep, "") for f in frames)


class Worker:
    """A long-lived plaid worker process (see the module docstring)."""

    def __init__(self, threads: int = 1, startup_timeout: float = 180.0):
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self._buf = b""
        self._log = None
        self.plaid_file = None

    def _start(self) -> None:
        self.close()
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env["PYTHONFAULTHANDLER"] = "1"
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-u", HARNESS, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=REPO)
        self.starts += 1
        self._buf = b""
        msg = self._readline(time.monotonic() + self.startup_timeout)
        if not isinstance(msg, dict) or "ready" not in msg:
            err = self._stderr()
            self.close()
            raise RuntimeError(f"plaid worker did not start ({msg!r}): {err[-2000:]}")
        self.plaid_file = msg.get("plaid")

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - 8000))
        return self._log.read().decode("utf-8", "replace")

    def _readline(self, deadline: float):
        """The next JSON message; "timeout" or "eof"."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return "eof"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, steps: List[list], timeout: float = 20.0) -> Reply:
        """Run ``steps`` in the worker; at most ``timeout`` seconds for all of them."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write((json.dumps({"steps": steps}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the read below sees the worker's death
        deadline = time.monotonic() + timeout
        step = -1
        while True:
            msg = self._readline(deadline)
            if msg == "timeout":
                err = self._stderr()
                self.close()
                return Reply("timeout", step=step, stderr=err)
            if msg == "eof":
                rc = self.proc.wait()
                err = self._stderr()
                self.close()
                return Reply("crash", step=step, returncode=rc, stderr=err)
            if "step" in msg:
                step = msg["step"]
            elif "done" in msg:
                return Reply("done", results=msg["done"])

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def describe_result(r: dict) -> str:
    """One line: the value (shortened) or ``ExcType: message``."""
    if r.get("ok"):
        return f"ok {str(r.get('value'))[:120]}"
    return f"{r['type']}: {r['msg'][:240]}".replace("\n", " ")


def same_answer(a: dict, b: dict) -> bool:
    """Two ``search`` step values identical (ids, scores bit for bit, external ids)."""
    return a["ids"] == b["ids"] and a["doc_ids"] == b["doc_ids"] and \
        np.array_equal(np.asarray(a["scores"], np.float32), np.asarray(b["scores"], np.float32), equal_nan=False)


# -- fuzzing ---------------------------------------------------------------------------------------------
DAMAGE_KINDS = ["truncate", "flip", "delete_file", "manifest_delete_key", "manifest_number", "manifest_type",
                "manifest_swap_arrays", "manifest_swap_files", "manifest_list_edit"]
FAILURES = ("exception", "hang", "crash", "wrong_answer")


def _leaves(obj, path=()):
    """(path, value) of every leaf and container below ``obj`` (dicts and lists)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from _leaves(v, path + (k,))


def _get_parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def _huge_or_odd_number(rng: random.Random, v):
    v = int(v) if isinstance(v, (int, float)) and abs(v) < 1e18 else 1
    return rng.choice([v + 1, v - 1, -v, 0, v * 2, v // 2, -1, 10 ** 30, 2 ** 31, 2 ** 63, rng.randint(-10 ** 6, 10 ** 6),
                       float(v) + 0.5, float("nan"), float("inf")])


def _odd_type(rng: random.Random, v):
    choices = [str(v), None, [v], {"v": v}, True, False, "false", "", 1.5, -1]
    choices = [c for c in choices if type(c) is not type(v) or c != v]
    return rng.choice(choices)


def apply_random_damage(rng: random.Random, path: str, kind: Optional[str] = None):
    """Damage the index copy at ``path`` once; returns (kind, damaged file name, detail)."""
    kind = kind or rng.choice(DAMAGE_KINDS)
    m = read_manifest(path)
    arrays = m["arrays"]
    files = sorted({e["file"] for e in arrays.values()}) + ["manifest.json"]
    if kind in ("truncate", "flip", "delete_file"):
        fname = rng.choice(files if kind != "delete_file" else files[:-1])
        full = os.path.join(path, fname)
        data = bytearray(open(full, "rb").read())
        os.remove(full)  # write a new inode
        if kind == "truncate":
            n = rng.choice([0, rng.randrange(0, min(len(data), 129)), rng.randrange(0, len(data))])
            data = data[:n]
            detail = f"truncated to {n} of {len(data)} bytes"
        elif kind == "flip":
            region = len(data) if rng.random() < 0.7 else min(len(data), 128)  # often the .npy header
            where = sorted(rng.sample(range(region), min(region, rng.randint(1, 8))))
            for i in where:
                data[i] ^= rng.randint(1, 255)
            detail = f"flipped bytes at {where}"
        else:
            return kind, fname, "removed"
        with open(full, "wb") as f:
            f.write(bytes(data))
        return kind, fname, detail
    # manifest edits
    if kind == "manifest_delete_key":
        keys = [(p, v) for p, v in _leaves(m) if isinstance(_get_parent(m, p), dict)]
        p, _ = rng.choice(keys)
        del _get_parent(m, p)[p[-1]]
        detail = f"deleted {list(p)}"
    elif kind == "manifest_number":
        nums = [(p, v) for p, v in _leaves(m) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        p, v = rng.choice(nums)
        nv = _huge_or_odd_number(rng, v)
        _get_parent(m, p)[p[-1]] = nv
        detail = f"{list(p)}: {v!r} -> {nv!r}"
    elif kind == "manifest_type":
        p, v = rng.choice(list(_leaves(m)))
        nv = _odd_type(rng, v)
        _get_parent(m, p)[p[-1]] = nv
        detail = f"{list(p)}: {type(v).__name__} -> {nv!r}"[:200]
    elif kind == "manifest_swap_arrays":
        a, b = rng.sample(sorted(arrays), 2)
        arrays[a], arrays[b] = arrays[b], arrays[a]
        detail = f"swapped entries {a} <-> {b}"
    elif kind == "manifest_swap_files":
        a, b = rng.sample(sorted(arrays), 2)
        for key in ("file", "bytes", "crc32") if rng.random() < 0.5 else ("file",):
            arrays[a][key], arrays[b][key] = arrays[b][key], arrays[a][key]
        detail = f"swapped files of {a} <-> {b}"
    else:  # manifest_list_edit
        lists = [(p, v) for p, v in _leaves(m) if isinstance(v, list) and v]
        p, v = rng.choice(lists)
        how = rng.choice(["drop", "duplicate", "reverse", "append"])
        if how == "drop":
            v.pop(rng.randrange(len(v)))
        elif how == "duplicate":
            v.insert(rng.randrange(len(v) + 1), json.loads(json.dumps(rng.choice(v))))
        elif how == "reverse":
            v.reverse()
        else:
            v.append(rng.choice([0, -1, "x", None, {}, 10 ** 30]))
        detail = f"{list(p)}: {how}"
    write_manifest(path, m)
    return kind, "manifest.json", detail


def classify(reply: Reply, ref: dict, damaged_file: str) -> tuple:
    """(outcome, detail) of one fuzz trial (steps: search, verify, len); see tests/test_fuzz.py."""
    if reply.status != "done":
        return ("hang" if reply.status == "timeout" else "crash"), reply.describe(["search", "verify", "len"])
    search, verify, length = reply.results
    for name, r in (("search", search), ("verify", verify), ("len", length)):
        if not r["ok"] and not r["plaid"]:
            return "exception", f"{name}: {r['type']}: {r['msg'][:300]}"
    if not search["ok"]:
        return "plaid_error", search["type"]
    wrong = not same_answer(search["value"], ref["search"]) or (length["ok"] and length["value"] != ref["len"])
    if not wrong:
        return ("correct" if length["ok"] else "plaid_error"), ""
    if not verify["ok"]:
        return "verify_names_file", f"verify raised {verify['type']}"
    problems = verify["value"]
    if damaged_file == "manifest.json":
        flagged = bool(problems)
    else:
        flagged = any(damaged_file in p for p in problems)
    if flagged:
        return "verify_names_file", ""
    what = "len" if same_answer(search["value"], ref["search"]) else "search"
    return "wrong_answer", f"wrong {what} answer, verify() = {problems!r}"[:300]


@dataclass
class FuzzSummary:
    trials: int
    seed: int
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    by_kind: Dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: List[dict] = field(default_factory=list)
    worker_starts: int = 0

    def report(self, max_failures: int = 40) -> str:
        lines = [f"plaid fuzz: {self.trials} trials, seed {self.seed}, {self.seconds:.1f} s, "
                 f"{self.worker_starts} worker start(s)",
                 "outcomes: " + ", ".join(f"{k} {self.counts.get(k, 0)}" for k in
                                          ("plaid_error", "verify_names_file", "correct") + FAILURES)]
        for kind in sorted(self.by_kind):
            c = self.by_kind[kind]
            lines.append(f"  {kind:22s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        if self.failures:
            lines.append(f"{len(self.failures)} failure(s):")
            for f in self.failures[:max_failures]:
                lines.append(f"  trial {f['trial']} [{f['engine']}] {f['kind']} {f['file']} ({f['damage']}): "
                             f"{f['outcome']}: {f['detail']}")
            if len(self.failures) > max_failures:
                lines.append(f"  ... {len(self.failures) - max_failures} more")
        return "\n".join(lines)


def run_fuzz(trials: int = 300, seed: int = 0, workers: int = 2, timeout: float = 20.0,
             engines=("numpy", "numpy", "torch"), kinds=None, root: Optional[str] = None,
             progress=None) -> FuzzSummary:
    """Run ``trials`` seeded damage trials on copies of a small pristine index.

    Each trial copies the pristine index, applies one random damage (:func:`apply_random_damage`)
    and asks a worker to search it, verify it and count its documents; :func:`classify` names the
    outcome. Deterministic for a given ``seed`` (the damage of trial ``i`` depends on ``seed`` and
    ``i`` only).
    """
    own_root = root is None
    root = root or tempfile.mkdtemp(prefix="plaid-fuzz-")
    summary = FuzzSummary(trials, seed)
    t0 = time.monotonic()
    pool = [Worker(threads=1) for _ in range(workers)]
    try:
        pristine = os.path.join(root, "pristine")
        r = pool[0].call([["pristine", pristine]], timeout=300)
        if r.status != "done" or not r.results[0]["ok"]:
            raise RuntimeError(f"building the pristine index failed: {r.describe()} {r.results}")
        refs = {}
        for w in pool:  # every worker's own reference: the comparison is within one process
            steps = [["search", pristine, e, K] for e in sorted(set(engines))] + [["len", pristine]]
            r = w.call(steps, timeout=120)
            if r.status != "done" or not all(x["ok"] for x in r.results):
                raise RuntimeError(f"the pristine index does not answer: {r.describe()} {r.results}")
            refs[id(w)] = {e: {"search": x["value"], "len": r.results[-1]["value"]}
                           for e, x in zip(sorted(set(engines)), r.results)}
        first = refs[id(pool[0])]
        for w in pool[1:]:
            for e in first:
                if not same_answer(first[e]["search"], refs[id(w)][e]["search"]):
                    raise RuntimeError("workers disagree on the pristine index: search is not deterministic")

        todo: "queue.Queue[int]" = queue.Queue()
        for i in range(trials):
            todo.put(i)
        lock = threading.Lock()

        def drive(w: Worker):
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                rng = random.Random(f"plaid-fuzz-{seed}-{i}")
                engine = engines[rng.randrange(len(engines))]
                path = os.path.join(root, f"trial-{i}")
                shutil.copytree(pristine, path)
                kind, fname, detail = apply_random_damage(rng, path, rng.choice(kinds) if kinds else None)
                reply = w.call([["search", path, engine, K], ["verify", path], ["len", path]], timeout=timeout)
                outcome, why = classify(reply, refs[id(w)][engine], fname)
                shutil.rmtree(path, ignore_errors=True)
                with lock:
                    summary.counts[outcome] += 1
                    summary.by_kind[kind][outcome] += 1
                    if outcome in FAILURES:
                        summary.failures.append({"trial": i, "engine": engine, "kind": kind, "file": fname,
                                                 "damage": detail, "outcome": outcome, "detail": why})
                    done = sum(summary.counts.values())
                    if progress is not None and (done % 100 == 0 or done == trials):
                        progress(f"{done}/{trials} trials, {time.monotonic() - t0:.0f} s: "
                                 + ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items())))

        threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in pool]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        summary.worker_starts = sum(w.starts for w in pool)
        for w in pool:
            w.close()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    summary.failures.sort(key=lambda f: f["trial"])
    summary.seconds = time.monotonic() - t0
    return summary


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        serve()
    else:
        sys.exit("usage: fuzz_harness.py --worker (started by the tests); run benchmarks/fuzz.py to fuzz")

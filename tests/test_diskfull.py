"""A full disk: build, add and compact fail cleanly (an exception, never a signal) and lose nothing.

A small tmpfs is mounted (root only; skipped with the reason otherwise), a small index (400
documents, ~3000 tokens) is built on it, and the remaining space is filled with a filler file,
leaving 0 to 12 pages free: less than any of the operations needs, but with a few pages a
file's header fits and its data does not (writing the data through a memory map then dies of
SIGBUS on a tmpfs). Then, in a worker process (``tests/fuzz_harness.py``: a signal shows as a crash
with a negative exit code), a build into a new folder, an ``add`` and a ``compact`` must each
raise OSError or a PlaidError; with the filler still there the old index must open and answer
exactly as before, and a failed build must leave no index behind. Finally, with the filler
removed, the next ``add`` must succeed and leave only the files its manifest references (plus
``manifest.json`` and plaid's own dot-files ``.plaid*``).
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_harness import K, Worker, describe_result, read_manifest, same_answer  # noqa: E402

TMPFS_KB = 1024
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
FREE_PAGES = [0, 1, 2, 4, 6, 8, 12]
OPS = ["build", "add", "compact"]
TIMEOUT = 120.0


def _mount_tmpfs(path: str):
    """None when mounted, else the reason it could not be."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"mounting a tmpfs needs root (running as uid {os.geteuid() if hasattr(os, 'geteuid') else '?'})"
    if shutil.which("mount") is None:
        return "no mount command on PATH"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_KB}k", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"`mount -t tmpfs -o size={TMPFS_KB}k tmpfs {path}` failed ({r.returncode}): {r.stderr.strip()}"
    return None


def _umount(path: str) -> None:
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)


class Disk:
    def __init__(self, root: str, worker: Worker):
        self.root = root
        self.worker = worker
        self.idx = os.path.join(root, "idx")
        self.filler = os.path.join(root, "filler")
        self.before = None  # search and len of the index before any failed operation

    def fill(self, free_pages: int) -> None:
        """Fill the file system, then give back ``free_pages`` pages."""
        if os.path.exists(self.filler):
            os.remove(self.filler)
        block = b"\0" * (64 << 10)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                if n < len(block):
                    block = block[:max(1, len(block) - n)]
            while True:  # the last partial block
                try:
                    if os.write(fd, b"\0" * 512) <= 0:
                        break
                except OSError:
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, (size // PAGE - free_pages) * PAGE))
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def answers(self):
        r = self.worker.call([["search", self.idx, "numpy", K], ["len", self.idx], ["verify", self.idx]], TIMEOUT)
        return r


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    mnt = str(tmp_path_factory.mktemp("diskfull") / "fs")
    os.makedirs(mnt)
    reason = _mount_tmpfs(mnt)
    if reason:
        pytest.skip(reason)
    worker = Worker(threads=1)
    try:
        d = Disk(mnt, worker)
        r = worker.call([["build", d.idx, "big", "pq", False], ["delete", d.idx, [1, 2, 3, "b10"]]], TIMEOUT)
        assert r.status == "done" and all(x["ok"] for x in r.results), (r.describe(), r.results)
        r = d.answers()
        assert r.status == "done" and all(x["ok"] for x in r.results) and r.results[2]["value"] == [], r.results
        d.before = r.results
        yield d
    finally:
        worker.close()
        _umount(mnt)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("free_pages", FREE_PAGES)
def test_operation_on_a_full_disk_fails_cleanly(disk, free_pages, op):
    new = os.path.join(disk.root, "new")
    shutil.rmtree(new, ignore_errors=True)
    disk.fill(free_pages)
    assert disk.free_bytes() <= free_pages * PAGE
    step = {"build": ["build", new, "big", "pq", False], "add": ["add", disk.idx, "big2"],
            "compact": ["compact", disk.idx]}[op]
    r = disk.worker.call([step], TIMEOUT)
    issues = []
    if r.status != "done":
        issues.append(r.describe([step]))
    else:
        res = r.results[0]
        if res["ok"]:  # it fitted after all: then the index must be consistent (and becomes the reference)
            if op == "build":
                shutil.rmtree(new, ignore_errors=True)
            else:
                after = disk.answers()
                if after.status != "done" or not all(x["ok"] for x in after.results) or after.results[2]["value"]:
                    issues.append(f"{op} succeeded on a full disk but left {after.describe()} {after.results}")
                else:
                    disk.before = after.results
        elif not ("OSError" in res["mro"] or res["plaid"]):
            issues.append(f"{op}: {res['type']} (neither OSError nor PlaidError): {res['msg'][:200]}")
    # with the filler still there, the old index answers exactly as before
    after = disk.answers()
    if after.status != "done":
        issues.append(f"the old index after the failed {op}: {after.describe()}")
    else:
        s, n, v = after.results
        if not s["ok"] or not same_answer(s["value"], disk.before[0]["value"]):
            issues.append(f"the old index no longer answers as before: {describe_result(s)}")
        if not n["ok"] or n["value"] != disk.before[1]["value"]:
            issues.append(f"len of the old index: {describe_result(n)}, expected {disk.before[1]['value']}")
        if not v["ok"] or v["value"]:
            issues.append(f"verify of the old index: {describe_result(v)}")
    if op == "build" and os.path.exists(new):
        left = [f for f in os.listdir(new) if not f.startswith(".plaid")]
        if left:
            issues.append(f"the failed build left {sorted(left)} in {new}")
    shutil.rmtree(new, ignore_errors=True)
    assert not issues, " | ".join(issues)


def test_next_add_after_space_is_freed_leaves_no_leftovers(disk):
    if os.path.exists(disk.filler):
        os.remove(disk.filler)
    r = disk.worker.call([["add", disk.idx, "add"], ["search", disk.idx, "numpy", K], ["len", disk.idx],
                          ["verify", disk.idx]], TIMEOUT)
    assert r.status == "done", r.describe()
    add, search, length, ver = r.results
    assert add["ok"], describe_result(add)
    assert search["ok"], describe_result(search)
    assert length["ok"] and length["value"] == disk.before[1]["value"] + 8, (describe_result(length),
                                                                           disk.before[1]["value"])
    assert ver["ok"] and ver["value"] == [], describe_result(ver)
    m = read_manifest(disk.idx)
    referenced = {e["file"] for e in m["arrays"].values()} | {"manifest.json"}
    leftovers = sorted(f for f in os.listdir(disk.idx) if f not in referenced and not f.startswith(".plaid"))
    assert not leftovers, f"files left in the index folder: {leftovers}"

"""A hostile or damaged index folder: plaid refuses it (a PlaidError) or answers exactly right.

The index folder is untrusted input. Whatever is in it — path traversal in the manifest's file
names, symlinks, hard links, FIFOs, directories or devices under plaid's file names, pickled
arrays, wrong dtypes or shapes with matching checksums, out-of-range values, a manifest field of
the wrong type or value, a user's own files beside the index — plaid must never

* read or write outside the folder (sentinel files outside it, holding plausible data, must be
  neither read into a result nor changed nor created),
* hang (every case runs in a worker process under a watchdog) or die of a signal,
* raise anything but a :class:`plaid.PlaidError` (of the class named by the case where it matters),
* give a wrong answer (search results must then be identical to the pristine index's),
* delete or change files it did not write.

``Index.verify()`` must report the damage (raise a PlaidError or return problems naming the
damaged file) wherever a case says so, including damage that keeps the checksums consistent.

Every case is one parametrized id; it runs against a private copy of a small pristine index
(build + add + delete: generation 2, segments seg0 and seg1, one tombstone array). Only the public
API is used (through ``tests/fuzz_harness.py``'s worker).

``PLAID_HOSTILE_TIMEOUT`` (default 10 s) is how long one case may run before it counts as a hang;
``PLAID_HOSTILE_TIMES=1`` prints the seconds each step of each case took (on stderr, with ``-s``).
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_harness import (K, Worker, describe_result, load_array, npy_bytes, put_array,  # noqa: E402
                          read_manifest, same_answer, write_manifest)

#: seconds a case may take in the worker before it counts as a hang
TIMEOUT = float(os.environ.get("PLAID_HOSTILE_TIMEOUT", "10"))
DELETE_IDS = [5, "e7"]
DEL = object()  # "remove this manifest key"


# -- the pristine index and its reference answers -------------------------------------------------------
@dataclass
class Env:
    worker: Worker
    pristine: str
    m: dict  # pristine manifest
    ref: Dict[str, dict]  # state -> {"numpy": search value, "torch": ..., "len": int}
    doclens: np.ndarray
    offsets: np.ndarray
    top: int  # the best hit of query 0 (a seg0 document)
    top1: int  # a seg1 document among the hits
    qdir: str  # the queries as an embeddings bundle, for `plaid search`
    decoys: Dict[str, bytes] = field(default_factory=dict)  # file name -> plausible wrong .npy content

    @property
    def g(self) -> int:
        return int(self.m["generation"])

    @property
    def C(self) -> int:
        return int(self.m["num_centroids"])

    @property
    def N(self) -> int:
        return int(self.m["num_documents"])

    def seg_pos(self, doc: int) -> Tuple[str, np.ndarray]:
        """(segment name, positions within that segment) of a document's tokens."""
        base = 0
        for s in self.m["segments"]:
            if s["doc_start"] <= doc < s["doc_end"]:
                return s["name"], np.arange(self.offsets[doc], self.offsets[doc + 1]) - base
            base += s["num_tokens"]
        raise AssertionError(doc)


def _op_step(op: str, path: str) -> list:
    return {"delete": ["delete", path, DELETE_IDS], "add": ["add", path, "add"], "compact": ["compact", path],
            "overwrite": ["build", path, "rebuild", "scalar", True], "add_bad": ["add", path, "bad_dim"]}[op]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    worker = Worker(threads=1)
    pristine = str(root / "pristine")
    r = worker.call([["pristine", pristine], ["warm"]], timeout=300)
    assert r.status == "done" and all(x["ok"] for x in r.results), (r.describe(), r.results)
    ref = {}
    for state in ("pristine", "delete", "add", "compact", "overwrite"):
        path = str(root / f"ref-{state}")
        shutil.copytree(pristine, path)
        steps = ([] if state == "pristine" else [_op_step(state, path)]) + \
            [["search", path, "numpy", K], ["search", path, "torch", K], ["len", path], ["verify", path]]
        r = worker.call(steps, timeout=300)
        assert r.status == "done" and all(x["ok"] for x in r.results), (state, r.describe(), r.results)
        *_, numpy_, torch_, length, problems = r.results
        assert problems["value"] == [], (state, problems)
        ref[state] = {"numpy": numpy_["value"], "torch": torch_["value"], "len": length["value"]}
    m = read_manifest(pristine)
    doclens = load_array(pristine, "doclens", m).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(doclens)])
    hits = [d for row in ref["pristine"]["numpy"]["ids"] for d in row]
    seg0_end = m["segments"][0]["doc_end"]
    top = hits[0] if hits[0] < seg0_end else next(d for d in hits if d < seg0_end)
    top1 = next(d for d in hits if d >= seg0_end)
    # the hard-coded counts of the manifest cases below assume this pristine index
    assert (m["num_documents"], m["num_tokens"], m["num_centroids"], m["num_deleted"], m["generation"],
            m["next_segment"]) == (80, 622, 44, 3, 2, 2), m
    assert [(s["name"], s["doc_start"], s["doc_end"], s["num_tokens"]) for s in m["segments"]] == \
        [("seg0", 0, 60, 457), ("seg1", 60, 80, 165)], m["segments"]
    assert m["tombstones"] == ["tombstones_g2"] and m["arrays"]["ivf"]["file"] == "ivf.1.npy"
    qdir = str(root / "queries")
    r = worker.call([["query_bundle", qdir]], timeout=60)
    assert r.status == "done" and r.results[0]["ok"], r.results
    yield Env(worker, pristine, m, ref, doclens, offsets, int(top), int(top1), qdir)
    worker.close()


class Ctx:
    """One case's private copy of the pristine index (``idx``) and its surroundings (``root``)."""

    def __init__(self, env: Env, root: str):
        self.env = env
        self.root = root
        self.idx = os.path.join(root, "idx")
        self.outside = os.path.join(root, "outside")
        shutil.copytree(env.pristine, self.idx)
        os.makedirs(self.outside)
        # decoys: every array file of the index, with plausible but wrong content, beside the folder
        # and in another one, so that reading any of them shows as a wrong answer
        if not env.decoys:
            env.decoys.update({e["file"]: npy_bytes(self.plausible(n)) for n, e in env.m["arrays"].items()})
        for fname, data in env.decoys.items():
            for d in (self.root, self.outside):
                with open(os.path.join(d, fname), "wb") as f:
                    f.write(data)

    # manifest
    def m(self) -> dict:
        return read_manifest(self.idx)

    def put_m(self, m: dict) -> None:
        write_manifest(self.idx, m)

    def edit(self, path: tuple, value) -> None:
        """Set (or, with ``DEL``, remove) one manifest field; ``path`` is a tuple of keys."""
        m = self.m()
        obj = m
        for k in path[:-1]:
            obj = obj[k]
        if value is DEL:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value() if callable(value) else value
        self.put_m(m)

    # arrays
    def entry(self, name: str) -> dict:
        return self.env.m["arrays"][name]

    def fname(self, name: str) -> str:
        return self.entry(name)["file"]

    def full(self, name: str) -> str:
        return os.path.join(self.idx, self.fname(name))

    def arr(self, name: str) -> np.ndarray:
        """The pristine content of an array (a writable copy)."""
        return load_array(self.env.pristine, name, self.env.m).copy()

    def rewrite(self, name: str, arr, **kw) -> dict:
        """Rewrite an array with the manifest's dtype/shape/bytes/crc32 made to match."""
        return put_array(self.idx, name, np.asanyarray(arr), **kw)

    def plausible(self, name: str) -> np.ndarray:
        """The array with plausible but wrong content (same dtype and shape, values in range)."""
        a = self.arr(name)
        if name.endswith("_residuals"):
            return a ^ np.uint8(0x5A)
        if name == "centroids":
            return -a
        return np.roll(a, 3, axis=0)

    # outside
    def outside_file(self, rel: str, data: bytes) -> str:
        full = os.path.join(self.outside, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        return full

    def point(self, name: str, file_value: str, target: str, arr: np.ndarray) -> None:
        """Write ``arr`` to ``target`` (anywhere) and make array ``name``'s manifest entry name it as
        ``file_value``, with matching dtype, shape, bytes and crc32."""
        data = npy_bytes(arr)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        m = self.m()
        m["arrays"][name].update(file=file_value, dtype=arr.dtype.str, shape=list(arr.shape), bytes=len(data),
                                 crc32=zlib.crc32(data))
        self.put_m(m)

    def replace_with_symlink(self, name_or_file: str, target: str) -> str:
        full = os.path.join(self.idx, name_or_file)
        if os.path.lexists(full):
            os.remove(full)
        os.symlink(target, full)
        return full

    @property
    def g1(self) -> int:
        return self.env.g + 1

    @property
    def next_seg(self) -> str:
        return f"seg{self.env.m['next_segment']}"


# -- observing the surroundings --------------------------------------------------------------------------
def snapshot_tree(top: str, skip: Optional[str] = None) -> Dict[str, tuple]:
    """rel path -> (kind, size, mtime_ns, content or link target) of everything under ``top``
    (never following links, never opening anything but regular files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        if skip is not None and os.path.abspath(dirpath) == os.path.abspath(skip):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if skip is None or
                       os.path.abspath(os.path.join(dirpath, d)) != os.path.abspath(skip)]
        for name in filenames + dirnames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, top)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", st.st_size, st.st_mtime_ns, f.read())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("other", st.st_mode)
    return out


def tree_changes(before: Dict[str, tuple], after: Dict[str, tuple]) -> List[str]:
    issues = []
    for rel in sorted(set(before) | set(after)):
        if rel not in after:
            issues.append(f"{rel} was REMOVED")
        elif rel not in before:
            issues.append(f"{rel} was CREATED")
        elif before[rel] != after[rel]:
            issues.append(f"{rel} was CHANGED")
    return issues


def folder_problems(idx: str) -> List[str]:
    """The committed index must consist of regular, unshared files directly inside the folder."""
    mpath = os.path.join(idx, "manifest.json")
    try:
        st = os.lstat(mpath)
    except OSError as e:
        return [f"manifest.json: {e}"]
    if not stat.S_ISREG(st.st_mode):
        return ["manifest.json is not a regular file (a symlink?)"]
    if st.st_nlink != 1:
        return [f"manifest.json has {st.st_nlink} hard links"]
    try:
        m = read_manifest(idx)
    except ValueError as e:
        return [f"manifest.json is not JSON: {e}"]
    issues = []
    for name, e in m.get("arrays", {}).items():
        f = e.get("file") if isinstance(e, dict) else None
        if not isinstance(f, str) or os.path.basename(f) != f or f in (".", ".."):
            issues.append(f"arrays.{name}.file = {f!r} is not a plain file name")
            continue
        try:
            st = os.lstat(os.path.join(idx, f))
        except OSError:
            issues.append(f"{f} (array {name}) is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            issues.append(f"{f} (array {name}) is not a regular file")
        elif st.st_nlink != 1:
            issues.append(f"{f} (array {name}) has {st.st_nlink} hard links")
    return issues


# -- cases ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    setup: Callable  # (ctx) -> verify tokens: None (no requirement), () (any problem) or names to find
    error: str = "IndexCorruptError"  # exception class a refusal must be (by name; "PlaidError": any)
    correct_ok: bool = True  # an answer identical to the pristine index's is acceptable
    read: bool = True  # search (both engines), verify and len on the damaged copy
    op: Optional[str] = None  # then a mutation: delete | add | compact | overwrite | add_bad
    must_fail: bool = False  # the mutation must raise a PlaidError
    relaxed: bool = False  # a mutation that succeeds need not match the reference answers exactly
    foreign: bool = False  # the mutation must succeed (overwrite: or IndexExistsError), foreign files kept
    cli: Optional[str] = None  # run `plaid <cli> INDEX ...` instead: exit 2, one line on stderr
    skip: Optional[Callable] = None  # () -> reason or None


CASES: Dict[str, Case] = {}


def case(cid: str, **kw):
    def deco(fn):
        assert cid not in CASES, cid
        CASES[cid] = Case(cid, fn, **kw)
        return fn
    return deco


def add_case(cid: str, fn, **kw):
    case(cid, **kw)(fn)


def tokens(ctx: Ctx, *names: str) -> tuple:
    """Strings one of which a problem reported by verify() must contain: the arrays' files and names."""
    out = []
    for n in names:
        if n in ctx.env.m["arrays"]:
            out += [ctx.fname(n), n]
        else:
            out.append(n)
    return tuple(out)


# 1. path traversal and odd names in the manifest's "file" entries ----------------------------------------
for _arr in ("doclens", "seg0_residuals"):
    def _rel(ctx, a=_arr):
        ctx.point(a, f"../x_{a}.npy", os.path.join(ctx.root, f"x_{a}.npy"), ctx.plausible(a))
        return tokens(ctx, a, f"x_{a}.npy")

    def _abs(ctx, a=_arr):
        target = os.path.join(ctx.outside, f"{a}.npy")
        ctx.point(a, target, target, ctx.plausible(a))
        return tokens(ctx, a, target)

    def _deep(ctx, a=_arr):
        ctx.point(a, f"../../{os.path.basename(ctx.root)}/outside/{a}.1.npy",
                  os.path.join(ctx.outside, f"{a}.1.npy"), ctx.plausible(a))
        return tokens(ctx, a)

    add_case(f"traversal_relative_{_arr}", _rel, correct_ok=False)
    add_case(f"traversal_absolute_{_arr}", _abs, correct_ok=False)
    add_case(f"traversal_dotdot_deep_{_arr}", _deep, correct_ok=False)


@case("traversal_real_subdir", correct_ok=False)
def _(ctx):
    ctx.point("doclens", "sub/doclens.1.npy", os.path.join(ctx.idx, "sub", "doclens.1.npy"), ctx.plausible("doclens"))
    return tokens(ctx, "doclens")


@case("traversal_symlinked_subdir", correct_ok=False)
def _(ctx):
    ctx.point("doclens", "sub/doclens.1.npy", os.path.join(ctx.outside, "doclens.1.npy"), ctx.plausible("doclens"))
    os.symlink(ctx.outside, os.path.join(ctx.idx, "sub"))
    return tokens(ctx, "doclens")


for _cid, _fname in [("name_without_generation", "doclens.npy"), ("name_uppercase", "Doclens.1.npy"),
                     ("name_bak_suffix", "doclens.1.npy.bak"), ("name_txt_suffix", "doclens.1.txt"),
                     ("name_negative_generation", "doclens.-1.npy"), ("name_hidden", ".doclens.1.npy"),
                     ("name_future_generation", "doclens.9.npy"), ("name_of_other_array", "ivf.2.npy"),
                     ("name_with_space", "doclens .1.npy"), ("name_dot_slash", "./doclens.2.npy")]:
    def _named(ctx, f=_fname):
        ctx.point("doclens", f, os.path.join(ctx.idx, f), ctx.plausible("doclens"))
        return tokens(ctx, "doclens", f)

    add_case(_cid, _named, correct_ok=False)


@case("entry_names_other_arrays_file")
def _(ctx):
    m = ctx.m()
    m["arrays"]["ivf_offsets"] = dict(m["arrays"]["doc_ids_offsets"])  # int64 1-D, checksums match
    ctx.put_m(m)
    return tokens(ctx, "ivf_offsets")


@case("entry_norms_names_codes_file")
def _(ctx):
    m = ctx.m()
    m["arrays"]["seg0_norms"] = dict(m["arrays"]["seg0_codes"])  # same length, uint16 instead of float16
    ctx.put_m(m)
    return tokens(ctx, "seg0_norms")


@case("entry_tombstone_names_doclens_file")
def _(ctx):
    m = ctx.m()
    m["arrays"]["tombstones_g2"] = dict(m["arrays"]["doc_ids_offsets"])
    ctx.put_m(m)
    return tokens(ctx, "tombstones_g2")


for _cid, _val in [("file_empty_string", ""), ("file_dot", "."), ("file_dotdot", ".."), ("file_nul_byte", "doclens\0.1.npy"),
                   ("file_not_a_string", 123), ("file_null", None), ("file_list", ["doclens.1.npy"]),
                   ("file_very_long", "d" * 5000 + ".1.npy"), ("file_trailing_slash", "doclens.1.npy/")]:
    add_case(_cid, lambda ctx, v=_val: (ctx.edit(("arrays", "doclens", "file"), v), ())[1])


# 2. symlinks and other non-regular files read in place of index files -------------------------------------
for _arr in ("seg0_codes", "doclens"):
    def _sym(ctx, a=_arr):
        target = ctx.outside_file(f"copy_of_{ctx.fname(a)}", open(ctx.full(a), "rb").read())
        ctx.replace_with_symlink(ctx.fname(a), target)  # identical bytes: only the link is wrong
        return tokens(ctx, a)

    add_case(f"symlink_outside_identical_{_arr}", _sym, correct_ok=False)


@case("symlink_within_folder_identical", correct_ok=False)
def _(ctx):
    shutil.copyfile(ctx.full("doclens"), os.path.join(ctx.idx, "doclens.0.npy"))
    ctx.replace_with_symlink(ctx.fname("doclens"), "doclens.0.npy")
    return tokens(ctx, "doclens")


@case("symlink_dangling_array")
def _(ctx):
    ctx.replace_with_symlink(ctx.fname("ivf"), os.path.join(ctx.outside, "does-not-exist.npy"))
    return tokens(ctx, "ivf")


@case("symlink_manifest_identical", error="PlaidError", correct_ok=False)
def _(ctx):
    target = ctx.outside_file("manifest.json", open(os.path.join(ctx.idx, "manifest.json"), "rb").read())
    ctx.replace_with_symlink("manifest.json", target)
    return ()


@case("symlink_manifest_to_other_index", error="PlaidError", correct_ok=False)
def _(ctx):
    other = os.path.join(ctx.outside, "other")
    shutil.copytree(ctx.env.pristine, other)
    m = read_manifest(other)
    m["arrays"]["doclens"]["file"] = os.path.join(other, m["arrays"]["doclens"]["file"])
    put_array(other, "doclens", ctx.plausible("doclens"), file=m["arrays"]["doclens"]["file"], manifest=m)
    ctx.replace_with_symlink("manifest.json", os.path.join(other, "manifest.json"))
    return ()


for _arr in ("seg0_codes", "doclens"):
    def _fifo(ctx, a=_arr):
        os.remove(ctx.full(a))
        os.mkfifo(ctx.full(a))
        return tokens(ctx, a)

    add_case(f"fifo_array_{_arr}", _fifo)


@case("fifo_manifest", error="PlaidError")
def _(ctx):
    os.remove(os.path.join(ctx.idx, "manifest.json"))
    os.mkfifo(os.path.join(ctx.idx, "manifest.json"))
    return ()


@case("directory_array_doclens")
def _(ctx):
    os.remove(ctx.full("doclens"))
    os.mkdir(ctx.full("doclens"))
    return tokens(ctx, "doclens")


@case("directory_array_seg0_residuals")
def _(ctx):
    os.remove(ctx.full("seg0_residuals"))
    os.makedirs(os.path.join(ctx.full("seg0_residuals"), "inner"))
    return tokens(ctx, "seg0_residuals")


@case("directory_manifest", error="PlaidError")
def _(ctx):
    os.remove(os.path.join(ctx.idx, "manifest.json"))
    os.mkdir(os.path.join(ctx.idx, "manifest.json"))
    return ()


def _no_mknod():
    import tempfile

    d = tempfile.mkdtemp()
    try:
        os.mknod(os.path.join(d, "z"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
        return None
    except (OSError, AttributeError) as e:
        return f"cannot create a device node here (os.mknod: {e})"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@case("device_node_dev_zero_as_doclens", skip=_no_mknod)
def _(ctx):
    os.remove(ctx.full("doclens"))
    os.mknod(ctx.full("doclens"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
    return tokens(ctx, "doclens")


@case("symlink_to_dev_zero_as_seg0_codes")
def _(ctx):
    ctx.replace_with_symlink(ctx.fname("seg0_codes"), "/dev/zero")
    return tokens(ctx, "seg0_codes")


def _claim_size(ctx, name: str, size: int, crc: int = 0) -> None:
    """Make the manifest's bytes/crc32 of ``name`` agree with what a special file reports (size 0)."""
    m = ctx.m()
    m["arrays"][name].update(bytes=size, crc32=crc)
    ctx.put_m(m)


@case("fifo_array_doclens_manifest_says_0_bytes")
def _(ctx):
    os.remove(ctx.full("doclens"))
    os.mkfifo(ctx.full("doclens"))
    _claim_size(ctx, "doclens", 0)
    return tokens(ctx, "doclens")


@case("symlink_to_dev_zero_manifest_says_0_bytes")
def _(ctx):
    ctx.replace_with_symlink(ctx.fname("seg0_norms"), "/dev/zero")
    _claim_size(ctx, "seg0_norms", 0)
    return tokens(ctx, "seg0_norms")


@case("device_node_dev_zero_manifest_says_0_bytes", skip=_no_mknod)
def _(ctx):
    os.remove(ctx.full("ivf_offsets"))
    os.mknod(ctx.full("ivf_offsets"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
    _claim_size(ctx, "ivf_offsets", 0)
    return tokens(ctx, "ivf_offsets")


@case("directory_array_manifest_says_its_size")
def _(ctx):
    os.remove(ctx.full("doclens"))
    os.mkdir(ctx.full("doclens"))
    _claim_size(ctx, "doclens", os.path.getsize(ctx.full("doclens")))
    return tokens(ctx, "doclens")


@case("symlink_to_dev_urandom_as_centroids")
def _(ctx):
    ctx.replace_with_symlink(ctx.fname("centroids"), "/dev/urandom")
    return tokens(ctx, "centroids")


@case("symlink_to_proc_self_as_ivf")
def _(ctx):
    ctx.replace_with_symlink(ctx.fname("ivf"), "/proc/self/environ")
    return tokens(ctx, "ivf")


# 3. pickled (object-dtype) arrays with consistent checksums ------------------------------------------------
class _Exploit:
    """Unpickling this creates a file outside the index (proof that something was unpickled)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@case("object_dtype_ivf")
def _(ctx):
    ctx.rewrite("ivf", np.array(list(ctx.arr("ivf")), dtype=object), allow_pickle=True)
    return tokens(ctx, "ivf")


@case("object_dtype_exploit_doclens")
def _(ctx):
    evil = np.empty(ctx.env.N, dtype=object)
    evil[:] = [_Exploit(os.path.join(ctx.outside, "PWNED"))] * ctx.env.N
    ctx.rewrite("doclens", evil, allow_pickle=True)
    return tokens(ctx, "doclens")


@case("object_dtype_exploit_tombstones")
def _(ctx):
    evil = np.array([_Exploit(os.path.join(ctx.outside, "PWNED")), 1, 2], dtype=object)
    ctx.rewrite("tombstones_g2", evil, allow_pickle=True)
    return tokens(ctx, "tombstones_g2")


# 4. wrong dtype or shape, checksums and sizes updated --------------------------------------------------------
def _retype(name, dtype, correct_ok=False):
    def fn(ctx):
        ctx.rewrite(name, ctx.arr(name).astype(dtype))
        return tokens(ctx, name) if not correct_ok else None
    return fn


for _cid, _name, _dtype, _ok in [
        ("dtype_codes_float32", "seg0_codes", np.float32, False),
        ("dtype_codes_int64", "seg0_codes", np.int64, True),
        ("dtype_codes_bigendian", "seg0_codes", ">u2", True),
        ("dtype_codes_int8", "seg0_codes", np.int8, True),
        ("dtype_residuals_int16", "seg0_residuals", np.int16, False),
        ("dtype_residuals_float32", "seg1_residuals", np.float32, False),
        ("dtype_norms_float64", "seg0_norms", np.float64, True),
        ("dtype_norms_int16", "seg0_norms", np.int16, False),
        ("dtype_centroids_float16_beside_scales", "centroids", np.float16, False),
        ("dtype_centroids_int16", "centroids", np.int16, False),
        ("dtype_centroid_scales_float16", "centroid_scales", np.float16, False),
        ("dtype_norm_values_float64", "norm_values", np.float64, False),
        ("dtype_centroids_complex", "centroids", np.complex64, False),
        ("dtype_ivf_float64", "ivf", np.float64, False),
        ("dtype_ivf_uint8", "ivf", np.uint8, True),
        ("dtype_ivf_offsets_float32", "ivf_offsets", np.float32, False),
        ("dtype_doclens_float32", "doclens", np.float32, False),
        ("dtype_doclens_bool", "doclens", np.bool_, False),
        ("dtype_tombstones_float64", "tombstones_g2", np.float64, False),
        ("dtype_doc_ids_utf8_int32", "doc_ids_utf8", np.int32, False),
        ("dtype_doc_ids_offsets_float64", "doc_ids_offsets", np.float64, False),
        ("dtype_pq_codebooks_float16", "pq_codebooks", np.float16, False)]:
    add_case(_cid, _retype(_name, _dtype, _ok), correct_ok=_ok)


@case("dtype_doclens_structured", correct_ok=False)
def _(ctx):
    a = ctx.arr("doclens")
    s = np.zeros(len(a), dtype=[("len", "<i4")])
    s["len"] = a
    ctx.rewrite("doclens", s)
    return tokens(ctx, "doclens")


def _reshape(name, shape_fn):
    def fn(ctx):
        a = ctx.arr(name)
        ctx.rewrite(name, a.reshape(shape_fn(a)) if callable(shape_fn) else shape_fn)
        return tokens(ctx, name)
    return fn


for _cid, _name, _shape in [
        ("shape_doclens_2d", "doclens", lambda a: (len(a), 1)),
        ("shape_codes_2d", "seg0_codes", lambda a: (len(a), 1)),
        ("shape_residuals_flat", "seg0_residuals", lambda a: (a.size,)),
        ("shape_residuals_halved_rows", "seg0_residuals", lambda a: (a.shape[0] * 2, a.shape[1] // 2)),
        ("shape_centroids_halved_rows", "centroids", lambda a: (a.shape[0] * 2, a.shape[1] // 2)),
        ("shape_pq_codebooks_reshaped", "pq_codebooks", lambda a: (a.shape[0], 128, a.shape[2] * 2)),
        ("shape_norms_2d", "seg1_norms", lambda a: (1, len(a))),
        ("shape_tombstones_2d", "tombstones_g2", lambda a: (len(a), 1))]:
    add_case(_cid, _reshape(_name, _shape), correct_ok=False)


@case("shape_ivf_offsets_short", correct_ok=False)
def _(ctx):
    ctx.rewrite("ivf_offsets", ctx.arr("ivf_offsets")[:-1])
    return tokens(ctx, "ivf_offsets")


@case("shape_doclens_scalar", correct_ok=False)
def _(ctx):
    ctx.rewrite("doclens", np.array(int(ctx.arr("doclens").sum()), np.int32))
    return tokens(ctx, "doclens")


@case("fortran_order_residuals")
def _(ctx):
    ctx.rewrite("seg0_residuals", np.asfortranarray(ctx.arr("seg0_residuals")))
    return None


# 5. out-of-range and non-finite values, checksums updated ----------------------------------------------------
def _token_edit(name_fn, value, cast=None):
    """Set the tokens of the best hit of query 0 (or of a seg1 hit) in one per-token array."""
    def fn(ctx):
        seg_doc, which = name_fn(ctx)
        seg, pos = ctx.env.seg_pos(seg_doc)
        name = f"{seg}_{which}"
        a = ctx.arr(name)
        if cast is not None:
            a = a.astype(cast)
        a[pos] = value(ctx) if callable(value) else value
        ctx.rewrite(name, a)
        return tokens(ctx, name)
    return fn


_TOP = lambda w: (lambda ctx: (ctx.env.top, w))  # noqa: E731
_TOP1 = lambda w: (lambda ctx: (ctx.env.top1, w))  # noqa: E731

for _cid, _fn in [
        ("codes_equal_num_centroids", _token_edit(_TOP("codes"), lambda ctx: ctx.env.C)),
        ("codes_max_uint16", _token_edit(_TOP("codes"), 65535)),
        ("codes_seg1_beyond_centroids", _token_edit(_TOP1("codes"), lambda ctx: ctx.env.C + 3)),
        ("codes_negative_int32", _token_edit(_TOP("codes"), -1, cast=np.int32)),
        ("codes_negative_int32_seg1", _token_edit(_TOP1("codes"), -3, cast=np.int32)),
        ]:
    add_case(_cid, _fn)


def _array_edit(name, edit):
    def fn(ctx):
        a = ctx.arr(name)
        a = edit(ctx, a)
        ctx.rewrite(name, a)
        return tokens(ctx, name)
    return fn


def _set(a, idx, v):
    a[idx] = v
    return a


def _ivf_top(ctx, a, v):
    assert (a == ctx.env.top).any()
    return _set(a.astype(np.int32), a == ctx.env.top, v)  # int32: any id fits (the stored ivf may be uint16)


def _swap_offsets(ctx, a):
    d = np.flatnonzero(np.diff(a) > 0)
    i = int(d[len(d) // 2]) + 1  # a[i] > a[i-1]: make it smaller
    a[i], a[i - 1] = a[i - 1], a[i]
    return a


def _doclens_negative(ctx, a):
    t = ctx.env.top
    a[t + 1] += a[t] + 1
    a[t] = -1
    return a


def _centroid_of_top(ctx, a, v):
    seg, pos = ctx.env.seg_pos(ctx.env.top)
    c = int(load_array(ctx.env.pristine, f"{seg}_codes", ctx.env.m)[pos[0]])
    a[c, : len(a[c]) // 2] = v
    return a


def _scale_of_top(ctx, a, v):
    seg, pos = ctx.env.seg_pos(ctx.env.top)
    a[int(load_array(ctx.env.pristine, f"{seg}_codes", ctx.env.m)[pos[0]])] = v
    return a


def _norm_value_of_top(ctx, a, v):
    seg, pos = ctx.env.seg_pos(ctx.env.top)
    a[int(load_array(ctx.env.pristine, f"{seg}_norms", ctx.env.m)[pos[0]])] = v
    return a


def _codebook_of_top(ctx, a, v):
    seg, pos = ctx.env.seg_pos(ctx.env.top)
    r = load_array(ctx.env.pristine, f"{seg}_residuals", ctx.env.m)[pos[0]]
    a[0, int(r[0]), :] = v
    return a


def _doc_id_bytes(ctx, a, doc, new: bytes):
    off = ctx.arr("doc_ids_offsets")
    a[off[doc] : off[doc] + len(new)] = np.frombuffer(new, np.uint8)
    return a


for _cid, _name, _edit in [
        ("ivf_id_equal_num_documents", "ivf", lambda ctx, a: _ivf_top(ctx, a, ctx.env.N)),
        ("ivf_id_negative", "ivf", lambda ctx, a: _ivf_top(ctx, a, -1)),
        ("ivf_id_int32_max", "ivf", lambda ctx, a: _ivf_top(ctx, a, 2 ** 31 - 1)),
        ("ivf_offsets_non_monotonic", "ivf_offsets", _swap_offsets),
        ("ivf_offsets_end_before_ivf_end", "ivf_offsets", lambda ctx, a: _set(a, -1, a[-1] - 1)),
        ("ivf_offsets_end_beyond_ivf", "ivf_offsets", lambda ctx, a: _set(a, -1, a[-1] + 10)),
        ("ivf_offsets_start_nonzero", "ivf_offsets", lambda ctx, a: _set(a, 0, 1)),
        ("ivf_offsets_negative", "ivf_offsets", lambda ctx, a: _set(a, 1, -5)),
        ("ivf_offsets_huge", "ivf_offsets", lambda ctx, a: _set(a, len(a) // 2, 2 ** 62)),
        ("doclens_negative_same_sum", "doclens", _doclens_negative),
        ("doclens_sum_off_by_one", "doclens", lambda ctx, a: _set(a, ctx.env.top, a[ctx.env.top] + 1)),
        ("doclens_int32_max", "doclens", lambda ctx, a: _set(a, ctx.env.top, 2 ** 31 - 1)),
        ("tombstone_id_equal_num_documents", "tombstones_g2", lambda ctx, a: _set(a, 0, ctx.env.N)),
        ("tombstone_id_negative", "tombstones_g2", lambda ctx, a: _set(a, 0, -1)),
        ("tombstone_id_huge", "tombstones_g2", lambda ctx, a: _set(a, 0, 2 ** 62)),
        ("centroid_scales_nan", "centroid_scales", lambda ctx, a: _scale_of_top(ctx, a, np.nan)),
        ("centroid_scales_inf", "centroid_scales", lambda ctx, a: _scale_of_top(ctx, a, np.inf)),
        ("centroid_scales_negative", "centroid_scales", lambda ctx, a: _scale_of_top(ctx, a, -1.0)),
        # finite centroids whose products with a query overflow float32 (scores inf or NaN)
        ("centroid_scales_huge", "centroid_scales", lambda ctx, a: _scale_of_top(ctx, a, 1e36)),
        ("norms_nan", "norm_values", lambda ctx, a: _norm_value_of_top(ctx, a, np.nan)),
        ("norms_zero", "norm_values", lambda ctx, a: _set(a, 0, 0.0)),
        ("norms_inf", "norm_values", lambda ctx, a: _set(a, -1, np.inf)),
        ("norms_negative", "norm_values", lambda ctx, a: -a),
        ("norm_values_decreasing", "norm_values", lambda ctx, a: a[::-1].copy()),
        ("norm_values_repeated", "norm_values", lambda ctx, a: _set(a, 7, a[6])),
        ("pq_codebooks_nan", "pq_codebooks", lambda ctx, a: _codebook_of_top(ctx, a, np.nan)),
        ("pq_codebooks_inf", "pq_codebooks", lambda ctx, a: _codebook_of_top(ctx, a, -np.inf)),
        ("doc_ids_offsets_beyond_blob", "doc_ids_offsets", lambda ctx, a: _set(a, -1, a[-1] + 5)),
        ("doc_ids_offsets_non_monotonic", "doc_ids_offsets", lambda ctx, a: _swap_offsets(ctx, a)),
        ("doc_ids_offsets_negative", "doc_ids_offsets", lambda ctx, a: _set(a, 1, -3)),
        ("doc_ids_invalid_utf8", "doc_ids_utf8", lambda ctx, a: _doc_id_bytes(ctx, a, ctx.env.top, b"\xff\xfe")),
        ("doc_ids_duplicate", "doc_ids_utf8",
         lambda ctx, a: _doc_id_bytes(ctx, a, ctx.env.top, f"d{ctx.env.top + 1}".encode()))]:
    add_case(_cid, _array_edit(_name, _edit))


# 6. every manifest field with a wrong type or value -----------------------------------------------------------
def _field(path, value, tok=()):
    def fn(ctx):
        ctx.edit(path, value)
        return tok
    return fn


def _deep_json(depth=100_000):
    return '{"format": "plaid-index", "format_version": 2, "arrays": ' + "[" * depth + "]" * depth + "}"


_FIELDS = [
    # id, path, value, extra Case arguments
    ("format_missing", ("format",), DEL, {}),
    ("format_other_name", ("format",), "plaid-index-v9", {}),
    ("format_null", ("format",), None, {}),
    ("format_version_1", ("format_version",), 1, dict(error="FormatVersionError")),
    ("format_version_4", ("format_version",), 4, dict(error="FormatVersionError")),
    ("format_version_2_over_version_3_arrays", ("format_version",), 2, dict(error="IndexCorruptError")),
    ("format_version_string", ("format_version",), "2", dict(error="FormatVersionError")),
    ("format_version_float", ("format_version",), 2.0, dict(error="FormatVersionError", verify=None)),
    ("format_version_true", ("format_version",), True, dict(error="FormatVersionError")),
    ("format_version_huge", ("format_version",), 10 ** 30, dict(error="FormatVersionError")),
    ("format_version_list", ("format_version",), [2], dict(error="FormatVersionError")),
    ("generation_negative", ("generation",), -1, dict(op="delete")),
    ("generation_missing", ("generation",), DEL, dict(op="delete")),
    ("generation_string", ("generation",), "2", dict(op="delete")),
    ("generation_huge", ("generation",), 10 ** 30, dict(op="delete", verify=None)),
    ("generation_float", ("generation",), 2.5, dict(op="delete")),
    ("generation_bool", ("generation",), True, dict(op="delete")),
    ("generation_null", ("generation",), None, dict(op="delete")),
    ("generation_older_than_files", ("generation",), 0, dict(op="add")),
    ("dim_missing", ("dim",), DEL, {}),
    ("dim_string", ("dim",), "32", {}),
    ("dim_zero", ("dim",), 0, {}),
    ("dim_negative", ("dim",), -32, {}),
    ("dim_huge", ("dim",), 10 ** 30, {}),
    ("dim_float", ("dim",), 32.5, {}),
    ("dim_bool", ("dim",), True, {}),
    ("dim_null", ("dim",), None, {}),
    ("dim_doubled", ("dim",), 64, {}),
    ("dim_halved", ("dim",), 16, {}),
    ("num_documents_missing", ("num_documents",), DEL, {}),
    ("num_documents_string", ("num_documents",), "80", {}),
    ("num_documents_negative", ("num_documents",), -80, {}),
    ("num_documents_huge", ("num_documents",), 10 ** 30, {}),
    ("num_documents_float", ("num_documents",), 80.5, {}),
    ("num_documents_bool", ("num_documents",), True, {}),
    ("num_documents_null", ("num_documents",), None, {}),
    ("num_documents_plus_one", ("num_documents",), 81, {}),
    ("num_documents_minus_one", ("num_documents",), 79, {}),
    ("num_documents_nan", ("num_documents",), float("nan"), {}),
    ("num_documents_infinity", ("num_documents",), float("inf"), {}),
    ("num_tokens_plus_one", ("num_tokens",), 623, {}),
    ("num_tokens_huge", ("num_tokens",), 10 ** 30, {}),
    ("num_tokens_string", ("num_tokens",), "622", {}),
    ("num_tokens_negative", ("num_tokens",), -622, {}),
    ("num_tokens_infinity", ("num_tokens",), float("inf"), {}),
    ("num_centroids_minus_one", ("num_centroids",), 43, {}),
    ("num_centroids_plus_one", ("num_centroids",), 45, {}),
    ("num_centroids_zero", ("num_centroids",), 0, {}),
    ("num_centroids_huge", ("num_centroids",), 10 ** 30, {}),
    ("num_centroids_string", ("num_centroids",), "44", {}),
    ("normalized_false_string", ("normalized",), "false", {}),
    ("normalized_false_lie", ("normalized",), False, {}),
    ("normalized_null", ("normalized",), None, {}),
    ("normalized_int", ("normalized",), 1, dict(verify=None)),
    ("normalized_missing", ("normalized",), DEL, {}),
    ("has_doc_ids_false_string", ("has_doc_ids",), "false", {}),
    ("has_doc_ids_false_lie", ("has_doc_ids",), False, {}),
    ("has_doc_ids_int", ("has_doc_ids",), 1, dict(verify=None)),
    ("has_doc_ids_null", ("has_doc_ids",), None, {}),
    ("has_doc_ids_missing", ("has_doc_ids",), DEL, {}),
    ("codec_unknown_name", ("codec", "name"), "opq", {}),
    ("codec_name_scalar", ("codec", "name"), "scalar", {}),
    ("codec_name_missing", ("codec", "name"), DEL, {}),
    ("codec_is_list", ("codec",), ["pq", 16, 8, 16], {}),
    ("codec_is_string", ("codec",), "pq", {}),
    ("codec_missing", ("codec",), DEL, {}),
    ("codec_null", ("codec",), None, {}),
    ("codec_code_bytes_8", ("codec", "code_bytes"), 8, {}),
    ("codec_code_bytes_missing", ("codec", "code_bytes"), DEL, {}),
    ("codec_code_bytes_string", ("codec", "code_bytes"), "16", {}),
    ("codec_m_string", ("codec", "m"), "16", {}),
    ("codec_m_zero", ("codec", "m"), 0, {}),
    ("codec_m_negative", ("codec", "m"), -16, {}),
    ("codec_m_huge", ("codec", "m"), 10 ** 30, {}),
    ("codec_m_missing", ("codec", "m"), DEL, {}),
    ("codec_nbits_4", ("codec", "nbits"), 4, {}),
    ("segments_dict", ("segments",), {}, {}),
    ("segments_empty", ("segments",), [], {}),
    ("segments_null", ("segments",), None, {}),
    ("segments_strings", ("segments",), ["seg0", "seg1"], {}),
    ("segment_name_missing", ("segments", 1, "name"), DEL, {}),
    ("segment_name_traversal", ("segments", 1, "name"), "../seg1", {}),
    ("segment_name_unknown", ("segments", 1, "name"), "seg7", {}),
    ("segment_name_not_string", ("segments", 1, "name"), 1, {}),
    ("segment_overlap", ("segments", 1, "doc_start"), 50, {}),
    ("segment_gap", ("segments", 1, "doc_start"), 61, {}),
    ("segment_short_of_num_documents", ("segments", 1, "doc_end"), 79, {}),
    ("segment_doc_end_huge", ("segments", 1, "doc_end"), 10 ** 30, {}),
    ("segment_doc_start_string", ("segments", 0, "doc_start"), "0", {}),
    ("segment_num_tokens_shifted", ("segments",),
     lambda: [{"name": "seg0", "doc_start": 0, "doc_end": 60, "num_tokens": 456},
              {"name": "seg1", "doc_start": 60, "doc_end": 80, "num_tokens": 166}], {}),
    ("segments_out_of_order", ("segments",),
     lambda: [{"name": "seg1", "doc_start": 60, "doc_end": 80, "num_tokens": 165},
              {"name": "seg0", "doc_start": 0, "doc_end": 60, "num_tokens": 457}], {}),
    ("segments_duplicated", ("segments",),
     lambda: [{"name": "seg0", "doc_start": 0, "doc_end": 60, "num_tokens": 457},
              {"name": "seg0", "doc_start": 0, "doc_end": 60, "num_tokens": 457},
              {"name": "seg1", "doc_start": 60, "doc_end": 80, "num_tokens": 165}], {}),
    ("segments_names_swapped", ("segments",),
     lambda: [{"name": "seg1", "doc_start": 0, "doc_end": 60, "num_tokens": 457},
              {"name": "seg0", "doc_start": 60, "doc_end": 80, "num_tokens": 165}], {}),
    ("next_segment_reused_0", ("next_segment",), 0, dict(op="add", must_fail=True)),
    ("next_segment_reused_1", ("next_segment",), 1, dict(op="add", must_fail=True)),
    ("next_segment_true_is_1", ("next_segment",), True, dict(op="add", must_fail=True)),
    ("next_segment_negative", ("next_segment",), -1, dict(op="add")),
    ("next_segment_string", ("next_segment",), "2", dict(op="add")),
    ("next_segment_float", ("next_segment",), 2.5, dict(op="add")),
    ("next_segment_huge", ("next_segment",), 10 ** 30, dict(op="add", verify=None)),
    ("next_segment_missing", ("next_segment",), DEL, dict(op="add")),
    ("next_segment_null", ("next_segment",), None, dict(op="add")),
    ("tombstones_name_missing_array", ("tombstones",), ["tombstones_g2", "tombstones_g9"], dict(op="delete")),
    ("tombstones_null", ("tombstones",), None, dict(op="delete")),
    ("tombstones_string", ("tombstones",), "tombstones_g2", dict(op="delete")),
    ("tombstones_dict", ("tombstones",), {"tombstones_g2": 3}, dict(op="delete")),
    ("tombstones_emptied", ("tombstones",), [], dict(op="delete")),
    ("tombstones_name_ivf", ("tombstones",), ["tombstones_g2", "ivf"], dict(op="delete")),
    ("tombstones_name_codes", ("tombstones",), ["seg0_codes"], dict(op="delete")),
    ("tombstones_duplicated", ("tombstones",), ["tombstones_g2", "tombstones_g2"], dict(op="delete", verify=None)),
    ("tombstones_missing", ("tombstones",), DEL, dict(op="delete")),
    ("num_deleted_zero", ("num_deleted",), 0, dict(op="delete")),
    ("num_deleted_huge", ("num_deleted",), 10 ** 30, dict(op="delete")),
    ("num_deleted_negative", ("num_deleted",), -5, dict(op="delete")),
    ("num_deleted_string", ("num_deleted",), "3", dict(op="delete")),
    ("num_deleted_beyond_num_documents", ("num_deleted",), 85, dict(op="delete")),
    ("num_deleted_null", ("num_deleted",), None, dict(op="delete")),
    ("num_deleted_float", ("num_deleted",), 3.5, dict(op="delete")),
    ("num_deleted_missing", ("num_deleted",), DEL, dict(op="delete")),
    ("arrays_list", ("arrays",), lambda: [], {}),
    ("arrays_null", ("arrays",), None, {}),
    ("arrays_entry_null", ("arrays", "ivf"), None, {}),
    ("arrays_entry_string", ("arrays", "ivf"), "ivf.1.npy", {}),
    ("arrays_entry_missing", ("arrays", "ivf"), DEL, {}),
    ("arrays_entry_without_file", ("arrays", "ivf", "file"), DEL, {}),
    ("arrays_entry_without_dtype", ("arrays", "ivf", "dtype"), DEL, {}),
    ("arrays_entry_without_shape", ("arrays", "ivf", "shape"), DEL, {}),
    ("arrays_entry_without_bytes", ("arrays", "ivf", "bytes"), DEL, {}),
    ("arrays_entry_without_crc32", ("arrays", "ivf", "crc32"), DEL, {}),
    ("arrays_bytes_string", ("arrays", "ivf", "bytes"), "1292", {}),
    ("arrays_bytes_negative", ("arrays", "ivf", "bytes"), -1, {}),
    ("arrays_bytes_float", ("arrays", "doclens", "bytes"), 448.0, {}),
    ("arrays_shape_int", ("arrays", "ivf", "shape"), 370, {}),
    ("arrays_shape_string", ("arrays", "ivf", "shape"), "[370]", {}),
    ("arrays_shape_negative", ("arrays", "ivf", "shape"), [-1], {}),
    ("arrays_dtype_garbage", ("arrays", "ivf", "dtype"), "<x9", {}),
    ("arrays_dtype_object", ("arrays", "ivf", "dtype"), "|O", {}),
    ("arrays_dtype_not_string", ("arrays", "ivf", "dtype"), 4, {}),
    ("arrays_crc32_string", ("arrays", "ivf", "crc32"), "0", {}),
    ("arrays_crc32_negative", ("arrays", "ivf", "crc32"), -1, {}),
    ("arrays_extra_entry_missing_file", ("arrays", "zzz"),
     {"file": "zzz.1.npy", "dtype": "<i4", "shape": [1], "bytes": 132, "crc32": 0}, {}),
    ("num_empty_documents_negative", ("num_empty_documents",), -1, dict(verify=None)),
    ("num_empty_documents_huge", ("num_empty_documents",), 10 ** 30, dict(verify=None)),
    ("outlier_norm_string", ("outlier_residual_norm",), "x", dict(op="add", relaxed=True, verify=None)),
    ("outlier_norm_negative", ("outlier_residual_norm",), -1.0, dict(op="add", relaxed=True, verify=None)),
    ("outlier_norm_nan", ("outlier_residual_norm",), float("nan"), dict(op="add", relaxed=True, verify=None)),
    ("build_is_list", ("build",), [], dict(op="add", relaxed=True, verify=None)),
    ("build_seed_string", ("build", "seed"), "x", dict(op="add", relaxed=True, verify=None)),
    ("created_by_int", ("created_by",), 5, dict(verify=None)),
    # token pooling (optional in format 2: absent or null = unpooled); a record this plaid cannot
    # reproduce is refused on opening, so an add can never pool new documents differently
    ("pooling_null", ("pooling",), None, dict(op="add", verify=None)),
    ("pooling_string", ("pooling",), "ward", dict(op="add", must_fail=True)),
    ("pooling_list", ("pooling",), ["ward", 2], dict(op="add", must_fail=True)),
    ("pooling_true", ("pooling",), True, dict(op="add", must_fail=True)),
    ("pooling_empty_object", ("pooling",), {}, dict(op="add", must_fail=True)),
    ("pooling_method_unknown", ("pooling",), {"method": "kmeans", "factor": 2}, dict(op="add", must_fail=True)),
    ("pooling_method_upper", ("pooling",), {"method": "Ward", "factor": 2}, dict(op="add", must_fail=True)),
    ("pooling_method_int", ("pooling",), {"method": 1, "factor": 2}, dict(op="add", must_fail=True)),
    ("pooling_method_missing", ("pooling",), {"factor": 2}, dict(op="add", must_fail=True)),
    ("pooling_factor_missing", ("pooling",), {"method": "ward"}, dict(op="add", must_fail=True)),
    ("pooling_factor_string", ("pooling",), {"method": "ward", "factor": "2"}, dict(op="add", must_fail=True)),
    ("pooling_factor_nan_string", ("pooling",), {"method": "ward", "factor": "NaN"}, dict(op="add", must_fail=True)),
    ("pooling_factor_nan", ("pooling",), {"method": "ward", "factor": float("nan")}, dict(op="add", must_fail=True)),
    ("pooling_factor_infinity", ("pooling",), {"method": "ward", "factor": float("inf")},
     dict(op="add", must_fail=True)),
    ("pooling_factor_negative", ("pooling",), {"method": "ward", "factor": -2}, dict(op="add", must_fail=True)),
    ("pooling_factor_zero", ("pooling",), {"method": "ward", "factor": 0}, dict(op="add", must_fail=True)),
    ("pooling_factor_one", ("pooling",), {"method": "ward", "factor": 1}, dict(op="add", must_fail=True)),
    ("pooling_factor_below_one", ("pooling",), {"method": "ward", "factor": 0.5}, dict(op="add", must_fail=True)),
    ("pooling_factor_bool", ("pooling",), {"method": "ward", "factor": True}, dict(op="add", must_fail=True)),
    ("pooling_factor_huge", ("pooling",), {"method": "ward", "factor": 10 ** 30}, dict(op="add", must_fail=True)),
    ("pooling_factor_null", ("pooling",), {"method": "ward", "factor": None}, dict(op="add", must_fail=True)),
    ("pooling_extra_field", ("pooling",), {"method": "ward", "factor": 2, "threshold": 0.5},
     dict(op="add", must_fail=True)),
    # a valid record on an unpooled index: search is unaffected, add pools the new documents
    ("pooling_claimed", ("pooling",), {"method": "ward", "factor": 2}, dict(op="add", relaxed=True, verify=None)),
    # the default search depth (absent or null = 1); anything else than {"depth": 1..64} is refused
    ("search_null", ("search",), None, dict(op="add", verify=None)),
    ("search_string", ("search",), "deep", dict(op="add", must_fail=True)),
    ("search_list", ("search",), [4], dict(op="add", must_fail=True)),
    ("search_empty_object", ("search",), {}, dict(op="add", must_fail=True)),
    ("search_depth_string", ("search",), {"depth": "4"}, dict(op="add", must_fail=True)),
    ("search_depth_float", ("search",), {"depth": 4.0}, dict(op="add", must_fail=True)),
    ("search_depth_bool", ("search",), {"depth": True}, dict(op="add", must_fail=True)),
    ("search_depth_zero", ("search",), {"depth": 0}, dict(op="add", must_fail=True)),
    ("search_depth_negative", ("search",), {"depth": -4}, dict(op="add", must_fail=True)),
    ("search_depth_huge", ("search",), {"depth": 10 ** 30}, dict(op="add", must_fail=True)),
    ("search_depth_null", ("search",), {"depth": None}, dict(op="add", must_fail=True)),
    ("search_extra_field", ("search",), {"depth": 2, "ndocs": 99}, dict(op="add", must_fail=True)),
    # a valid record: searches keep more candidates (results may differ), add carries it over
    ("search_depth_claimed", ("search",), {"depth": 64}, dict(op="add", relaxed=True, verify=None)),
    ("unknown_extra_field", ("zzz_unknown",), {"x": [1, 2]}, dict(verify=None)),
]

for _cid, _path, _value, _kw in _FIELDS:
    _kw = dict(_kw)
    _tok = _kw.pop("verify", ())
    add_case(f"manifest_{_cid}", _field(_path, _value, _tok), **_kw)


def _raw(text_fn, tok=()):
    def fn(ctx):
        write_manifest(ctx.idx, None, raw=text_fn(ctx))
        return tok
    return fn


def _manifest_text(ctx):
    return open(os.path.join(ctx.env.pristine, "manifest.json")).read()


for _cid, _text, _kw in [
        ("json_deeply_nested", lambda ctx: _deep_json(), {}),
        ("json_int_with_5000_digits", lambda ctx: _manifest_text(ctx).replace('"num_documents": 80',
                                                                            '"num_documents": ' + "8" * 5000), {}),
        ("json_nan_literal", lambda ctx: _manifest_text(ctx).replace('"num_tokens": 622', '"num_tokens": NaN'), {}),
        ("json_float_overflow", lambda ctx: _manifest_text(ctx).replace('"num_tokens": 622', '"num_tokens": 1e999'),
         {}),
        ("json_duplicate_key", lambda ctx: _manifest_text(ctx).replace('"num_documents": 80',
                                                                     '"num_documents": 80, "num_documents": 81'), {}),
        ("json_utf8_bom", lambda ctx: "\ufeff" + _manifest_text(ctx), dict(verify=None)),
        ("json_top_level_string", lambda ctx: '"plaid-index"', {}),
        ("json_empty_object", lambda ctx: "{}", {})]:
    _kw = dict(_kw)
    _tok = _kw.pop("verify", ())
    add_case(f"manifest_{_cid}", _raw(_text, _tok), **_kw)


# 7. links and special files planted under the names the next commit will write ---------------------------------
def _plant(kind: str, name_fn, target_exists: bool):
    def fn(ctx):
        name = name_fn(ctx)
        full = os.path.join(ctx.idx, name)
        target = os.path.join(ctx.outside, f"target-of-{name}")
        if os.path.lexists(full):  # .plaid-lock, copied with the pristine index
            os.remove(full)
        if target_exists:
            ctx.outside_file(os.path.basename(target), b"user data that must stay as it is\n")
        if kind == "symlink":
            os.symlink(target, full)
        elif kind == "hardlink":
            os.link(target, full)
        elif kind == "fifo":
            os.mkfifo(full)
        elif kind == "dir":
            os.mkdir(full)
        return None
    return fn


_NEXT = {
    "tombstones": lambda ctx: f"tombstones_g{ctx.g1}.{ctx.g1}.npy",
    "manifest_tmp": lambda ctx: f"manifest.json.{ctx.g1}.tmp",
    "seg_codes": lambda ctx: f"{ctx.next_seg}_codes.{ctx.g1}.npy",
    "seg_residuals": lambda ctx: f"{ctx.next_seg}_residuals.{ctx.g1}.npy",
    "seg_norms": lambda ctx: f"{ctx.next_seg}_norms.{ctx.g1}.npy",
    "ivf": lambda ctx: f"ivf.{ctx.g1}.npy",
    "ivf_offsets": lambda ctx: f"ivf_offsets.{ctx.g1}.npy",
    "doclens": lambda ctx: f"doclens.{ctx.g1}.npy",
    "doc_ids_utf8": lambda ctx: f"doc_ids_utf8.{ctx.g1}.npy",
    "doc_ids_offsets": lambda ctx: f"doc_ids_offsets.{ctx.g1}.npy",
    "centroids": lambda ctx: f"centroids.{ctx.g1}.npy",
    "bucket_weights": lambda ctx: f"bucket_weights.{ctx.g1}.npy",
    "rebuilt_seg0_codes": lambda ctx: f"seg0_codes.{ctx.g1}.npy",
    "lock": lambda ctx: ".plaid-lock",
}

for _op, _what, _kind, _exists in [
        ("delete", "tombstones", "symlink", False), ("delete", "tombstones", "symlink", True),
        ("delete", "manifest_tmp", "symlink", False), ("delete", "manifest_tmp", "symlink", True),
        ("delete", "lock", "symlink", False), ("delete", "lock", "symlink", True),
        ("add", "lock", "symlink", False),
        ("add", "seg_codes", "symlink", False), ("add", "seg_residuals", "symlink", True),
        ("add", "seg_norms", "symlink", False), ("add", "ivf", "symlink", True),
        ("add", "ivf_offsets", "symlink", False), ("add", "doclens", "symlink", True),
        ("add", "doc_ids_utf8", "symlink", False), ("add", "doc_ids_offsets", "symlink", True),
        ("add", "centroids", "symlink", False), ("add", "manifest_tmp", "symlink", False),
        ("compact", "seg_codes", "symlink", True), ("compact", "seg_residuals", "symlink", False),
        ("compact", "doclens", "symlink", False), ("compact", "tombstones", "symlink", True),
        ("compact", "manifest_tmp", "symlink", True),
        ("overwrite", "rebuilt_seg0_codes", "symlink", False), ("overwrite", "bucket_weights", "symlink", True),
        ("overwrite", "manifest_tmp", "symlink", False),
        ("delete", "tombstones", "hardlink", True), ("add", "doclens", "hardlink", True),
        ("compact", "seg_codes", "hardlink", True), ("overwrite", "manifest_tmp", "hardlink", True),
        ("delete", "tombstones", "fifo", False), ("add", "ivf", "fifo", False),
        ("compact", "manifest_tmp", "fifo", False), ("delete", "lock", "fifo", False),
        ("delete", "tombstones", "dir", False), ("add", "manifest_tmp", "dir", False), ("delete", "lock", "dir", False)]:
    _suffix = {"symlink": "_to_existing" if _exists else "_to_missing"}.get(_kind, "")
    add_case(f"plant_{_kind}_{_what}{_suffix}_then_{_op}", _plant(_kind, _NEXT[_what], _exists),
             read=False, op=_op, error="PlaidError")


# 8. the user's own files beside the index --------------------------------------------------------------------------
def _foreign(which: str):
    def fn(ctx):
        files = {}
        if which in ("all", "abort"):
            files["notes.txt"] = b"my notes about this index\n"
            files["manifest.json.bak"] = open(os.path.join(ctx.idx, "manifest.json"), "rb").read()
            files[os.path.join("subdir", "keep.txt")] = b"kept\n"
        if which in ("all", "plaid_like"):
            files["foo.1.npy"] = npy_bytes(np.arange(5, dtype=np.int32))
            files["centroids.99.npy"] = npy_bytes(np.zeros((2, 2), np.float16))
        if which == "plaid_like":
            files["seg0_codes.7.npy"] = npy_bytes(np.arange(3, dtype=np.uint16))
            files[f"doclens.{ctx.g1 + 1}.npy"] = npy_bytes(np.arange(3, dtype=np.int32))
        if which == "abort":  # names a failing writer of generation g+1 cleans up after itself
            files[f"foo.{ctx.g1}.npy"] = npy_bytes(np.arange(5, dtype=np.int32))
            files[f"notes.{ctx.g1}.tmp"] = b"a user's temporary file\n"
        for rel, data in files.items():
            full = os.path.join(ctx.idx, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
        return None
    return fn


for _cid, _which, _op in [("foreign_files_then_delete", "all", "delete"), ("foreign_files_then_add", "all", "add"),
                          ("foreign_files_then_compact", "all", "compact"),
                          ("foreign_files_then_overwrite", "all", "overwrite"),
                          ("foreign_plaid_like_names_then_add", "plaid_like", "add"),
                          ("foreign_plaid_like_names_then_compact", "plaid_like", "compact"),
                          ("foreign_plaid_like_names_then_overwrite", "plaid_like", "overwrite"),
                          ("foreign_next_generation_names_then_failed_add", "abort", "add_bad")]:
    add_case(_cid, _foreign(_which), read=False, op=_op, foreign=True)


# 9. the command line on damaged folders: exit code 2, one line on stderr ------------------------------------------------
for _cid, _base, _cmd in [("cli_verify_codes_equal_num_centroids", "codes_equal_num_centroids", "verify"),
                          ("cli_verify_traversal_relative", "traversal_relative_doclens", "verify"),
                          ("cli_verify_symlink_outside_identical", "symlink_outside_identical_seg0_codes", "verify"),
                          ("cli_verify_fifo_manifest", "fifo_manifest", "verify"),
                          ("cli_verify_codec_m_zero", "manifest_codec_m_zero", "verify"),
                          ("cli_verify_norms_nan", "norms_nan", "verify"),
                          ("cli_info_format_version_4", "manifest_format_version_4", "info"),
                          ("cli_info_pooling_method_unknown", "manifest_pooling_method_unknown", "info"),
                          ("cli_search_pooling_factor_nan_string", "manifest_pooling_factor_nan_string", "search"),
                          ("cli_info_segments_null", "manifest_segments_null", "info"),
                          ("cli_info_json_deeply_nested", "manifest_json_deeply_nested", "info"),
                          ("cli_search_codes_equal_num_centroids", "codes_equal_num_centroids", "search"),
                          ("cli_search_directory_manifest", "directory_manifest", "search"),
                          ("cli_search_segments_strings", "manifest_segments_strings", "search"),
                          ("cli_search_doc_ids_invalid_utf8", "doc_ids_invalid_utf8", "search")]:
    add_case(_cid, CASES[_base].setup, cli=_cmd, read=False)


# -- running a case ---------------------------------------------------------------------------------------------------------
def _diff(a: dict, b: dict) -> str:
    for i, (x, y) in enumerate(zip(a["ids"], b["ids"])):
        if x != y:
            return f"query {i}: ids {x} instead of {y}"
    for i, (x, y) in enumerate(zip(a["doc_ids"], b["doc_ids"])):
        if x != y:
            return f"query {i}: doc_ids {x} instead of {y}"
    for i, (x, y) in enumerate(zip(a["scores"], b["scores"])):
        if not np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)):
            return f"query {i}: scores {x} instead of {y}"
    return "?"


def check_answer(label: str, r: dict, c: Case, ref: dict) -> List[str]:
    if r["ok"]:
        if same_answer(r["value"], ref):
            return [] if c.correct_ok else [f"{label}: answered instead of refusing with {c.error}"]
        return [f"{label}: WRONG ANSWER ({_diff(r['value'], ref)})"]
    if not r["plaid"]:
        return [f"{label}: {r['type']} (not a PlaidError): {r['msg'][:200]}"]
    if c.error not in r["mro"]:
        return [f"{label}: {r['type']} instead of {c.error}: {r['msg'][:160]}"]
    return []


def check_verify(r: dict, tok) -> List[str]:
    if not r["ok"]:
        return [] if r["plaid"] else [f"verify: {r['type']} (not a PlaidError): {r['msg'][:200]}"]
    problems = r["value"]
    if tok is None:
        return []
    if not problems:
        return ["verify() = [] (damage not reported)"]
    if tok and not any(t in p for p in problems for t in tok):
        return [f"verify() does not name {tok[0]!r}: {problems}"[:300]]
    return []


def check_len(r: dict, expected: int) -> List[str]:
    if r["ok"]:
        return [] if r["value"] == expected else [f"len(Index) = {r['value']}, expected {expected}"]
    return [] if r["plaid"] else [f"len: {r['type']} (not a PlaidError): {r['msg'][:200]}"]


def run_case(c: Case, ctx: Ctx, tok) -> List[str]:
    env, idx = ctx.env, ctx.idx
    steps: List[list] = []
    if c.cli:
        extra = ["--query-embeddings", env.qdir, "--k", str(K), "--quiet"] if c.cli == "search" else []
        steps.append(["cli", [c.cli, idx] + extra])
    if c.read:
        steps += [["search", idx, "numpy", K], ["search", idx, "torch", K], ["verify", idx], ["len", idx]]
    if c.op:
        steps += [_op_step(c.op, idx), ["search", idx, "numpy", K], ["len", idx], ["verify", idx]]
    manifest_before = open(os.path.join(idx, "manifest.json"), "rb").read() \
        if os.path.isfile(os.path.join(idx, "manifest.json")) else None
    reply = env.worker.call(steps, timeout=TIMEOUT)
    if os.environ.get("PLAID_HOSTILE_TIMES"):
        print("TIMES", c.id, [(s[0], r.get("s")) for s, r in zip(steps, reply.results)], file=sys.stderr)
    if reply.status != "done":
        return [reply.describe(steps)]
    res = list(reply.results)
    issues: List[str] = []
    pristine = env.ref["pristine"]
    if c.cli:
        r = res.pop(0)
        if not r["ok"]:
            issues.append(f"plaid {c.cli}: traceback {r['type']}: {r['msg'][:200]}")
        else:
            lines = [x for x in r["value"]["stderr"].splitlines() if x.strip()]
            if r["value"]["rc"] != 2 or len(lines) != 1:
                issues.append(f"plaid {c.cli}: exit code {r['value']['rc']}, {len(lines)} stderr line(s) "
                              f"{lines[:2]}, stdout {r['value']['stdout'][:120]!r}")
    s_np = None
    if c.read:
        s_np, s_t, ver, length = res[:4]
        res = res[4:]
        issues += check_answer("search[numpy]", s_np, c, pristine["numpy"])
        issues += check_answer("search[torch]", s_t, c, pristine["torch"])
        issues += check_verify(ver, tok)
        issues += check_len(length, pristine["len"])
    if c.op:
        op, search, length, ver = res
        label = c.op if c.op != "add_bad" else "add (of documents with the wrong dim)"
        if op["ok"]:
            if c.must_fail or c.op == "add_bad":
                issues.append(f"{label} succeeded but must raise a PlaidError")
            after = env.ref.get(c.op, pristine)
        else:
            after = pristine
            if manifest_before is not None and (not os.path.isfile(os.path.join(idx, "manifest.json")) or open(
                    os.path.join(idx, "manifest.json"), "rb").read() != manifest_before):
                issues.append(f"the refused {label} changed manifest.json")
            if not op["plaid"]:
                issues.append(f"{label}: {r_type(op)} (not a PlaidError): {op['msg'][:200]}")
            elif c.foreign and not (c.op == "overwrite" and "IndexExistsError" in op["mro"]) and c.op != "add_bad":
                issues.append(f"{label} failed on a healthy index with foreign files: {op['type']}: {op['msg'][:160]}")
            elif c.op == "add_bad" and "InvalidInputError" not in op["mro"]:
                issues.append(f"{label}: {op['type']} instead of InvalidInputError")
        state = "after a successful" if op["ok"] else "after a refused"
        if not op["ok"] and s_np is not None:
            # refused on a damaged index: the index must answer as it did before the attempt
            if s_np["ok"] != search["ok"] or (s_np["ok"] and not same_answer(search["value"], s_np["value"])):
                issues.append(f"search {state} {label} differs from before it: {describe_result(search)}")
        elif not search["ok"]:
            issues.append(f"search {state} {label}: {describe_result(search)}")
        elif not (c.relaxed and op["ok"]) and not same_answer(search["value"], after["numpy"]):
            issues.append(f"search {state} {label}: WRONG ANSWER ({_diff(search['value'], after['numpy'])})")
        if op["ok"] or s_np is None:
            if not length["ok"] or length["value"] != after["len"]:
                issues.append(f"len {state} {label}: {describe_result(length)}, expected {after['len']}")
        if not ver["ok"] and not ver["plaid"]:
            issues.append(f"verify {state} {label}: {describe_result(ver)}")
        if op["ok"]:
            folder = folder_problems(idx)
            issues += [f"{state} {label}: {p}" for p in folder]
            if not folder and ver["ok"]:  # problems with the files the new manifest references
                files = {e["file"] for e in read_manifest(idx)["arrays"].values()}
                named = [p for p in ver["value"] if any(f in p for f in files)]
                if named:
                    issues.append(f"verify {state} {label} reports {named}"[:300])
    return issues


def r_type(r: dict) -> str:
    return r.get("type", "?")


@pytest.mark.parametrize("cid", list(CASES))
def test_hostile(env, tmp_path, cid):
    c = CASES[cid]
    if c.skip is not None and c.skip():
        pytest.skip(c.skip())
    ctx = Ctx(env, str(tmp_path))
    tok = c.setup(ctx)
    outside_before = snapshot_tree(ctx.root, skip=ctx.idx)
    inside_before = snapshot_tree(ctx.idx) if c.foreign else None
    issues = run_case(c, ctx, tok)
    issues += [f"outside the index: {x}" for x in tree_changes(outside_before, snapshot_tree(ctx.root, skip=ctx.idx))]
    if c.foreign:
        after = snapshot_tree(ctx.idx)
        for rel, before in inside_before.items():
            if rel in ("manifest.json", ".plaid-lock", ".plaid-journal") or rel.split(os.sep)[0] in {
                    e["file"] for e in env.m["arrays"].values()}:
                continue
            if after.get(rel) != before:
                issues.append(f"foreign file {rel} was {'REMOVED' if rel not in after else 'CHANGED'}")
    assert not issues, " | ".join(issues)


def test_case_count():
    """The suite keeps at least 60 distinct hostile cases."""
    assert len(CASES) >= 60

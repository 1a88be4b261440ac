"""A sharded index on disk: N ordinary plaid index folders sharing one codec, and a manifest of its own.

Layout::

    sharded/
      sharded.json     the sharded manifest: the commit point (below)
      (lock file)      the sharded writer lock (plaid.store.writer_lock, plaid.store.LOCK_FILE)
      shard-0/         an ordinary plaid index folder (docs/FORMAT.md), written through plaid.store
      shard-1/
      ...

**Global ids.** A document's global id is its position in the order documents were given to the
sharded index: the build's input order, then each ``add`` — exactly the internal ids one index
over the same documents would give them, and never reused. Every shard numbers its own documents
``0..n-1`` (local ids). The manifest's ``routing`` maps one to the other as runs
``[first global id, shard, first local id, count]``: a build writes one run per shard
(contiguous ranges of the input), each ``add`` one more (its documents go to one shard). Every
global id lies in exactly one run, and each shard's runs tile its local ids ``0..n-1``.

**Commit.** ``sharded.json`` is plain JSON, written to ``sharded.json.<generation>.tmp``
(created exclusively, never through a link), fsynced, then linked into place (a new index:
exclusive, so two builds cannot both commit) or renamed over the old one (an update), and the
directory fsynced. A reader sees the previous manifest or the new one. Writers hold the sharded
lock; each shard's own commits are atomic as for any index. The manifest records, per shard,
the generation and the number of (routed) documents it serves.

**What can be found on opening** (each refused naming the shard): a shard folder missing, not a
plaid index or of another format version, a codec whose fingerprint (centroids as trained, codec
arrays and parameters, dim, normalisation) differs from the manifest's, a shard at an older
generation or with fewer documents than recorded (rolled back), duplicate external ids across
shards (:meth:`ShardedIndex.verify`, and the sharded searcher when it opens).

**A shard ahead of the manifest** (an ``add`` killed between the shard's commit and the sharded
one, or a change made to a shard folder directly): its extra documents have no global id. The
sharded searcher never returns them; the next sharded write deletes them in the shard (so an
interrupted ``add`` is undone) and records the shard's generation. A shard ahead by deletions
only is served as it is.

Nothing here imports Ray: updates (add, delete, compact) run in the calling process.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..codecs import check_codec_params
from ..errors import (FormatVersionError, IndexCorruptError, IndexExistsError, IndexNotFoundError, InvalidInputError,
                      PlaidError)
from ..store import MAX_SEARCH_DEPTH, check_doc_ids, fsync_dir, is_own_name, read_manifest, writer_lock

__all__ = ["SHARDED_MANIFEST", "SHARDED_FORMAT", "SHARDED_FORMAT_VERSION", "ShardEntry", "ShardedManifest",
           "Routing", "ShardedIndex", "is_sharded", "read_sharded_manifest", "commit_sharded_manifest",
           "shard_name", "check_shard"]

logger = logging.getLogger(__name__)

SHARDED_MANIFEST = "sharded.json"
SHARDED_FORMAT = "plaid-sharded-index"
SHARDED_FORMAT_VERSION = 1
#: Shard folder names: ``shard-<i>``, i a plain decimal number.
SHARD_NAME_RE = re.compile(r"^shard-(0|[1-9][0-9]{0,8})$")
_TMP_RE = re.compile(r"^sharded\.json\.(\d+)\.tmp$")
#: A sharded manifest larger than this is refused unread (a run per add: megabytes at most).
SHARDED_MANIFEST_MAX_BYTES = 64 << 20
#: Largest count a manifest may hold (exact in JSON doubles).
MAX_COUNT = 1 << 53
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def shard_name(i: int) -> str:
    return f"shard-{int(i)}"


def is_sharded(path) -> bool:
    """Whether ``path`` is a folder holding a sharded index's manifest."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, SHARDED_MANIFEST))


# -- the manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """One shard: its folder name, the generation served and its number of (routed) documents."""

    name: str
    generation: int
    num_documents: int

    def to_json(self) -> dict:
        return {"name": self.name, "generation": self.generation, "num_documents": self.num_documents}


@dataclass(frozen=True)
class ShardedManifest:
    """The checked content of ``sharded.json`` (see the module docstring)."""

    generation: int
    dim: int
    num_documents: int
    has_doc_ids: bool
    codec: Dict[str, Any]
    normalized: bool
    codec_fingerprint: str
    max_shard_documents: Optional[int]
    next_shard: int
    shards: Tuple[ShardEntry, ...]
    routing: Tuple[Tuple[int, int, int, int], ...]
    created_by: str = ""
    build: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": SHARDED_FORMAT, "format_version": SHARDED_FORMAT_VERSION, "generation": self.generation,
                "created_by": self.created_by, "dim": self.dim, "num_documents": self.num_documents,
                "has_doc_ids": self.has_doc_ids, "codec": dict(self.codec), "normalized": self.normalized,
                "codec_fingerprint": self.codec_fingerprint, "max_shard_documents": self.max_shard_documents,
                "next_shard": self.next_shard, "shards": [s.to_json() for s in self.shards],
                "routing": [list(r) for r in self.routing], "build": dict(self.build)}

    @property
    def search_depth(self) -> int:
        """The depth every shard is searched at (``build.search_depth``, checked on reading; 1 when absent)."""
        return int(self.build.get("search_depth") or 1)

    def shard_index(self, name: str) -> int:
        for i, s in enumerate(self.shards):
            if s.name == name:
                return i
        raise KeyError(name)


class _Fields:
    def __init__(self, obj: Any, where: str, prefix: str = ""):
        if not isinstance(obj, dict):
            raise IndexCorruptError(f"{where}: {prefix.rstrip('.') or 'the sharded manifest'} must be a JSON object")
        self.obj, self.where, self.prefix = obj, where, prefix

    def bad(self, key, why: str) -> IndexCorruptError:
        return IndexCorruptError(f"{self.where}: field {self.prefix}{key} {why}")

    def get(self, key: str):
        if key not in self.obj:
            raise self.bad(key, "is missing")
        return self.obj[key]

    def int(self, key: str, lo: int = 0, hi: int = MAX_COUNT, optional: bool = False) -> Optional[int]:
        v = self.get(key)
        if optional and v is None:
            return None
        if type(v) is not int:
            raise self.bad(key, f"must be an integer, got {v!r:.60}")
        if not lo <= v <= hi:
            raise self.bad(key, f"= {v} is out of range [{lo}, {hi}]")
        return v

    def bool(self, key: str) -> bool:
        v = self.get(key)
        if type(v) is not bool:
            raise self.bad(key, f"must be true or false, got {v!r:.60}")
        return v

    def str(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str):
            raise self.bad(key, f"must be a string, got {v!r:.60}")
        return v


def parse_sharded_manifest(raw: Any, where: str) -> ShardedManifest:
    """Check every field of a sharded manifest read from ``where``; an :class:`IndexCorruptError`
    (or :class:`FormatVersionError`) names the first bad one."""
    f = _Fields(raw, where)
    if f.get("format") != SHARDED_FORMAT:
        raise f.bad("format", f"= {raw.get('format')!r:.60} is not {SHARDED_FORMAT!r}")
    version = f.int("format_version", 0, MAX_COUNT)
    if version != SHARDED_FORMAT_VERSION:
        hint = "upgrade plaid to read it" if version > SHARDED_FORMAT_VERSION else "rebuild it with this plaid"
        raise FormatVersionError(f"{where}: sharded index format version {version}; this plaid reads version "
                                 f"{SHARDED_FORMAT_VERSION} ({hint})")
    generation = f.int("generation")
    dim = f.int("dim", 1, 1 << 20)
    num_documents = f.int("num_documents")
    try:
        codec = check_codec_params(dim, f.get("codec"))
    except ValueError as e:
        raise f.bad("codec", f"is invalid ({e})") from None
    fp = f.str("codec_fingerprint")
    if not _HEX64.match(fp):
        raise f.bad("codec_fingerprint", "must be 64 lowercase hexadecimal digits")
    max_docs = f.int("max_shard_documents", 1, MAX_COUNT, optional=True)
    next_shard = f.int("next_shard", 1, 10**9)
    shards_raw = f.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise f.bad("shards", "must be a non-empty list")
    shards, names = [], set()
    for i, s in enumerate(shards_raw):
        g = _Fields(s, where, f"shards[{i}].")
        name = g.str("name")
        m = SHARD_NAME_RE.match(name)
        if not m:
            raise g.bad("name", f"= {name!r:.60} is not a shard folder name (shard-<i>)")
        if name in names:
            raise g.bad("name", f"= {name!r} names a shard twice")
        if int(m.group(1)) >= next_shard:
            raise g.bad("name", f"= {name!r} is not below next_shard = {next_shard}")
        names.add(name)
        shards.append(ShardEntry(name, g.int("generation"), g.int("num_documents")))
    routing_raw = f.get("routing")
    if not isinstance(routing_raw, list):
        raise f.bad("routing", "must be a list")
    runs = []
    expect = 0
    for i, r in enumerate(routing_raw):
        if not (isinstance(r, list) and len(r) == 4 and all(type(x) is int and 0 <= x <= MAX_COUNT for x in r)):
            raise f.bad(f"routing[{i}]", "must be [first global id, shard, first local id, count] (integers)")
        start, shard, local, count = r
        if start != expect:
            raise f.bad(f"routing[{i}]", f"starts at global id {start}, expected {expect} (runs must be contiguous)")
        if shard >= len(shards) or count == 0:
            raise f.bad(f"routing[{i}]", f"names shard {shard} of {len(shards)} or holds no documents")
        runs.append((start, shard, local, count))
        expect += count
    if expect != num_documents:
        raise f.bad("routing", f"covers {expect} global ids, not num_documents = {num_documents}")
    for j, s in enumerate(shards):
        mine = sorted((local, count) for _, shard, local, count in runs if shard == j)
        pos = 0
        for local, count in mine:
            if local != pos:
                raise f.bad("routing", f"does not tile the local ids of {s.name} (a gap or an overlap at {pos})")
            pos += count
        if pos != s.num_documents:
            raise f.bad("routing", f"routes {pos} documents of {s.name}, whose entry says {s.num_documents}")
    build = f.get("build") if "build" in raw else {}
    if not isinstance(build, dict):
        raise f.bad("build", "must be a JSON object")
    if build.get("search_depth") is not None:  # read back by searches and add() (absent or null: 1)
        _Fields(build, where, "build.").int("search_depth", 1, MAX_SEARCH_DEPTH)
    created_by = raw.get("created_by", "")
    return ShardedManifest(generation=generation, dim=dim, num_documents=num_documents,
                           has_doc_ids=f.bool("has_doc_ids"), codec=codec, normalized=f.bool("normalized"),
                           codec_fingerprint=fp, max_shard_documents=max_docs, next_shard=next_shard,
                           shards=tuple(shards), routing=tuple(runs),
                           created_by=created_by if isinstance(created_by, str) else "", build=build)


def _read_plain(path: str, name: str, limit: int) -> bytes:
    """The bytes of the regular file ``path/name`` (never through a link, a FIFO cannot block)."""
    full = os.path.join(path, name)
    try:
        fd = os.open(full, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise IndexNotFoundError(f"no sharded index at {path}: no {name}") from None
    except OSError as e:
        raise IndexCorruptError(f"{full} cannot be opened ({e.strerror}; plaid never follows links)") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IndexCorruptError(f"{full} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise IndexCorruptError(f"{full} is larger than {limit} bytes: not a sharded manifest")
    return data


def read_sharded_manifest(path) -> ShardedManifest:
    """Read and check ``sharded.json`` of the sharded index at ``path``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise IndexNotFoundError(f"no sharded index at {path}: the directory does not exist")
    data = _read_plain(path, SHARDED_MANIFEST, SHARDED_MANIFEST_MAX_BYTES)
    where = os.path.join(path, SHARDED_MANIFEST)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexCorruptError(f"{where} is not valid JSON ({str(e)[:200]})") from None
    return parse_sharded_manifest(raw, where)


def commit_sharded_manifest(path: str, m: ShardedManifest, *, new: bool) -> ShardedManifest:
    """Write ``m`` as ``path/sharded.json`` atomically (hold the sharded lock).

    The temporary file is created exclusively without following links; ``new``: the manifest
    must not exist yet (linked into place, so a concurrent first commit fails), else it is
    renamed over the old one. Returns ``m`` as read back.
    """
    data = (json.dumps(m.to_json(), indent=1) + "\n").encode("utf-8")
    m = parse_sharded_manifest(json.loads(data), f"{path}/{SHARDED_MANIFEST} (being written)")
    tmp = f"{SHARDED_MANIFEST}.{m.generation}.tmp"
    full_tmp, final = os.path.join(path, tmp), os.path.join(path, SHARDED_MANIFEST)
    with contextlib.suppress(FileNotFoundError):  # a writer that died here, under this lock: ours to remove
        if stat.S_ISREG(os.lstat(full_tmp).st_mode):
            os.unlink(full_tmp)
    fd = os.open(full_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            try:
                os.link(full_tmp, final)
            except FileExistsError:
                raise IndexExistsError(f"{path}: {SHARDED_MANIFEST} appeared while building; another build "
                                       "committed first") from None
        else:
            os.replace(full_tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full_tmp)
    fsync_dir(path)
    return m


# -- routing -------------------------------------------------------------------------------------
class Routing:
    """Global ids <-> (shard position, local id), from a manifest's runs."""

    def __init__(self, runs: Sequence[Tuple[int, int, int, int]], num_shards: int):
        a = np.asarray(list(runs), dtype=np.int64).reshape(-1, 4)
        self.start, self.shard, self.local, self.count = (np.ascontiguousarray(a[:, i]) for i in range(4))
        self.num_documents = int(self.start[-1] + self.count[-1]) if len(a) else 0
        self.num_shards = int(num_shards)
        self._per_shard = []
        for s in range(num_shards):
            sel = np.flatnonzero(self.shard == s)
            order = np.argsort(self.local[sel], kind="stable")
            sel = sel[order]
            self._per_shard.append((self.local[sel], self.start[sel], int(self.count[sel].sum())))

    def routed(self, shard: int) -> int:
        """Local ids of shard ``shard`` that have a global id (``0 .. routed-1``)."""
        return self._per_shard[shard][2]

    def locate(self, global_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(shard positions, local ids) of valid global ids (int64 [n], each in [0, num_documents))."""
        g = np.asarray(global_ids, np.int64)
        r = np.searchsorted(self.start, g, side="right") - 1
        return self.shard[r], self.local[r] + (g - self.start[r])

    def to_global(self, shard: int, local_ids: np.ndarray) -> np.ndarray:
        """Global ids of shard ``shard``'s local ids (any shape; -1 and unrouted ids give -1)."""
        local = np.asarray(local_ids, np.int64)
        ls, gs, n = self._per_shard[shard]
        out = np.full(local.shape, -1, np.int64)
        ok = (local >= 0) & (local < n)
        if ok.any() and len(ls):
            v = local[ok]
            r = np.searchsorted(ls, v, side="right") - 1
            out[ok] = gs[r] + (v - ls[r])
        return out


def _append_run(runs: Sequence[Tuple[int, int, int, int]], start: int, shard: int, local: int, count: int):
    runs = list(runs)
    if runs:
        s0, sh0, l0, c0 = runs[-1]
        if sh0 == shard and s0 + c0 == start and l0 + c0 == local:  # extends the last run
            runs[-1] = (s0, sh0, l0, c0 + count)
            return tuple(runs)
    runs.append((start, shard, local, count))
    return tuple(runs)


# -- shards ----------------------------------------------------------------------------------------
def _named(e: PlaidError, prefix: str) -> PlaidError:
    """The same kind of error with ``prefix`` in front of its message."""
    try:
        return type(e)(f"{prefix}: {e}")
    except TypeError:  # pragma: no cover - every plaid error takes a message
        return PlaidError(f"{prefix}: {e}")


def check_shard(root: str, entry: ShardEntry, fingerprint: Optional[str] = None):
    """Open shard ``entry``'s manifest and check it against the sharded manifest; returns it.

    Raises, naming the shard: :class:`IndexNotFoundError` (folder missing or no index in it),
    :class:`FormatVersionError` (another format version), :class:`IndexCorruptError` (damaged,
    behind the sharded manifest, or — with ``fingerprint`` — trained with another codec).
    """
    from ..indexing.indexer import TrainedParams

    path = os.path.join(root, entry.name)
    what = f"{root}: shard {entry.name}"
    if not os.path.lexists(path):
        raise IndexNotFoundError(f"{what} is missing (no folder {path})")
    if os.path.islink(path) or not os.path.isdir(path):
        raise IndexCorruptError(f"{what}: {path} is not a plain directory (plaid never follows links)")
    try:
        m = read_manifest(path)
    except PlaidError as e:
        raise _named(e, what) from None
    if m.generation < entry.generation or m.num_documents < entry.num_documents:
        raise IndexCorruptError(f"{what} is at generation {m.generation} with {m.num_documents} documents, behind "
                                f"the sharded manifest's generation {entry.generation} with {entry.num_documents} "
                                "(was the folder restored from an older copy?)")
    if fingerprint is not None:
        try:
            fp = TrainedParams.from_index(path).fingerprint()
        except PlaidError as e:
            raise _named(e, what) from None
        if fp != fingerprint:
            raise IndexCorruptError(f"{what} was trained with another codec (fingerprint {fp[:12]}..., the sharded "
                                    f"index's is {fingerprint[:12]}...): shards must share one codec")
    return m


def remove_index_folder(path: str) -> bool:
    """Remove a plaid index folder this process wrote (a shard of a failed or replaced build):
    under its writer lock, every regular file of a name plaid writes, then the folder if that
    left it empty. Files of other names are kept (and the folder with them). Returns whether the
    folder is gone."""

    if not os.path.isdir(path) or os.path.islink(path):
        return False
    with contextlib.suppress(PlaidError, OSError):
        with writer_lock(path):
            for name in os.listdir(path):
                full = os.path.join(path, name)
                with contextlib.suppress(OSError):
                    if is_own_name(name) and stat.S_ISREG(os.lstat(full).st_mode):
                        os.unlink(full)
    try:
        os.rmdir(path)
        return True
    except OSError:
        logger.warning("%s: left in place (it holds files plaid did not write)", path)
        return False


# -- the sharded index ----------------------------------------------------------------------------
class ShardedIndex:
    """A sharded index on disk: open it, read its facts, add, delete, compact, verify.

    ``plaid.distributed.ShardedIndex(path)`` reads and checks the sharded manifest (not the
    shards: :meth:`check` and :meth:`verify` do). Build one with
    :func:`plaid.distributed.build_sharded`; search it with :class:`plaid.ShardedSearcher`.
    Updates run in this process (no Ray), one sharded writer at a time (``IndexLockedError`` for
    a second), each shard committing atomically, then the sharded manifest.
    """

    def __init__(self, path):
        self.path = os.fspath(getattr(path, "path", path))
        self._m = read_sharded_manifest(self.path)

    def refresh(self) -> "ShardedIndex":
        self._m = read_sharded_manifest(self.path)
        return self

    # -- facts -------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self._m.to_json()

    @property
    def generation(self) -> int:
        return self._m.generation

    @property
    def dim(self) -> int:
        return self._m.dim

    @property
    def num_documents(self) -> int:
        """Global ids ever assigned (including deleted documents)."""
        return self._m.num_documents

    @property
    def has_doc_ids(self) -> bool:
        return self._m.has_doc_ids

    @property
    def num_shards(self) -> int:
        return len(self._m.shards)

    @property
    def shard_names(self) -> List[str]:
        return [s.name for s in self._m.shards]

    def shard_paths(self) -> List[str]:
        return [os.path.join(self.path, s.name) for s in self._m.shards]

    @property
    def routing(self) -> Routing:
        return Routing(self._m.routing, len(self._m.shards))

    def shards(self) -> list:
        """Every shard as a :class:`plaid.Index` (each checked against the manifest)."""
        from ..indexing.index import Index

        for s in self._m.shards:
            check_shard(self.path, s)
        return [Index(p) for p in self.shard_paths()]

    def check(self) -> None:
        """Check every shard against the manifest (present, readable, same format version, not
        behind, same codec) and that no external id is live in two shards; raises naming the
        first problem."""
        problems = self._problems(deep=False)
        if problems:
            raise problems[0][1]

    def _problems(self, deep: bool) -> List[Tuple[str, PlaidError]]:
        from ..store import verify as verify_index

        out: List[Tuple[str, PlaidError]] = []
        for s in self._m.shards:
            try:
                check_shard(self.path, s, self._m.codec_fingerprint)
            except PlaidError as e:
                out.append((s.name, e))
                continue
            if deep:
                for p in verify_index(os.path.join(self.path, s.name)):
                    out.append((s.name, IndexCorruptError(f"{self.path}: shard {s.name}: {p}")))
        if not out and self._m.has_doc_ids:
            try:
                self._live_names()
            except PlaidError as e:
                out.append(("", e))
        return out

    def verify(self) -> List[str]:
        """Every problem found, one line each naming the shard (empty: intact): each shard's own
        ``verify`` (size, CRC-32 and values of every file), its agreement with the sharded
        manifest (present, format version, generation, codec fingerprint), duplicate ids."""
        prefix = f"{self.path}: "
        return [str(e)[len(prefix):] if str(e).startswith(prefix) else str(e) for _, e in self._problems(deep=True)]

    def _live_names(self) -> List[Dict[str, int]]:
        """Per shard: external id -> local id of its live documents. Raises
        :class:`IndexCorruptError` when an id is live in two shards."""
        from ..indexing.index import Index

        per_shard: List[Dict[str, int]] = []
        owner: Dict[str, str] = {}
        for s, p in zip(self._m.shards, self.shard_paths()):
            ix = Index(p)
            names = ix.doc_ids or []
            dead = np.zeros(len(names), bool)
            deleted = ix.deleted_ids()
            dead[deleted[deleted < len(names)]] = True
            routed = s.num_documents
            live = {n: i for i, n in enumerate(names) if not dead[i] and i < routed}
            for n in live:
                if n in owner:
                    raise IndexCorruptError(f"{self.path}: the external id {n!r} is live in two shards "
                                            f"({owner[n]} and {s.name}); ids must be unique across shards")
                owner[n] = s.name
            per_shard.append(live)
        return per_shard

    @property
    def doc_ids(self) -> Optional[List[Optional[str]]]:
        """External ids by global id (a list of str), or None when the index has none."""
        if not self._m.has_doc_ids:
            return None
        from ..indexing.index import Index

        out: List[Optional[str]] = [None] * self._m.num_documents
        for start, shard, local, count in self._m.routing:
            names = Index(os.path.join(self.path, self._m.shards[shard].name)).doc_ids
            out[start : start + count] = names[local : local + count]
        return out

    def deleted_ids(self) -> np.ndarray:
        """Sorted global ids of deleted documents (int64)."""
        from ..indexing.index import Index

        routing = self.routing
        parts = [routing.to_global(i, Index(p).deleted_ids()) for i, p in enumerate(self.shard_paths())]
        g = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return np.unique(g[g >= 0])

    def __len__(self) -> int:
        """Live (not deleted) documents."""
        return self._m.num_documents - len(self.deleted_ids())

    def info(self) -> dict:
        """Counts, sizes and parameters, JSON-serialisable (the keys of ``plaid.Index.info`` that
        apply, summed over the shards, and ``shards``: one entry per shard)."""
        from ..indexing.index import Index

        shards = []
        pooling = None
        for s in self._m.shards:
            check_shard(self.path, s)
            i = Index(os.path.join(self.path, s.name)).info()
            pooling = pooling or i["pooling"]  # one for all shards: part of the codec fingerprint
            shards.append({"name": s.name, "generation": i["generation"], "served_generation": s.generation,
                           "num_documents": i["num_documents"], "num_live_documents": i["num_live_documents"],
                           "num_tokens": i["num_tokens"], "num_centroids": i["num_centroids"], "bytes": i["bytes"]})
        tokens = sum(s["num_tokens"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        return {"path": self.path, "sharded": True, "format_version": SHARDED_FORMAT_VERSION,
                "generation": self._m.generation, "num_shards": len(shards), "num_documents": self._m.num_documents,
                "num_live_documents": len(self), "num_deleted": len(self.deleted_ids()), "num_tokens": tokens,
                "dim": self._m.dim, "codec": dict(self._m.codec), "normalized": self._m.normalized,
                "pooling": pooling, "search_depth": self._m.search_depth,
                "codec_fingerprint": self._m.codec_fingerprint, "has_doc_ids": self._m.has_doc_ids,
                "max_shard_documents": self._m.max_shard_documents, "created_by": self._m.created_by,
                "bytes": size, "bytes_per_token": round(size / max(1, tokens), 3), "build": dict(self._m.build),
                "shards": shards}

    def __repr__(self) -> str:
        return (f"ShardedIndex({self.path!r}, shards={self.num_shards}, documents={self.num_documents}, "
                f"generation={self.generation})")

    # -- updates -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self):
        """Hold the sharded lock over a fresh manifest, with shards that ran ahead reconciled."""
        with writer_lock(self.path):
            m = read_sharded_manifest(self.path)
            yield self._reconcile(m)
        self.refresh()

    def _reconcile(self, m: ShardedManifest) -> ShardedManifest:
        """Record shards that committed past the manifest: documents without a global id (an add
        interrupted before the sharded commit) are deleted in their shard; the generation each
        shard is at is recorded. Commits the sharded manifest when anything changed."""
        from ..indexing.index import Index

        shards = list(m.shards)
        changed = False
        for i, s in enumerate(shards):
            sm = check_shard(self.path, s)
            if sm.generation == s.generation:
                continue
            if sm.num_documents > s.num_documents:
                ix = Index(os.path.join(self.path, s.name))
                extra = np.arange(s.num_documents, sm.num_documents, dtype=np.int64)
                extra = extra[~np.isin(extra, ix.deleted_ids())]
                if len(extra):
                    logger.warning("%s: %d document(s) of shard %s have no global id (an add that did not finish); "
                                   "deleting them there", self.path, len(extra), s.name)
                    ix.delete(extra.tolist())
                sm = read_manifest(os.path.join(self.path, s.name))
            shards[i] = replace(s, generation=sm.generation)
            changed = True
        if not changed:
            return m
        m = replace(m, generation=m.generation + 1, shards=tuple(shards))
        return commit_sharded_manifest(self.path, m, new=False)

    def _commit(self, m: ShardedManifest, **changes) -> ShardedManifest:
        return commit_sharded_manifest(self.path, replace(m, generation=m.generation + 1, **changes), new=False)

    def add(self, documents, doc_ids=None, *, show_progress: bool = True) -> np.ndarray:
        """Append ``documents`` to the shard with the fewest live documents (or to a new shard,
        encoded with the shared codec, when that one would pass ``max_shard_documents``);
        returns their global ids (int64 [n]: the next ids, as one index would give them).

        ``doc_ids`` are required when the index has external ids (and must not be live in any
        shard), refused when it has none. The shard commits, then the sharded manifest.
        """
        from ..embeddings import as_corpus
        from ..indexing.index import Index
        from ..indexing.indexer import Indexer, TrainedParams

        with self._writing() as m:
            corpus = as_corpus(documents, dim=m.dim)
            try:
                n = corpus.num_docs
                if m.has_doc_ids:
                    if doc_ids is None:
                        raise InvalidInputError("this index has external doc_ids: pass doc_ids for the added documents")
                    live = set().union(*self._live_names())
                    names = check_doc_ids(doc_ids, n, existing=live)
                else:
                    if doc_ids is not None:
                        raise InvalidInputError("this index was built without doc_ids; add documents without them")
                    names = None
                sizes = [len(Index(p)) for p in self.shard_paths()]
                target = int(np.argmin(sizes))
                shards = list(m.shards)
                limit = m.max_shard_documents
                if limit is not None and sizes[target] + n > limit:
                    taken = [int(SHARD_NAME_RE.match(e).group(1)) for e in os.listdir(self.path) if SHARD_NAME_RE.match(e)]
                    number = max([m.next_shard] + [t + 1 for t in taken])  # past a folder an interrupted add left
                    name = shard_name(number)
                    trained = TrainedParams.from_index(os.path.join(self.path, shards[0].name))
                    if trained.fingerprint() != m.codec_fingerprint:
                        raise IndexCorruptError(f"{self.path}: shard {shards[0].name} was trained with another codec")
                    logger.info("%s: shard %s is at %d of %d documents: %d new documents go to a new shard %s",
                                self.path, shards[target].name, sizes[target], limit, n, name)
                    ix = Indexer(show_progress=show_progress, chunk_tokens=int(m.build.get("chunk_tokens", 1 << 16)),
                                 search_depth=m.search_depth)
                    try:
                        index = ix.build_trained(os.path.join(self.path, name), corpus_documents(corpus), trained,
                                                 doc_ids=names)
                    except BaseException:
                        remove_index_folder(os.path.join(self.path, name))
                        raise
                    shards.append(ShardEntry(name, index.generation, 0))
                    target, next_shard = len(shards) - 1, number + 1
                    local0 = 0
                else:
                    ix = Index(os.path.join(self.path, shards[target].name))
                    local0 = ix.num_documents
                    ix.add(corpus_documents(corpus), doc_ids=names, show_progress=show_progress)
                    next_shard = m.next_shard
                    index = ix
                shards[target] = ShardEntry(shards[target].name, index.generation, local0 + n)
                runs = _append_run(m.routing, m.num_documents, target, local0, n)
                self._commit(m, shards=tuple(shards), routing=runs, num_documents=m.num_documents + n,
                             next_shard=next_shard)
                return np.arange(m.num_documents, m.num_documents + n, dtype=np.int64)
            finally:
                corpus.close()

    def _resolve(self, m: ShardedManifest, ids, *, what: str = "ids") -> List[List[int]]:
        """Per shard: the live local ids named by global (int) or external (str) ids. Unknown or
        deleted ids raise :class:`InvalidInputError` listing a few."""
        from ..indexing.index import Index

        if isinstance(ids, (str, bytes, int, np.integer)):
            ids = [ids]
        try:
            ids = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        except TypeError:
            raise InvalidInputError(f"{what} must be an id or a sequence of ids, got {type(ids).__name__}") from None
        routing = Routing(m.routing, len(m.shards))
        per_shard: List[List[int]] = [[] for _ in m.shards]
        unknown: list = []
        strs = [x for x in ids if isinstance(x, str)]
        live = self._live_names() if strs and m.has_doc_ids else None
        if strs and not m.has_doc_ids:
            raise InvalidInputError(f"{what}: this index has no external doc_ids; use global (int) ids")
        deleted = [set(Index(p).deleted_ids().tolist()) for p in self.shard_paths()]
        for x in ids:
            if isinstance(x, str):
                hit = [(i, d[x]) for i, d in enumerate(live) if x in d]
                if not hit:
                    unknown.append(x)
                    continue
                i, local = hit[0]
            elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                if not 0 <= int(x) < m.num_documents:
                    unknown.append(x)
                    continue
                s, loc = routing.locate(np.array([int(x)]))
                i, local = int(s[0]), int(loc[0])
                if local in deleted[i]:
                    unknown.append(x)
                    continue
            else:
                raise InvalidInputError(f"{what}: document ids must be str (external) or int (global), got {x!r}")
            per_shard[i].append(local)
        if unknown:
            raise InvalidInputError(f"{what}: {len(unknown)} unknown or deleted document id(s), e.g. {unknown[:5]}")
        return per_shard

    def delete(self, ids) -> int:
        """Delete documents by external id (str) or global id (int), each in its owner shard;
        returns how many. Unknown or already deleted ids raise :class:`InvalidInputError`.

        Each shard's delete commits atomically; a delete spanning shards that fails part-way has
        deleted the ids of the shards that committed (the manifest records them), not the others.
        """
        from ..indexing.index import Index

        with self._writing() as m:
            per_shard = self._resolve(m, ids)
            shards = list(m.shards)
            total = 0
            try:
                for i, local in enumerate(per_shard):
                    if local:
                        ix = Index(os.path.join(self.path, shards[i].name))
                        total += ix.delete(sorted(set(local)))
                        shards[i] = replace(shards[i], generation=ix.generation)
            finally:
                if tuple(shards) != m.shards:
                    self._commit(m, shards=tuple(shards))
            return total

    def compact(self, *, show_progress: bool = True) -> None:
        """Compact every shard (ids do not change; see :meth:`plaid.Index.compact`)."""
        from ..indexing.index import Index

        with self._writing() as m:
            shards = list(m.shards)
            try:
                for i, s in enumerate(shards):
                    ix = Index(os.path.join(self.path, s.name))
                    if ix.num_deleted:
                        ix.compact(show_progress=show_progress)
                        shards[i] = replace(s, generation=ix.generation)
            finally:
                if tuple(shards) != m.shards:
                    self._commit(m, shards=tuple(shards))


def corpus_documents(corpus):
    """A validated :class:`~plaid.embeddings.Corpus` back as documents ``as_corpus`` accepts
    (its flat :class:`plaid.Embeddings`, memory-mapped where it was, or its list of arrays)."""
    if corpus._flat is not None:  # noqa: SLF001 - same package family: keep a memory-mapped corpus mapped
        return corpus._flat
    return corpus._docs

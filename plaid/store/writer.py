"""Writing a generation: the writer lock, the journal of created files, atomic commit, cleanup.

One writer at a time holds ``.plaid-lock`` (an exclusive ``flock``, taken without waiting: a
second writer gets :class:`IndexLockedError`; the OS drops it when its process dies). Under the
lock, :func:`writing` opens an :class:`IndexWriter` over the committed generation:

* every file the writer creates is first appended to ``.plaid-journal``, then created
  exclusively without following links (a planted file or symlink is never written through);
* the new generation's number is above every generation named by a file in the folder, so its
  names collide with nothing already there;
* :meth:`IndexWriter.commit` writes ``manifest.json.<g>.tmp``, fsyncs it and renames it over
  ``manifest.json`` (the commit point), then removes the files of the previous generation that
  the new one no longer lists, and the files of earlier writers that died (named in the journal);
* an exception inside the ``with`` block removes what the writer created, nothing else.

The store deletes only files that a committed manifest or the journal recorded as its own, and
never a directory or a link's target.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import (FormatVersionError, IndexCorruptError, IndexExistsError, IndexLockedError, IndexWriteError,
                      InsufficientSpaceError, PlaidError)
from . import files
from .manifest import (ARRAY_FILE_RE, FORMAT_VERSION, MANIFEST, ArrayEntry, Manifest, Segment, array_file, dumps,
                       parse_manifest)
from .snapshot import Snapshot, read_manifest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["LOCK_FILE", "JOURNAL", "writer_lock", "IndexWriter", "writing", "is_own_name", "remove_superseded"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".plaid-lock"
JOURNAL = ".plaid-journal"
_MANIFEST_TMP_RE = re.compile(r"^manifest\.json\.(\d+)\.tmp$")
_SPILL_RE = re.compile(r"^plaid-spill-(\d+)-[0-9a-f]{16}\.bin$")
#: A journal larger than this is not plaid's (real ones list a few dozen names).
JOURNAL_MAX_BYTES = 1 << 20


def _created_generation(name: str) -> Optional[int]:
    """The generation in the name of a file a writer creates (array, manifest temp, spill), else None."""
    for rx in (ARRAY_FILE_RE, _MANIFEST_TMP_RE, _SPILL_RE):
        m = rx.match(name)
        if m:
            return int(m.group(m.lastindex))
    return None


def is_own_name(name: str) -> bool:
    """Whether ``name`` is of a pattern plaid writes in an index folder (it may still be foreign)."""
    return name in (MANIFEST, LOCK_FILE, JOURNAL) or _created_generation(name) is not None


def _open_own(path: str, name: str, flags: int) -> int:
    """Open (creating exclusively if absent) plaid's own bookkeeping file ``name``: a regular
    file, never through a link."""
    full = os.path.join(path, name)
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(full, flags | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
    except FileExistsError:
        try:
            fd = os.open(full, flags | nofollow)
        except OSError as e:
            kind = "unusable"
            with contextlib.suppress(OSError):
                kind = files.lstat_kind(os.lstat(full))
            raise IndexCorruptError(f"{path}: {name} is {kind} ({e.strerror}); plaid never follows links in an "
                                    f"index folder: remove it if no plaid process is writing") from None
    except OSError as e:
        raise _write_error(path, e) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IndexCorruptError(f"{path}: {name} is {files.lstat_kind(st)}, not plaid's file; remove it")
    return fd


@contextlib.contextmanager
def writer_lock(path: str) -> Iterator[None]:
    """Hold the index's writer lock for the duration of a ``with`` block.

    An exclusive ``flock`` (``fcntl``; ``msvcrt.locking`` on Windows) on ``<path>/.plaid-lock``,
    taken without waiting: a second writer gets :class:`IndexLockedError` at once. The OS
    releases it when the process dies, so a killed writer never leaves a stale lock. Where
    neither exists, writing raises :class:`PlaidError` rather than running unlocked.
    """
    fd = _open_own(path, LOCK_FILE, os.O_RDWR)
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                raise PlaidError("this platform offers no file locks (fcntl or msvcrt); plaid cannot write safely")
        except (BlockingIOError, PermissionError):
            raise IndexLockedError(f"{path}: another process is writing to this index (lock {LOCK_FILE}); "
                                   "retry when it has finished") from None
        except OSError as e:
            if e.errno in (11, 13, 35, 36):  # EAGAIN/EACCES/EDEADLK variants
                raise IndexLockedError(f"{path}: another process is writing to this index (lock {LOCK_FILE})") from None
            raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC),
                 errno.EFBIG}


def _write_error(path: str, e: OSError) -> IndexWriteError:
    what = "no space left on the device" if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else e.strerror
    return IndexWriteError(e.errno, f"{path}: writing the index failed ({what}); the committed index is "
                                    "unchanged")


def remove_superseded(path: str, names: List[str]) -> List[str]:
    """Remove plaid's files ``names`` from ``path`` (links themselves, never directories). Returns
    the names removed. Called after the commit point only."""
    return [n for n in names if files.remove_file(path, n)]


class IndexWriter:
    """Stages the array files of one new generation, then commits them with the manifest.

    Made by :func:`writing`; ``base`` is the committed generation's manifest (None for a first
    build) and ``snapshot`` that generation opened (None likewise). Usage::

        with store.writing(path) as w:
            w.write("doclens", array)               # a whole array
            out = w.create("seg3_codes", (n,), np.uint16)   # memory-mapped, filled in chunks
            ...
            manifest = w.commit(fields)
    """

    def __init__(self, path: str, base: Optional[Manifest], snapshot: Optional[Snapshot], generation: int,
                 journal_fd: int):
        self.path = path
        self.base = base
        self.snapshot = snapshot
        self.generation = int(generation)
        self.entries: Dict[str, ArrayEntry] = {}
        self._open: Dict[str, np.memmap] = {}
        self._created: List[str] = []
        self._journal = journal_fd
        self.committed: Optional[Manifest] = None

    # -- creating files ----------------------------------------------------------------------------
    def _new_file(self, name: str) -> int:
        """Record ``name`` in the journal, then create it exclusively; returns a write descriptor."""
        os.write(self._journal, (name + "\n").encode())
        try:
            fd = files.create_exclusive(self.path, name)
        except FileExistsError:
            raise IndexCorruptError(f"{self.path}: {name} is already there and was not written by this writer "
                                    "(a planted file or link?); plaid does not overwrite it") from None
        self._created.append(name)
        return fd

    def _array_name(self, name: str) -> str:
        if name in self.entries or name in self._open:
            raise ValueError(f"array {name!r} written twice in one generation")
        return array_file(name, self.generation)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` as ``<name>.<generation>.npy`` (plain writes, fsynced)."""
        fname = self._array_name(name)
        array = np.ascontiguousarray(array)
        files.write_npy(self._new_file(fname), array)
        self._record(name, fname, array.dtype, array.shape)

    def create(self, name: str, shape, dtype) -> np.ndarray:
        """A writable memory-mapped array to fill in chunks; the whole file is allocated first (a
        full disk raises ``OSError`` here). :meth:`finish` (or :meth:`commit`) completes it."""
        fname = self._array_name(name)
        if int(np.prod(shape)) == 0:
            self.write(name, np.zeros(shape, dtype))
            return np.zeros(shape, dtype)
        mm = files.create_npy(self._new_file(fname), shape, dtype)
        self._open[name] = mm
        return mm

    def finish(self, name: str) -> None:
        """Flush and fsync an array made by :meth:`create`, and record it."""
        mm = self._open.pop(name, None)
        if mm is None:
            return
        mm.flush()
        shape, dtype = mm.shape, mm.dtype
        del mm
        fname = array_file(name, self.generation)
        fd = files.open_regular(self.path, fname)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._record(name, fname, dtype, shape)

    def check_space(self, needed: int, what: str) -> None:
        """Refuse, before writing anything more, when the folder's file system has less than
        ``needed`` bytes free: :class:`InsufficientSpaceError` naming both figures and ``what``
        (how ``needed`` was estimated)."""
        free = files.free_bytes(self.path)
        if needed > free:
            raise InsufficientSpaceError(
                f"{self.path}: not enough free disk space: this needs about {_size(needed)} ({needed:,} bytes: "
                f"{what}), but only {_size(free)} ({free:,} bytes) are free there; nothing was written",
                needed, free)

    def scratch_file(self) -> Tuple[int, str]:
        """A new private scratch file in the folder (e.g. a corpus spill): (write descriptor, path).
        Removed by the caller, or at the latest by the commit or the next writer."""
        name = f"plaid-spill-{self.generation}-{secrets.token_hex(8)}.bin"
        return self._new_file(name), os.path.join(self.path, name)

    def _record(self, name: str, fname: str, dtype, shape) -> None:
        fd = files.open_regular(self.path, fname)
        try:
            size = os.fstat(fd).st_size
            crc = files.file_crc32(fd)
        finally:
            os.close(fd)
        self.entries[name] = ArrayEntry(fname, np.dtype(dtype), tuple(int(s) for s in shape), size, crc)

    # -- commit / abort ----------------------------------------------------------------------------
    def commit(self, fields: dict) -> Manifest:
        """Write the manifest atomically (the commit point), then remove superseded files.

        ``fields``: the manifest's content besides ``format``, ``format_version``, ``generation``;
        ``fields["arrays"]`` holds the entries carried over unchanged (name -> ArrayEntry), to
        which this writer's arrays are added. Returns the committed manifest.
        """
        for name in list(self._open):
            self.finish(name)
        fields = dict(fields)
        arrays = dict(fields.pop("arrays", {}))
        reused = [n for n in self.entries if n in arrays and n.startswith("seg")]
        if reused:
            raise IndexCorruptError(f"{self.path}: segment arrays {', '.join(reused)} are already in use "
                                    "(the manifest's next_segment is wrong); nothing was written over them")
        arrays.update(self.entries)
        segments = [s if isinstance(s, Segment) else Segment(**s) for s in fields.pop("segments")]
        m = Manifest(generation=self.generation, segments=tuple(segments), arrays=arrays,
                     format_version=FORMAT_VERSION, **fields)
        data = dumps(m)
        m = parse_manifest(json.loads(data), f"{self.path}/{MANIFEST} (being written)")
        keep = {e.file for e in m.arrays.values()}
        old = [e.file for e in self.base.arrays.values()] if self.base is not None else []
        superseded = [n for n in old if n not in keep]
        # journaled before the commit point: a writer killed during the cleanup leaves them to the
        # next writer (which skips any name its committed manifest still lists)
        if superseded:
            os.write(self._journal, "".join(n + "\n" for n in superseded).encode())
        tmp = f"{MANIFEST}.{self.generation}.tmp"
        fd = self._new_file(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, MANIFEST))
        except OSError as e:
            raise IndexCorruptError(f"{self.path}: cannot replace {MANIFEST} ({e.strerror}); is it a directory?") \
                from None
        files.fsync_dir(self.path)
        self.committed = m
        stale = superseded + [c for c in self._created if c != tmp and c not in keep]
        remove_superseded(self.path, list(dict.fromkeys(stale)))
        _reset_journal(self._journal)
        return m

    def abort(self) -> None:
        """Remove every file this writer created (the committed generation is untouched)."""
        self._open.clear()
        for name in self._created:
            files.remove_file(self.path, name)
        self._created.clear()
        _reset_journal(self._journal)


def _size(n: int) -> str:
    """``n`` bytes in human units (GB = 10^9 bytes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _reset_journal(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)


def _clean_journal(path: str, fd: int, keep: set) -> None:
    """Remove the files that dead writers recorded in the journal and no manifest references."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, JOURNAL_MAX_BYTES + 1)
    if len(data) > JOURNAL_MAX_BYTES:
        raise IndexCorruptError(f"{path}: {JOURNAL} is larger than {JOURNAL_MAX_BYTES} bytes; not plaid's journal")
    names = data.decode("utf-8", "replace").splitlines()
    removed = 0
    for name in names:
        if name in keep or _created_generation(name) is None:
            continue  # not a name plaid creates (a damaged or planted journal): left alone
        try:
            files.check_plain_name(name)
        except IndexCorruptError:
            continue
        removed += files.remove_file(path, name)
    if removed:
        logger.info("%s: removed %d file(s) left by an interrupted writer", path, removed)
    _reset_journal(fd)


def _check_writable_version(m: Manifest, path: str, upgrade: bool) -> None:
    if m.format_version != FORMAT_VERSION and not upgrade:
        raise FormatVersionError(
            f"{path}: the index is in format version {m.format_version}, which this plaid reads but does not "
            f"change; convert it first with `plaid upgrade {path}` (in place, atomic; searches keep working)")


def _next_generation(path: str, base: Optional[Manifest]) -> int:
    top = base.generation if base is not None else -1
    for name in os.listdir(path):
        g = _created_generation(name)
        if g is not None:
            top = max(top, g)
    return top + 1


def _only_leftovers(path: str, entries: List[str]) -> bool:
    """Whether ``entries`` (the folder's names) are only what an interrupted first build left: no
    manifest, the lock and journal, and regular files the journal names (so the next writer
    removes them). A build may then proceed without ``overwrite``: there is no index to replace."""
    if MANIFEST in entries or JOURNAL not in entries:
        return False
    try:
        fd = os.open(os.path.join(path, JOURNAL), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        listed = set(os.read(fd, JOURNAL_MAX_BYTES + 1).decode("utf-8", "replace").splitlines())
    finally:
        os.close(fd)
    for name in entries:
        if name in (LOCK_FILE, JOURNAL):
            continue
        if name not in listed or _created_generation(name) is None:
            return False
        if not stat.S_ISREG(os.lstat(os.path.join(path, name)).st_mode):
            return False
    return True


def _prepare_new(path: str, overwrite: bool) -> bool:
    """Check that ``path`` may receive a new index; create it if missing. Returns whether it was
    created. Never deletes anything: a folder with foreign files is refused even with
    ``overwrite`` (their names are not plaid's). A folder holding only an interrupted build's
    files is accepted as if empty (:func:`_only_leftovers`); the writer then removes them."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise IndexExistsError(f"{path} exists and is not a directory")
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PlaidError(f"{path}: cannot create the index directory ({e.strerror})") from None
    entries = sorted(os.listdir(path))
    if entries and not overwrite and not _only_leftovers(path, entries):
        raise IndexExistsError(
            f"{path} is not empty ({len(entries)} entries); pass overwrite=True to replace the index there")
    foreign = [e for e in entries if not is_own_name(e) or os.path.isdir(os.path.join(path, e))]
    if foreign:
        raise IndexExistsError(
            f"{path} holds files that are not part of a plaid index ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to overwrite it")
    return created


@contextlib.contextmanager
def writing(path: str, *, new: bool = False, overwrite: bool = False, upgrade: bool = False) -> Iterator[IndexWriter]:
    """Take the writer lock and open an :class:`IndexWriter` for the next generation at ``path``.

    ``new=True`` (a build): ``path`` may be absent or empty, or (with ``overwrite``) hold a
    plaid index, which the new one replaces at commit (an unreadable old manifest is ignored:
    its files are then kept, never guessed at). Otherwise ``path`` must hold a committed index.
    An exception in the block aborts the writer; a failed first build leaves no folder behind.
    """
    path = os.fspath(path)
    created = _prepare_new(path, overwrite) if new else False
    if not new:
        read_manifest(path)  # a clear IndexNotFoundError / IndexCorruptError before locking
    was_empty = new and not os.listdir(path)
    try:
        with writer_lock(path):
            jfd = _open_own(path, JOURNAL, os.O_RDWR | os.O_APPEND)
            try:
                base: Optional[Manifest] = None
                snap: Optional[Snapshot] = None
                if new:
                    with contextlib.suppress(PlaidError):
                        base = read_manifest(path)
                else:
                    base = read_manifest(path)
                    _check_writable_version(base, path, upgrade)
                    snap = Snapshot(path, base)
                keep = {e.file for e in base.arrays.values()} if base is not None else set()
                _clean_journal(path, jfd, keep)
                w = IndexWriter(path, base, snap, _next_generation(path, base), jfd)
                try:
                    yield w
                except OSError as e:
                    w.abort()
                    if isinstance(e, PlaidError) or e.errno not in _WRITE_ERRNOS:
                        raise
                    raise _write_error(path, e) from e
                except BaseException:
                    w.abort()
                    raise
                if w.committed is None:
                    w.abort()
            finally:
                os.close(jfd)
    except BaseException:
        if was_empty and os.path.isdir(path):  # leave the folder as we found it
            left = set(os.listdir(path))
            if left <= {LOCK_FILE, JOURNAL}:
                for n in left:
                    files.remove_file(path, n)
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
        raise

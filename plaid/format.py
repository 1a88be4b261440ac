"""The index folder on disk: file names, manifest, format version, atomic commit, checksums.

An index is a directory holding one ``.npy`` file per array and a ``manifest.json`` that names
them. The manifest is the single commit point: it is written to a temporary file, fsynced and
renamed over the old one, so a reader sees either the previous index or the new one, never a
mix. Array files carry the generation that wrote them in their name (``codes.3.npy``), so a new
generation never overwrites a file that a committed manifest still references.

See ``docs/FORMAT.md`` for the full description. No module other than this one builds file
paths inside an index directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from typing import Dict, Iterable, List, Optional

import numpy as np

from .errors import FormatVersionError, IndexCorruptError, IndexExistsError, IndexLockedError, IndexNotFoundError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; single-writer discipline is the caller's
    fcntl = None

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "IndexWriter",
    "read_manifest",
    "open_array",
    "verify_index",
    "prepare_directory",
    "writer_lock",
    "LOCK_FILE",
]

FORMAT_NAME = "plaid-index"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_ARRAY_RE = re.compile(r"^[a-z][a-z0-9_]*\.\d+\.npy(\.tmp)?$")
_OWN_RE = re.compile(r"^(manifest\.json(\.tmp)?|manifest\.json\.\w+\.tmp|\.plaid-lock|plaid-spill-.*\.bin)$")
_CRC_BLOCK = 1 << 24
LOCK_FILE = ".plaid-lock"


def _is_own_file(name: str) -> bool:
    return bool(_ARRAY_RE.match(name) or _OWN_RE.match(name))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_crc32(path: str) -> int:
    """CRC-32 of a whole file, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CRC_BLOCK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


@contextlib.contextmanager
def writer_lock(path: str):
    """Hold the index's writer lock for the duration of a ``with`` block.

    An exclusive ``flock`` on ``<path>/.plaid-lock``, taken without waiting: a second writer gets
    :class:`IndexLockedError` at once. The operating system releases the lock when its process
    dies, so a killed writer never leaves a stale lock. Readers never take it.
    """
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexLockedError(
                    f"{path}: another process is writing to this index (lock {LOCK_FILE}); "
                    "retry when it has finished"
                ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def prepare_directory(path: str, overwrite: bool) -> Optional[dict]:
    """Check that ``path`` may receive a new index; create it if missing.

    Returns the manifest of the index already there (when ``overwrite=True``), else ``None``.
    Raises :class:`IndexExistsError` for a non-empty directory without ``overwrite``, and also
    with ``overwrite`` when the directory holds files plaid did not write (never deletes them).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise IndexExistsError(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    entries = sorted(os.listdir(path))
    if not entries:
        return None
    if not overwrite:
        raise IndexExistsError(
            f"{path} is not empty ({len(entries)} entries); pass overwrite=True to replace the index there"
        )
    foreign = [e for e in entries if not _is_own_file(e)]
    if foreign:
        raise IndexExistsError(
            f"{path} holds files that are not part of a plaid index ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); refusing to overwrite it"
        )
    try:
        return read_manifest(path)
    except (IndexNotFoundError, IndexCorruptError):
        return None  # leftovers of an unfinished build: replaced, then removed on commit


class IndexWriter:
    """Stages the array files of one index generation, then commits them with the manifest.

    Usage::

        w = IndexWriter(path, generation)
        w.write("centroids", array)            # whole array at once
        out = w.create("codes", (n,), "uint16")  # memory-mapped, filled in chunks
        ...; w.finish("codes")
        w.commit(manifest_fields)

    Files written but never committed are removed by :meth:`abort`, or by the next successful
    commit in the same directory.
    """

    def __init__(self, path: str, generation: int):
        self.path = path
        self.generation = int(generation)
        self.entries: Dict[str, dict] = {}
        self._open: Dict[str, np.memmap] = {}

    def _file(self, name: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ValueError(f"bad array name {name!r}")
        return f"{name}.{self.generation}.npy"

    def write(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` as ``<name>.<generation>.npy`` (fsynced)."""
        fname = self._file(name)
        full = os.path.join(self.path, fname)
        array = np.ascontiguousarray(array)
        with open(full, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        self._record(name, fname, array.dtype, array.shape)

    def create(self, name: str, shape, dtype) -> np.ndarray:
        """A writable memory-mapped array to fill in chunks; call :meth:`finish` when done."""
        fname = self._file(name)
        full = os.path.join(self.path, fname)
        if int(np.prod(shape)) == 0:
            self.write(name, np.zeros(shape, dtype))
            return np.zeros(shape, dtype)
        mm = np.lib.format.open_memmap(full, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        self._open[name] = mm
        return mm

    def finish(self, name: str) -> None:
        """Flush and fsync an array made by :meth:`create`."""
        mm = self._open.pop(name, None)
        if mm is None:
            return
        mm.flush()
        fname = self._file(name)
        shape, dtype = mm.shape, mm.dtype
        del mm
        with open(os.path.join(self.path, fname), "rb+") as f:
            os.fsync(f.fileno())
        self._record(name, fname, dtype, shape)

    def _record(self, name: str, fname: str, dtype, shape) -> None:
        full = os.path.join(self.path, fname)
        self.entries[name] = {
            "file": fname,
            "dtype": np.dtype(dtype).str,
            "shape": [int(s) for s in shape],
            "bytes": os.path.getsize(full),
            "crc32": file_crc32(full),
        }

    def commit(self, fields: dict, keep: Iterable[str] = ()) -> dict:
        """Write the manifest atomically; remove files no longer referenced. Returns the manifest.

        ``fields`` are the manifest's content besides ``format``, ``format_version``,
        ``generation`` and ``arrays``; ``keep`` names array entries of an older manifest to carry
        over unchanged (passed as ``{"name": entry}`` through ``fields["arrays"]``).
        """
        for name in list(self._open):
            self.finish(name)
        arrays = dict(fields.pop("arrays", {}))
        arrays.update(self.entries)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "generation": self.generation,
            **fields,
            "arrays": arrays,
        }
        tmp = os.path.join(self.path, f"{MANIFEST}.{self.generation}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        _fsync_dir(self.path)
        remove_unreferenced(self.path, manifest)
        return manifest

    def abort(self) -> None:
        """Remove every file this writer created (the committed index, if any, is untouched)."""
        self._open.clear()
        for name in os.listdir(self.path):
            if name.endswith(f".{self.generation}.npy") or name.endswith(f".{self.generation}.tmp"):
                try:
                    os.remove(os.path.join(self.path, name))
                except OSError:
                    pass


def remove_unreferenced(path: str, manifest: dict) -> List[str]:
    """Delete plaid-owned files in ``path`` that ``manifest`` does not reference. Returns their names."""
    keep = {e["file"] for e in manifest["arrays"].values()} | {MANIFEST}
    removed = []
    for name in os.listdir(path):
        if name not in keep and (_ARRAY_RE.match(name) or name.startswith(MANIFEST)
                                 or (name.startswith("plaid-spill-") and name.endswith(".bin"))):
            try:
                os.remove(os.path.join(path, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def read_manifest(path: str) -> dict:
    """Read and check ``manifest.json`` of the index at ``path``.

    Raises :class:`IndexNotFoundError` (no directory, or no committed index in it),
    :class:`IndexCorruptError` (unreadable manifest) or :class:`FormatVersionError`.
    """
    if not os.path.isdir(path):
        raise IndexNotFoundError(f"no index at {path}: the directory does not exist")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        entries = os.listdir(path)
        if any(_ARRAY_RE.match(e) for e in entries):
            raise IndexNotFoundError(
                f"{path} holds an incomplete index: no {MANIFEST} (was the build interrupted?); rebuild it"
            )
        raise IndexNotFoundError(f"{path} is not a plaid index: no {MANIFEST}")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexCorruptError(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{mpath} is not a plaid index manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            hint = "it was written by a newer plaid; upgrade plaid-engine to read it"
        else:
            hint = "rebuild the index with this version of plaid"
        raise FormatVersionError(
            f"{path}: index format version {version!r} is not supported (this plaid reads version "
            f"{FORMAT_VERSION}); {hint}"
        )
    if not isinstance(manifest.get("arrays"), dict):
        raise IndexCorruptError(f"{mpath} lists no arrays")
    return manifest


def open_array(path: str, manifest: dict, name: str, mmap: bool = True) -> np.ndarray:
    """Open array ``name`` of the index, memory-mapped (read-only) or loaded into memory.

    Checks existence, byte size, dtype and shape against the manifest; never unpickles.
    """
    entry = manifest["arrays"].get(name)
    if entry is None:
        raise IndexCorruptError(f"{path}: the manifest lists no array {name!r}")
    full = os.path.join(path, entry["file"])
    if not os.path.exists(full):
        raise IndexCorruptError(f"{path}: index file {entry['file']} is missing")
    size = os.path.getsize(full)
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "larger than recorded"
        raise IndexCorruptError(
            f"{path}: index file {entry['file']} is {what} ({size} bytes, manifest says {entry['bytes']})"
        )
    try:
        arr = np.load(full, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:
        raise IndexCorruptError(f"{path}: index file {entry['file']} cannot be read ({e})") from None
    if arr.dtype != np.dtype(entry["dtype"]) or list(arr.shape) != entry["shape"]:
        raise IndexCorruptError(
            f"{path}: index file {entry['file']} holds {arr.dtype}{list(arr.shape)}, "
            f"manifest says {np.dtype(entry['dtype'])}{entry['shape']}"
        )
    return arr


def verify_index(path: str) -> List[str]:
    """Check every array file's size and CRC-32 against the manifest.

    Returns a list of problems, one line each naming the file; empty when the index is intact.
    """
    manifest = read_manifest(path)
    problems = []
    for name, entry in manifest["arrays"].items():
        full = os.path.join(path, entry["file"])
        if not os.path.exists(full):
            problems.append(f"{entry['file']}: missing")
            continue
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            problems.append(f"{entry['file']}: size {size} bytes, expected {entry['bytes']}")
            continue
        if file_crc32(full) != entry["crc32"]:
            problems.append(f"{entry['file']}: checksum mismatch (the file was altered or corrupted)")
    return problems

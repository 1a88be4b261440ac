"""Safe file primitives for the index folder: plain names only, regular files only, no links.

An index folder is untrusted input: it may have been copied, downloaded or tampered with. Every
file plaid opens inside it goes through :func:`open_regular` (``O_NOFOLLOW``; a symlink, FIFO,
device or directory is refused before anything is read, and a FIFO cannot block the open), and
every file plaid creates goes through :func:`create_exclusive` (``O_CREAT | O_EXCL |
O_NOFOLLOW``: a planted file or symlink under the name is an error, never overwritten or followed).
Names are checked to be plain file names, so nothing outside the folder is ever reached.

Arrays are ``.npy`` files. :func:`read_npy` parses the header itself (never unpickles, never
trusts the header alone: dtype, shape and byte size must match what the caller expects) and maps
or reads the data from the descriptor it validated. :func:`write_npy` writes with plain writes,
:func:`create_npy` allocates the whole file up front (``posix_fallocate``) before it is written
through a memory map, so a full disk is an ``OSError`` at allocation, never a ``SIGBUS``.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import IndexCorruptError

__all__ = ["check_plain_name", "open_regular", "create_exclusive", "read_npy", "write_npy", "create_npy",
           "file_crc32", "fsync_dir", "remove_file", "lstat_kind", "CRC_BLOCK"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
CRC_BLOCK = 1 << 24
_ZERO_BLOCK = 1 << 22


def check_plain_name(name: str) -> str:
    """``name`` if it is a plain file name (no separator, not ``.``/``..``, no NUL), else raise."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name
            or (os.sep != "/" and os.sep in name) or (os.altsep and os.altsep in name)):
        raise IndexCorruptError(f"{name!r} is not a plain file name inside the index folder")
    return name


def lstat_kind(st: os.stat_result) -> str:
    """A word for what a non-regular file is: 'a symbolic link', 'a FIFO', 'a directory', ..."""
    mode = st.st_mode
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def open_regular(folder: str, name: str) -> int:
    """Open ``folder/name`` read-only; returns a descriptor of a regular file.

    Raises :class:`IndexCorruptError` naming the file when it is missing, is a symbolic link
    (never followed), a FIFO (the open does not block), a device, a socket or a directory.
    """
    check_plain_name(name)
    full = os.path.join(folder, name)
    try:
        fd = os.open(full, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY)
    except FileNotFoundError:
        raise IndexCorruptError(f"{folder}: index file {name} is missing") from None
    except OSError as e:
        kind = "unreadable"
        try:
            kind = lstat_kind(os.lstat(full))
        except OSError:
            pass
        if e.errno == errno.ELOOP or kind == "a symbolic link":
            raise IndexCorruptError(f"{folder}: index file {name} is a symbolic link; plaid never follows "
                                    "links inside an index folder") from None
        raise IndexCorruptError(f"{folder}: index file {name} cannot be opened ({kind}: {e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IndexCorruptError(f"{folder}: index file {name} is {lstat_kind(st)}, not a regular file")
        if _NONBLOCK:
            try:
                import fcntl

                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
            except (ImportError, OSError):
                pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_exclusive(folder: str, name: str, mode: int = 0o644) -> int:
    """Create ``folder/name`` for writing; it must not exist (not even as a dangling link).

    Raises ``FileExistsError`` when something is already there (the caller decides whether
    that is a leftover of its own to remove first, or a planted file to refuse).
    """
    check_plain_name(name)
    return os.open(os.path.join(folder, name),
                   os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, mode)


def _read_header(f, folder: str, name: str):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=1 << 16)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=1 << 16)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # numpy raises ValueError / SyntaxError / EOFError on junk headers
        raise IndexCorruptError(f"{folder}: index file {name} cannot be read (not a .npy array: {e})") from None
    return tuple(shape), bool(fortran), dtype, f.tell()


def read_npy(folder: str, name: str, dtypes: Sequence[np.dtype], shape: Optional[Tuple[int, ...]] = None,
             nbytes: Optional[int] = None, mmap_mode: bool = True) -> np.ndarray:
    """Array stored in ``folder/name``, memory-mapped read-only or read into memory.

    The header must declare one of ``dtypes`` (never an object dtype), C order, ``shape`` when
    given, and the file must be exactly header + data long (and ``nbytes`` long when given).
    Every mismatch is an :class:`IndexCorruptError` naming the file. Never unpickles.
    """
    fd = open_regular(folder, name)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if nbytes is not None and size != nbytes:
            what = "truncated" if size < nbytes else "larger than recorded"
            raise IndexCorruptError(f"{folder}: index file {name} is {what} ({size} bytes, manifest says {nbytes})")
        shp, fortran, dtype, offset = _read_header(f, folder, name)
        allowed = [np.dtype(d) for d in dtypes]
        if dtype.hasobject or dtype not in allowed:
            raise IndexCorruptError(f"{folder}: index file {name} holds dtype {dtype}, expected "
                                    f"{' or '.join(str(d) for d in allowed)}")
        if fortran:
            raise IndexCorruptError(f"{folder}: index file {name} is in Fortran order")
        if shape is not None and shp != tuple(shape):
            raise IndexCorruptError(f"{folder}: index file {name} holds shape {list(shp)}, expected {list(shape)}")
        count = int(np.prod(shp, dtype=np.int64)) if shp else 1
        if offset + count * dtype.itemsize != size:
            raise IndexCorruptError(f"{folder}: index file {name} is {size} bytes; its header says "
                                    f"{offset + count * dtype.itemsize}")
        if count == 0:
            return np.zeros(shp, dtype)
        if mmap_mode:
            return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shp)
        out = np.empty(shp, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise IndexCorruptError(f"{folder}: index file {name} ended early while reading")
            got += n
        return out


def _header(dtype: np.dtype, shape) -> bytes:
    """The ``.npy`` header (format 1.0, or 2.0 when the header is too long) of a C-order array."""
    import io

    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(int(s) for s in shape)}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npy(fd: int, array: np.ndarray) -> int:
    """Write ``array`` as a ``.npy`` file to the fresh descriptor ``fd`` (plain writes, fsynced,
    closed). Returns the file size. A full disk raises ``OSError``."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        os.close(fd)
        raise ValueError("object arrays are never written")
    with os.fdopen(fd, "wb") as f:
        f.write(_header(array.dtype, array.shape))
        data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else b""
        for lo in range(0, len(data), CRC_BLOCK):
            f.write(data[lo : lo + CRC_BLOCK])
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for ``fd`` on disk: ``posix_fallocate``, else writing zeros."""
    if size <= 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise  # ENOSPC and friends: the disk is full
    os.lseek(fd, 0, os.SEEK_SET)
    zeros = bytes(min(size, _ZERO_BLOCK))
    left = size
    while left:
        left -= os.write(fd, zeros[: min(left, len(zeros))])


def create_npy(fd: int, shape, dtype) -> np.ndarray:
    """A writable memory map over a new ``.npy`` file at the fresh descriptor ``fd`` (closed here).

    The whole file is allocated before it is mapped, so writing through the map cannot fault on
    a full disk: that is an ``OSError`` here instead.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    try:
        header = _header(dtype, shape)
        total = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        _allocate(fd, total)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, header)
        with os.fdopen(os.dup(fd), "r+b") as f:
            return np.memmap(f, dtype=dtype, mode="r+", offset=len(header), shape=shape)
    finally:
        os.close(fd)


def file_crc32(fd: int) -> int:
    """CRC-32 of the whole file behind ``fd`` (read in 16 MiB blocks from its start)."""
    crc = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        block = os.read(fd, CRC_BLOCK)
        if not block:
            return crc
        crc = zlib.crc32(block, crc)


def drop_resident(a: np.ndarray) -> None:
    """Drop the pages of memory map ``a`` (an ``np.memmap`` over a whole file) from this process'
    resident set, after its data was copied elsewhere: they stay in the page cache, and a later
    read of the map faults them back in. A no-op for other arrays or without ``madvise``."""
    mm = getattr(a, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def free_bytes(folder: str) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``folder``
    (``statvfs``: available blocks x fragment size; ``shutil.disk_usage`` where there is none)."""
    if hasattr(os, "statvfs"):
        st = os.statvfs(folder)
        return int(st.f_bavail) * int(st.f_frsize)
    import shutil

    return int(shutil.disk_usage(folder).free)


def fsync_dir(folder: str) -> None:
    """fsync a directory (makes a rename durable); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_file(folder: str, name: str) -> bool:
    """Unlink ``folder/name`` if it is a regular file or a link (never a directory, never a link's
    target). Returns whether something was removed."""
    check_plain_name(name)
    full = os.path.join(folder, name)
    try:
        st = os.lstat(full)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    try:
        os.unlink(full)
        return True
    except OSError:
        return False

"""Exception types raised by plaid.

Every error plaid raises on purpose derives from :class:`PlaidError`, so a service
can catch one type. The subclasses say which side is at fault: the caller's input,
or the files on disk.
"""
from __future__ import annotations

__all__ = [
    "PlaidError",
    "InvalidInputError",
    "IndexExistsError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "FormatVersionError",
    "IndexLockedError",
    "IndexWriteError",
    "InsufficientSpaceError",
]


class PlaidError(Exception):
    """Base class of every error raised by plaid."""


class InvalidInputError(PlaidError, ValueError):
    """Documents, queries or parameters that plaid cannot use (wrong shape, dim, dtype, NaN, ...)."""


class IndexExistsError(PlaidError, FileExistsError):
    """Building into a directory that is not empty, without ``overwrite=True``."""


class IndexNotFoundError(PlaidError, FileNotFoundError):
    """The index directory does not exist or holds no committed index."""


class IndexCorruptError(PlaidError):
    """An index file is missing, truncated, altered or inconsistent with the manifest."""


class FormatVersionError(IndexCorruptError):
    """The index was written in a format version this release cannot read."""


class IndexLockedError(PlaidError):
    """Another process is writing to the index (one writer at a time; readers are never blocked)."""


class IndexWriteError(PlaidError, OSError):
    """Writing to the index folder failed (disk full, read-only or not permitted); the committed
    generation is unchanged and what the writer had created is removed."""

    def __str__(self) -> str:
        return str(self.strerror)


class InsufficientSpaceError(IndexWriteError):
    """The index folder's file system has less free space than a build or ``add`` needs; raised
    before anything is written. ``needed_bytes`` and ``free_bytes`` hold the figures."""

    def __init__(self, message: str, needed_bytes: int, free_bytes: int):
        import errno

        super().__init__(errno.ENOSPC, message)
        self.needed_bytes = int(needed_bytes)
        self.free_bytes = int(free_bytes)

"""Whether numba is being loaded in the background, so that a search need not wait for it.

Opening an index starts loading the compiled kernels in a background thread
(:func:`plaid.search.kernels_cpu.warmup`): numba's import and start-up take ~0.5-1 s with a warm
cache, and compiling takes ~20 s with a cold one. Until that thread is done, a one-query search in
another thread runs the numpy kernels and BLAS (the same results where BLAS sums in order, as
MKL does: tested) instead of waiting on numba's compiler lock. Loader threads, and a thread inside
:func:`as_loader`, are exempt.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

_cond = threading.Condition()
_count = 0  # loaders started and not finished
_tls = threading.local()


def _exempt() -> bool:
    return getattr(_tls, "loader", 0) > 0


def busy() -> bool:
    """True while a background loader is running and the calling thread is not one."""
    return _count > 0 and not _exempt()


@contextmanager
def as_loader() -> Iterator[None]:
    """The calling thread counts as a loader in the block (it compiles rather than falls back;
    nothing is counted: others do not wait for it)."""
    _tls.loader = getattr(_tls, "loader", 0) + 1
    try:
        yield
    finally:
        _tls.loader -= 1


def start(fn: Callable[[], None], name: str) -> threading.Thread:
    """Run ``fn()`` in a daemon thread that counts as a loader from before this returns until
    ``fn`` ends (so that a search right after sees :func:`busy`). An exception in ``fn`` goes
    to ``threading.excepthook`` as in any thread; the count drops all the same."""
    global _count

    def body() -> None:
        global _count
        try:
            with as_loader():
                fn()
        finally:
            with _cond:
                _count -= 1
                _cond.notify_all()

    t = threading.Thread(target=body, name=name, daemon=True)
    with _cond:
        _count += 1
    try:
        t.start()
    except BaseException:
        with _cond:
            _count -= 1
            _cond.notify_all()
        raise
    return t


def wait(timeout: Optional[float] = None) -> bool:
    """Wait until no background loader runs (at most ``timeout`` seconds in all); True when none
    is left. A loader thread does not wait (for itself or others)."""
    if _count == 0 or _exempt():  # nothing loading (the common case: no lock taken), or a loader
        return _count == 0
    with _cond:
        return _cond.wait_for(lambda: _count == 0, timeout)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: no loader runs in it. (numba state that a
    loader left half-loaded at the fork is numba's, as with any fork of a threaded process.)"""
    global _cond, _count
    _cond = threading.Condition()
    _count = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

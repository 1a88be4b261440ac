"""Whether numba is being loaded in the background, so that a search does not wait for it.

Opening an index starts loading the compiled kernels in a background thread
(:func:`plaid.search.kernels_cpu.warmup`): numba's import and start-up take ~0.5-1 s with a warm
cache, and compiling takes ~20 s with a cold one. Until that thread is done, searches in other
threads run the numpy kernels and BLAS, which give the same results (tested bit for bit), instead
of waiting on numba's compiler lock. The loading thread itself is exempt.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional

_lock = threading.Lock()
_count = 0  # loaders started and not finished
_threads: List[threading.Thread] = []
_tls = threading.local()


def busy() -> bool:
    """True while a background loader is running and the calling thread is not it."""
    return _count > 0 and not getattr(_tls, "loader", False)


def start(fn: Callable[[], None], name: str) -> threading.Thread:
    """Run ``fn()`` in a daemon thread that counts as a loader from before this returns until
    ``fn`` ends (so that a search right after sees :func:`busy`)."""
    global _count

    def body() -> None:
        global _count
        _tls.loader = True
        try:
            fn()
        finally:
            _tls.loader = False
            with _lock:
                _count -= 1

    t = threading.Thread(target=body, name=name, daemon=True)
    with _lock:
        _count += 1
        _threads[:] = [x for x in _threads if x.is_alive()] + [t]
    try:
        t.start()
    except BaseException:
        with _lock:
            _count -= 1
        raise
    return t


def wait(timeout: Optional[float] = None) -> bool:
    """Wait for the background loaders started so far; True when none is left running."""
    with _lock:
        threads = list(_threads)
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout)
    return not any(t.is_alive() for t in threads)

"""Where sharded work runs: Ray, started here or joined.

* no address: plaid starts a local Ray in this process (``ray.init(address="local")``: a new
  one-machine cluster, whatever ``RAY_ADDRESS`` or a stale ``/tmp/ray`` says), so the feature
  works on one laptop;
* ``"auto"`` or ``"host:port"``: plaid joins an existing cluster. Before ``ray.init`` (which
  keeps retrying an address that does not answer, for minutes), a child process tries the
  connection for at most ``timeout`` seconds; an address that does not answer in time is a
  :class:`~plaid.distributed.errors.RayUnavailableError` naming it;
* Ray already initialised in this process (``ray.init`` called by the application, or by an
  earlier plaid call): that connection is used as it is.

Ray is an optional extra (``pip install "plaid-engine[ray]"``); this module imports it only
when called.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import Optional

from .errors import RayUnavailableError

__all__ = ["ray_module", "connect", "CONNECT_TIMEOUT_S"]

logger = logging.getLogger(__name__)

#: Seconds an address may take to answer before plaid gives up on it.
CONNECT_TIMEOUT_S = 30.0

_PROBE = r"""
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print("PLAID-RAY-GCS " + ray.get_runtime_context().gcs_address, flush=True)
ray.shutdown()
"""


def ray_module():
    """The ``ray`` module, or :class:`RayUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailableError('sharded indexes run on Ray, which is not installed: '
                                  'pip install "plaid-engine[ray]" (or pip install ray)') from None
    return ray


def _probe(address: str, timeout: float) -> str:
    """The GCS address a child process reached at ``address`` within ``timeout`` seconds."""
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RayUnavailableError(f"the Ray cluster at {address!r} did not answer within {timeout:g} s "
                                  "(is it running, and is the address right?)") from None
    for line in p.stdout.splitlines():
        if line.startswith("PLAID-RAY-GCS "):
            return line.split(" ", 1)[1].strip()
    lines = [x.strip() for x in (p.stderr or "").splitlines() if x.strip()]
    why = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "no answer")
    raise RayUnavailableError(f"cannot join the Ray cluster at {address!r}: {why[:300]}")


def connect(ray_address: Optional[str] = None, *, timeout: float = CONNECT_TIMEOUT_S,
            num_cpus: Optional[int] = None, init_options: Optional[dict] = None):
    """Ray, connected: an existing connection of this process, a new local Ray (``ray_address``
    None), or the cluster at ``ray_address`` (``"auto"``, ``"host:port"``). Returns ``ray``.

    ``num_cpus`` (a local Ray only): CPUs it offers (default: all). ``init_options``: further
    keyword arguments of ``ray.init`` (e.g. ``object_store_memory``).
    """
    ray = ray_module()
    if ray.is_initialized():
        return ray
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise RayUnavailableError(f"ray_address must be None, 'auto' or 'host:port', got {ray_address!r}")
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    options.update(init_options or {})
    if ray_address is None:
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        try:
            ray.init(address="local", **options)
        except Exception as e:  # noqa: BLE001 - Ray's own errors: one PlaidError
            raise RayUnavailableError(f"cannot start a local Ray: {type(e).__name__}: {e}") from None
        logger.info("started a local Ray (%s)", ray.get_runtime_context().gcs_address)
        return ray
    gcs = _probe(ray_address.strip(), float(timeout))
    options.pop("include_dashboard", None)
    try:
        ray.init(address=gcs, **options)
    except Exception as e:  # noqa: BLE001
        raise RayUnavailableError(f"cannot join the Ray cluster at {ray_address!r}: {type(e).__name__}: {e}") from None
    logger.info("joined the Ray cluster at %s", gcs)
    return ray

"""Errors of the sharded layer (importable without Ray)."""
from __future__ import annotations

from typing import Sequence

from ..errors import PlaidError

__all__ = ["ShardUnavailableError", "RayUnavailableError"]


class ShardUnavailableError(PlaidError):
    """A shard did not answer within the timeout (its actor died and was not restarted, or hangs).

    ``shards``: the names of the shards that did not answer (``["shard-2"]``).
    """

    def __init__(self, message: str, shards: Sequence[str] = ()):
        super().__init__(message)
        self.shards = list(shards)


class RayUnavailableError(PlaidError):
    """Ray is not installed, or the Ray cluster at the given address does not answer."""

"""Beyond one machine: sharded indexes built and searched on Ray.

* :func:`build_sharded` — train once on a sample of the whole corpus, encode each shard in a Ray
  task into an ordinary plaid index folder, commit the sharded manifest (:mod:`.build`);
* :class:`ShardedSearcher` — one Ray actor per shard, every batch fanned out to all of them,
  results merged into an exact top-k by stage-4 score (:mod:`.searcher`);
* :class:`ShardedIndex` — the folder and its manifest: facts, ``add``, ``delete``,
  ``compact``, ``verify`` (:mod:`.sharded`; needs no Ray);
* :func:`connect` — a local Ray started here, or an existing cluster joined (:mod:`.cluster`).

Ray is an optional extra (``pip install "plaid-engine[ray]"``): importing this package does not
import it; building and searching do.
"""
from __future__ import annotations

import importlib

from .errors import RayUnavailableError, ShardUnavailableError
from .sharded import ShardedIndex, is_sharded

_LAZY = {
    "build_sharded": "plaid.distributed.build",
    "ShardedSearcher": "plaid.distributed.searcher",
    "ShardedResults": "plaid.distributed.searcher",
    "connect": "plaid.distributed.cluster",
}

__all__ = ["build_sharded", "ShardedSearcher", "ShardedResults", "ShardedIndex", "is_sharded", "connect",
           "ShardUnavailableError", "RayUnavailableError"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plaid.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

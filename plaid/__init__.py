"""plaid: a PLAID late-interaction (ColBERT) index and search engine.

Build a compressed index from token embeddings, then search it with MaxSim::

    import plaid
    index = plaid.Indexer().build("idx/", documents)   # documents: list of [n_tokens, dim] arrays
    searcher = plaid.Searcher("idx/")
    res = searcher.search(queries, k=10)              # res.ids int64 [nq, k], res.scores float32 [nq, k]

The public names are loaded on first use, so ``import plaid.search`` does not load the indexing
code and ``import plaid.indexing`` does not load the search code.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .embeddings import Embeddings
from .maxsim import maxsim  # eager: the submodule plaid.maxsim would otherwise shadow the function
from .errors import (
    FormatVersionError,
    IndexCorruptError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
    IndexWriteError,
    InsufficientSpaceError,
    InvalidInputError,
    PlaidError,
)

_LAZY = {
    "Indexer": "plaid.indexing.indexer",
    "Index": "plaid.indexing.index",
    "Searcher": "plaid.search.searcher",
    "Results": "plaid.search.searcher",
    "default_search_params": "plaid.search.searcher",
    "SearchParams": "plaid.search.params",
    "ShardedSearcher": "plaid.distributed.searcher",
    "ShardedIndex": "plaid.distributed.sharded",
    "build_sharded": "plaid.distributed.build",
    "upgrade": "plaid.store.upgrade",
}

if TYPE_CHECKING:  # pragma: no cover
    from .indexing.index import Index
    from .indexing.indexer import Indexer
    from .search.params import SearchParams
    from .search.searcher import Results, Searcher, default_search_params
    from .distributed import ShardedIndex, ShardedSearcher, build_sharded
    from .store.upgrade import upgrade

__all__ = [
    "Indexer",
    "Index",
    "Searcher",
    "Results",
    "SearchParams",
    "Embeddings",
    "maxsim",
    "default_search_params",
    "ShardedSearcher",
    "ShardedIndex",
    "build_sharded",
    "upgrade",
    "PlaidError",
    "InvalidInputError",
    "IndexExistsError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "FormatVersionError",
    "IndexWriteError",
    "InsufficientSpaceError",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plaid' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

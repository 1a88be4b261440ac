"""plaid: a PLAID late-interaction (ColBERT) index and search engine.

Build a compressed index from token embeddings, then search it with MaxSim::

    import plaid
    index = plaid.Indexer().build("idx/", documents)   # documents: list of [n_tokens, dim] arrays
    searcher = plaid.Searcher("idx/")
    res = searcher.search(queries, k=10)              # res.ids int64 [nq, k], res.scores float32 [nq, k]
"""
from .embeddings import Embeddings
from .errors import (
    FormatVersionError,
    IndexCorruptError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidInputError,
    PlaidError,
)
from .indexing.index import Index
from .indexing.indexer import Indexer
from .maxsim import maxsim
from .search.searcher import Results, Searcher, default_search_params

__version__ = "0.1.0"

__all__ = [
    "Indexer",
    "Index",
    "Searcher",
    "Results",
    "Embeddings",
    "maxsim",
    "default_search_params",
    "PlaidError",
    "InvalidInputError",
    "IndexExistsError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "FormatVersionError",
]

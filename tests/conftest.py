"""Shared fixtures: small synthetic corpora, and msmarco-5k when ../shared/data/msmarco-5k exists."""
from __future__ import annotations

import os

import numpy as np
import pytest

import plaid
from plaid.demo import synthetic_corpus, synthetic_queries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSMARCO = os.environ.get("PLAID_MSMARCO_5K", os.path.join(REPO, "..", "shared", "data", "msmarco-5k"))


@pytest.fixture(scope="session")
def small_corpus():
    """600 unit-norm documents (dim 64) and 30 queries."""
    docs = synthetic_corpus(600, dim=64, num_topics=64, seed=3, min_len=5, max_len=40)
    return docs, synthetic_queries(docs, 30, seed=4)


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, small_corpus):
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("idx") / "small")
    plaid.Indexer(show_progress=False, pq_m=16).build(path, docs, doc_ids=[f"doc-{i}" for i in range(len(docs))])
    return path


def msmarco_available() -> bool:
    return os.path.exists(os.path.join(MSMARCO, "doc_embeddings.f16.npy"))


requires_msmarco = pytest.mark.skipif(
    not msmarco_available(), reason=f"msmarco-5k not found at {MSMARCO} (set PLAID_MSMARCO_5K to its folder)"
)

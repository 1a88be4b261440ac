"""Shared helpers of the benchmark scripts: loading msmarco-5k and tie-tolerant recall."""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "msmarco-5k")


def load_bundle(path: str = DEFAULT_DATA) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """(doc vectors float16 [T, d] memory-mapped, doclens int64 [N], queries as float32 [m_i, d] arrays)."""
    X = np.load(os.path.join(path, "doc_embeddings.f16.npy"), mmap_mode="r")
    doclens = np.load(os.path.join(path, "doclens.npy")).astype(np.int64)
    return X, doclens, load_queries(path)


def load_queries(path: str = DEFAULT_DATA) -> List[np.ndarray]:
    """A bundle's queries as float32 [m_i, d] arrays (its query files alone: no document vectors)."""
    Q = np.load(os.path.join(path, "query_embeddings.f16.npy"))
    qlens = np.load(os.path.join(path, "query_lens.npy"))
    qoff = np.concatenate([[0], np.cumsum(qlens)])
    return [Q[qoff[i] : qoff[i + 1]].astype(np.float32) for i in range(len(qlens))]


def recall_at(exact_scores: np.ndarray, ids: np.ndarray, k: int = 10, tol: float = 1e-4) -> float:
    """Tie-tolerant recall@k: a returned id counts when its exact score >= the k-th exact score - tol.

    exact_scores: float32 [nq, N] exhaustive MaxSim; ids: int64 [nq, >=k] (-1 = no hit).
    """
    kth = -np.sort(-exact_scores, axis=1)[:, k - 1] - tol
    hits = 0
    for i in range(len(ids)):
        got = ids[i, :k]
        got = got[got >= 0]
        hits += int((exact_scores[i, got] >= kth[i]).sum())
    return hits / (k * len(ids))

"""End-to-end demo on data plaid generates itself: build, search, recall vs exhaustive MaxSim, latency.

Run ``python -m plaid.demo`` (``--help`` for options). Nothing is downloaded.

The synthetic corpus imitates ColBERT token embeddings: a few hundred latent "topics" on the unit
sphere, documents of 20-120 tokens drawn around 2-4 topics each, unit-normalised; queries are
4-12-token spans of random documents, perturbed and renormalised, so that each has a real best
document. It exercises every stage without needing any model or dataset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import List, Tuple

import numpy as np

__all__ = ["synthetic_corpus", "synthetic_queries", "main"]


def synthetic_corpus(num_docs: int = 4000, dim: int = 128, num_topics: int = 256, seed: int = 0,
                     min_len: int = 20, max_len: int = 120, noise: float = 0.5) -> List[np.ndarray]:
    """``num_docs`` float32 documents ``[n_tokens, dim]`` with unit-norm rows (seeded).

    Each token is a topic direction plus Gaussian noise of expected norm ``noise``, renormalised.
    """
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(num_topics, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len + 1))
        mix = rng.choice(num_topics, size=int(rng.integers(2, 5)), replace=False)
        centers = topics[rng.choice(mix, size=n)]
        x = centers + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim)).astype(np.float32)
        docs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return docs


def synthetic_queries(docs: List[np.ndarray], num_queries: int = 100, seed: int = 1,
                      noise: float = 0.05) -> List[np.ndarray]:
    """Queries: 4-12-token spans of random documents, perturbed by ``noise`` and renormalised."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_queries):
        d = docs[int(rng.integers(len(docs)))]
        m = min(int(rng.integers(4, 13)), len(d))
        start = int(rng.integers(0, len(d) - m + 1))
        q = d[start : start + m] + rng.normal(scale=noise, size=(m, d.shape[1])).astype(np.float32)
        out.append((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    return out


def _recall(exact: np.ndarray, ids: np.ndarray, k: int) -> float:
    kth = -np.sort(-exact, axis=1)[:, k - 1] - 1e-4
    hits = sum(int((exact[i, ids[i, :k][ids[i, :k] >= 0]] >= kth[i]).sum()) for i in range(len(ids)))
    return hits / (k * len(ids))


def run(num_docs: int, num_queries: int, index_dir: str, k: int = 10) -> dict:
    """Build, search and measure; returns the figures printed by :func:`main`."""
    import torch

    import plaid

    docs = synthetic_corpus(num_docs)
    queries = synthetic_queries(docs, num_queries)
    ntok = sum(len(d) for d in docs)
    print(f"corpus: {num_docs} documents, {ntok} tokens, dim {docs[0].shape[1]}; {num_queries} queries")

    t = time.perf_counter()
    index = plaid.Indexer().build(index_dir, docs, overwrite=True)
    build_s = time.perf_counter() - t
    searcher = plaid.Searcher(index_dir)

    with torch.inference_mode():
        t = time.perf_counter()
        exact = plaid.maxsim(queries, docs)
        exhaustive_ms = (time.perf_counter() - t) / num_queries * 1e3
    res = searcher.search(queries, k=k)
    recall = _recall(exact, res.ids, k)

    searcher.search(queries[0], k=k)  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        searcher.search(q, k=k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    searcher.search(queries, k=k)
    batch_ms = (time.perf_counter() - t) / num_queries * 1e3
    out = {
        "build_s": build_s,
        "bytes_per_token": index.bytes_per_token(),
        f"recall@{k}": recall,
        "median_latency_ms": float(np.median(times) * 1e3),
        "batch_ms_per_query": batch_ms,
        "exhaustive_ms_per_query": exhaustive_ms,
    }
    print(f"index: {index.num_centroids} centroids, {index.codec['name']} codec, "
          f"{out['bytes_per_token']:.1f} bytes/token, built in {build_s:.1f}s")
    print(f"recall@{k} vs exhaustive MaxSim: {recall:.3f}")
    print(f"latency: median {out['median_latency_ms']:.2f} ms/query single, {batch_ms:.2f} ms/query batched; "
          f"exhaustive MaxSim {exhaustive_ms:.1f} ms/query (batched)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plaid.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="number of synthetic documents (default 4000)")
    ap.add_argument("--queries", type=int, default=100, help="number of queries (default 100)")
    ap.add_argument("--index", default=None, help="index directory (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    tmp = None
    index_dir = args.index
    if index_dir is None:
        tmp = tempfile.mkdtemp(prefix="plaid-demo-")
        index_dir = os.path.join(tmp, "index")
    try:
        run(args.docs, args.queries, index_dir)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

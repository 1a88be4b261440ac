"""Benchmark corpora: msmarco-5k (real) and larger ones grown from it by span mixing, with cached
exact ground truth.

Growing (``grow``): each new document concatenates random 8-24-token spans of random real
documents (vectors copied as stored, float16) until it reaches a length drawn from the real
length distribution. Spans are drawn as one stream and cut at document boundaries, so a
document's first and last spans may be partial. Queries are the real ones followed by
``pseudo_queries`` pseudo-queries: random 4-12-token spans of random real documents, each token
perturbed by Gaussian noise (``noise`` per dimension) and renormalised to unit length.

The corpus is written in chunks of ``chunk_docs`` documents straight into a memory-mapped
float16 file, so memory stays bounded whatever the size (500k documents are ~40M tokens, ~10 GB).
The bundle has msmarco-5k's layout (``doc_embeddings.f16.npy``, ``doclens.npy``,
``query_embeddings.f16.npy``, ``query_lens.npy``) plus ``meta.json`` — the generator's seed and
parameters — written last: a folder without it is an unfinished bundle and is rebuilt.

Ground truth (``ground_truth``): the exact top-``depth`` documents of every query by exhaustive
MaxSim (float32 over the stored float16 vectors, the sums of :func:`plaid.maxsim`), computed in blocks of
documents with a running top-k merge, and cached on disk with the bundle's meta. ``depth`` is
100 plus a margin, so that tie-tolerant recall@100 can tell whether a document outside the list
might still be tied with rank 100 (see :func:`recall`).

Usage::

    python benchmarks/corpora.py --sizes 50k,200k [--seed 0] [--work benchmarks/_work]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _data import load_bundle  # noqa: E402

DEFAULT_WORK = os.path.join(HERE, "_work")
DEFAULT_SOURCE = os.environ.get(
    "PLAID_MSMARCO_5K", os.path.join(HERE, "..", "..", "shared", "data", "msmarco-5k"))
GT_DEPTH = 128  # ranks kept in the ground truth: 100 and a margin for ties at rank 100
GEN_VERSION = 1

GROW_DEFAULTS = dict(span_min=8, span_max=24, query_span_min=4, query_span_max=12, pseudo_queries=300,
                     noise=0.03, chunk_docs=10_000)


def parse_size(s) -> int:
    """'50k' -> 50000, '1.5m' -> 1500000, '5000' -> 5000."""
    s = str(s).strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    try:
        n = int(float(s[:-1] if mult > 1 else s) * mult)
    except ValueError:
        raise ValueError(f"corpus size {s!r}: expected a document count such as 5000, 50k or 1.5m") from None
    if n <= 0:
        raise ValueError(f"corpus size {s!r}: must be positive")
    return n


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def bundle_files_exist(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in
               ("doc_embeddings.f16.npy", "doclens.npy", "query_embeddings.f16.npy", "query_lens.npy"))


def _expand(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)


def _draw_spans(rng, n_tokens: int, src_offsets: np.ndarray, span_min: int, span_max: int) -> np.ndarray:
    """Token positions (into the source) of a stream of random spans, at least ``n_tokens`` long."""
    src_lens = np.diff(src_offsets)
    out, have = [], 0
    while have < n_tokens:
        n = max(16, int((n_tokens - have) / ((span_min + span_max) / 2) * 1.1) + 1)
        doc = rng.integers(0, len(src_lens), n)
        ln = np.minimum(rng.integers(span_min, span_max + 1, n), src_lens[doc])
        start = src_offsets[doc] + (rng.random(n) * (src_lens[doc] - ln + 1)).astype(np.int64)
        pos = _expand(start, ln)
        out.append(pos)
        have += len(pos)
    return np.concatenate(out)[:n_tokens]


def grow(source: str, out: str, num_docs: int, seed: int = 0, **params) -> dict:
    """Write a span-mixed bundle of ``num_docs`` documents to ``out`` (skipped when it exists
    with the same meta). Returns the meta."""
    p = dict(GROW_DEFAULTS, **params)
    meta = {"kind": "span-mixed", "generator_version": GEN_VERSION, "source": os.path.abspath(source),
            "num_docs": int(num_docs), "seed": int(seed), **p}
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta if k != "source"} == {k: v for k, v in meta.items() if k != "source"} \
                and bundle_files_exist(out):
            return old
    from plaid.embeddings import release_pages

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.perf_counter()
    X, src_doclens, real_queries = load_bundle(source)
    X = np.ascontiguousarray(X)  # the source in RAM (~100 MB for msmarco-5k)
    src_offsets = np.concatenate([[0], np.cumsum(src_doclens)]).astype(np.int64)
    ss = np.random.SeedSequence(seed)
    len_ss, q_ss, chunk_ss = ss.spawn(3)
    doclens = np.random.default_rng(len_ss).choice(src_doclens, size=num_docs, replace=True).astype(np.int32)
    total = int(doclens.sum())
    tmp = os.path.join(out, "doc_embeddings.f16.tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, X.shape[1]))
    chunk = int(p["chunk_docs"])
    n_chunks = -(-num_docs // chunk)
    rngs = [np.random.default_rng(s) for s in chunk_ss.spawn(n_chunks)]
    row = 0
    for c in range(n_chunks):
        n_tok = int(doclens[c * chunk : (c + 1) * chunk].sum())
        pos = _draw_spans(rngs[c], n_tok, src_offsets, p["span_min"], p["span_max"])
        mm[row : row + n_tok] = X[pos]
        row += n_tok
        if c % 10 == 9:
            mm.flush()
            release_pages(mm, 0, row)  # written back: out of the resident set (the file outgrows RAM)
    mm.flush()
    del mm
    os.replace(tmp, os.path.join(out, "doc_embeddings.f16.npy"))
    np.save(os.path.join(out, "doclens.npy"), doclens)

    # queries: the real ones, then pseudo-queries
    qrng = np.random.default_rng(q_ss)
    pseudo = []
    for _ in range(int(p["pseudo_queries"])):
        d = int(qrng.integers(0, len(src_doclens)))
        ln = min(int(qrng.integers(p["query_span_min"], p["query_span_max"] + 1)), int(src_doclens[d]))
        s = src_offsets[d] + int(qrng.integers(0, src_doclens[d] - ln + 1))
        q = X[s : s + ln].astype(np.float32) + qrng.normal(0, p["noise"], (ln, X.shape[1])).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        pseudo.append(q)
    qs = list(real_queries) + pseudo
    np.save(os.path.join(out, "query_embeddings.f16.npy"), np.concatenate(qs).astype(np.float16))
    np.save(os.path.join(out, "query_lens.npy"), np.array([len(q) for q in qs], np.int32))
    meta.update(num_tokens=total, num_queries=len(qs), real_queries=len(real_queries),
                generate_s=round(time.perf_counter() - t0, 1), created=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def bundle_meta(path: str) -> dict:
    """meta.json of a grown bundle, or a description of a real one (msmarco-5k)."""
    mp = os.path.join(path, "meta.json")
    if os.path.exists(mp):
        with open(mp) as f:
            return json.load(f)
    doclens = np.load(os.path.join(path, "doclens.npy"))
    qlens = np.load(os.path.join(path, "query_lens.npy"))
    return {"kind": "real", "source": os.path.abspath(path), "num_docs": int(len(doclens)),
            "num_tokens": int(doclens.sum()), "num_queries": int(len(qlens))}


def _fingerprint(path: str) -> str:
    """Cheap identity of a bundle's files: sizes and mtimes."""
    h = hashlib.sha1()
    for f in ("doc_embeddings.f16.npy", "doclens.npy", "query_embeddings.f16.npy", "query_lens.npy"):
        st = os.stat(os.path.join(path, f))
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()[:16]


def _gt_kernel():
    """numba kernel of the ground truth: per document, per query, the sum over the query's tokens
    of the best similarity among the document's tokens (compiled once, cached on disk)."""
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def segment_maxsim(sims, offs, qoff, out):  # sims float32 [t, M], offs int64 [n + 1], out [n, nq]
        n, M = len(offs) - 1, sims.shape[1]
        nq = len(qoff) - 1
        for d in numba.prange(n):
            lo, hi = offs[d], offs[d + 1]
            if hi == lo:
                for q in range(nq):
                    out[d, q] = -np.inf
                continue
            best = sims[lo].copy()
            for r in range(lo + 1, hi):
                row = sims[r]
                for j in range(M):
                    if row[j] > best[j]:
                        best[j] = row[j]
            for q in range(nq):
                acc = np.float32(0.0)
                for j in range(qoff[q], qoff[q + 1]):
                    acc += best[j]
                out[d, q] = acc
    return segment_maxsim


def exact_scores(queries: List[np.ndarray], X: np.ndarray, offsets: np.ndarray, doc_start: int, doc_end: int,
                 chunk_tokens: int = 1 << 15, kernel=None) -> np.ndarray:
    """Exact MaxSim (float32 [nq, doc_end - doc_start]) of documents ``[doc_start, doc_end)`` of the
    flat float16 vectors ``X`` [T, dim] (``offsets`` int64 [N + 1]) for every query.

    The same sums as :func:`plaid.maxsim` (a float32 product of the tokens with every query
    token, the best per document and query token, summed over the query's tokens in order), with
    the per-document max in a numba kernel instead of ``np.maximum.reduceat`` over ``[t, M]``
    (the reduceat took 60% of the time with the 350 queries' ~2,800 tokens). Empty documents
    score -inf.
    """
    import torch

    from plaid.embeddings import release_pages

    kernel = kernel or _gt_kernel()
    qcat = torch.from_numpy(np.ascontiguousarray(np.concatenate(queries), np.float32))
    qoff = np.concatenate([[0], np.cumsum([len(q) for q in queries])]).astype(np.int64)
    out = np.empty((doc_end - doc_start, len(queries)), np.float32)
    d = doc_start
    while d < doc_end:  # whole documents per step, about chunk_tokens tokens (one long one alone)
        e = int(np.searchsorted(offsets, offsets[d] + chunk_tokens, side="right")) - 1
        e = min(max(e, d + 1), doc_end)
        lo, hi = int(offsets[d]), int(offsets[e])
        block = torch.from_numpy(np.asarray(X[lo:hi], dtype=np.float32))
        release_pages(X, lo, hi)  # read once: out of the resident set (the 1M file is 20 GB)
        sims = (block @ qcat.T).numpy()
        kernel(sims, offsets[d : e + 1] - lo, qoff, out[d - doc_start : e - doc_start])
        d = e
    return out.T


def ground_truth(bundle: str, cache_dir: str, depth: int = GT_DEPTH, block_docs: int = 20_000,
                 threads: Optional[int] = None, log=print) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``depth`` (ids int64 [nq, depth], scores float32 [nq, depth]) of every query of
    ``bundle`` by exhaustive MaxSim (:func:`exact_scores`), cached in ``cache_dir`` (recomputed
    when the bundle changed).

    Ranked by score, ties by document order. Computed ``block_docs`` documents at a time, with a
    running top-``depth`` merge, so memory stays bounded whatever the corpus size.
    """
    import numba
    import torch

    if threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    fp = _fingerprint(bundle)
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            m = json.load(f)
        if m.get("fingerprint") == fp and m.get("depth") == depth:
            return np.load(os.path.join(cache_dir, "ids.npy")), np.load(os.path.join(cache_dir, "scores.npy"))
    os.makedirs(cache_dir, exist_ok=True)
    X, doclens, queries = load_bundle(bundle)
    N = len(doclens)
    offsets = np.concatenate([[0], np.cumsum(doclens)]).astype(np.int64)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    kernel = _gt_kernel()
    t0 = time.perf_counter()
    for a in range(0, N, block_docs):
        b = min(a + block_docs, N)
        s = exact_scores(queries, X, offsets, a, b, kernel=kernel)  # [nq, b - a]
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(a, b), s.shape)], axis=1)
        # order by (-score, id): lexsort's last key is primary
        order = np.stack([np.lexsort((ci, -cs))[:depth] for cs, ci in zip(cand_s, cand_i)])
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
        if log and (b == N or (a // block_docs) % 5 == 4):
            el = time.perf_counter() - t0
            log(f"  ground truth {os.path.basename(bundle)}: {b}/{N} documents, {el:.0f}s "
                f"(~{el / b * (N - b):.0f}s left)")
    np.save(os.path.join(cache_dir, "ids.npy"), best_i)
    np.save(os.path.join(cache_dir, "scores.npy"), best_s.astype(np.float32))
    m = {"bundle": os.path.abspath(bundle), "fingerprint": fp, "depth": depth, "block_docs": block_docs,
         "compute_s": round(time.perf_counter() - t0, 1), "threads": threads,
         "method": "float32 products over the stored float16 vectors, per-document max (numba), summed per query",
         "bundle_meta": bundle_meta(bundle), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(m, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return best_i, best_s


class Recall:
    """Tie-tolerant recall@k against cached ground truth (the same rule as ``_data.recall_at``).

    A returned id counts when its exact score >= the k-th exact score - ``tol``. Ids in the
    ground-truth list use its scores; an id outside it can only count when the list's last
    score is itself within ``tol`` of the k-th; then its exact score is computed from the bundle.
    """

    def __init__(self, bundle: str, gt_ids: np.ndarray, gt_scores: np.ndarray, tol: float = 1e-4):
        self.bundle, self.ids, self.scores, self.tol = bundle, gt_ids, gt_scores, tol
        self._lookup = [dict(zip(r.tolist(), s.tolist())) for r, s in zip(gt_ids, gt_scores)]
        self._data = None

    def _exact(self, qi: int, doc: int) -> float:
        if self._data is None:
            X, doclens, queries = load_bundle(self.bundle)
            self._data = (X, np.concatenate([[0], np.cumsum(doclens)]), queries)
        X, offs, queries = self._data
        D = np.asarray(X[offs[doc] : offs[doc + 1]], np.float32)
        return float((queries[qi] @ D.T).max(1).sum()) if len(D) else float("-inf")

    def __call__(self, ids: np.ndarray, k: int) -> Optional[float]:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] < k or k > self.ids.shape[1]:
            return None
        hits = 0
        for qi in range(len(ids)):
            kth = self.scores[qi, k - 1] - self.tol
            open_tail = self.scores[qi, -1] >= kth
            seen = set()
            for d in ids[qi, :k].tolist():
                if d < 0 or d in seen:
                    continue
                seen.add(d)
                s = self._lookup[qi].get(d)
                if s is None and open_tail:
                    s = self._exact(qi, d)
                if s is not None and s >= kth:
                    hits += 1
        return hits / (k * len(ids))


def corpus_path(work: str, size: str, source: str = DEFAULT_SOURCE) -> str:
    """The bundle folder of a size label: '5k' is the real msmarco-5k, others are grown."""
    if size == "5k":
        return source
    return os.path.join(work, "corpora", f"span-{size}")


def prepare(size: str, work: str = DEFAULT_WORK, source: str = DEFAULT_SOURCE, seed: int = 0,
            threads: Optional[int] = None, log=print, **params) -> Tuple[str, dict, np.ndarray, np.ndarray]:
    """Bundle path, meta and ground truth (ids, scores) of one corpus size, built when missing."""
    path = corpus_path(work, size, source)
    if path != source:
        if log:
            log(f"corpus {size}: {path}")
        t = time.perf_counter()
        meta = grow(source, path, parse_size(size), seed=seed, **params)
        if log and time.perf_counter() - t > 1:
            log(f"  generated in {time.perf_counter() - t:.0f}s: {meta['num_tokens']} tokens")
    else:
        meta = bundle_meta(path)
    gt_ids, gt_scores = ground_truth(path, os.path.join(work, "gt", os.path.basename(os.path.normpath(path))),
                                     threads=threads, log=log)
    return path, meta, gt_ids, gt_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50k")
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--work", default=DEFAULT_WORK)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        path, meta, ids, _ = prepare(size, args.work, args.source, args.seed, args.threads)
        print(f"{size}: {path} ({meta['num_docs']} docs, {meta['num_tokens']} tokens, {ids.shape[0]} queries)")


if __name__ == "__main__":
    main()

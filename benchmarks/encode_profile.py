"""Where an encoded token's time goes: each step of the build's chunk encoding
(:func:`plaid.indexing.encode._encode_chunk`), timed on one thread with an existing index's
centroids and codec, and the PQ codes by the compiled encoder against faiss's (the one it
replaced), in microseconds per token::

    python benchmarks/encode_profile.py --index DIR --corpus FOLDER [--tokens 100000] [--rounds 3]

``--corpus``: a folder holding ``doc_embeddings.f16.npy`` (the span-mixed corpora of
``benchmarks/corpora.py``); tokens are read from its middle. Each round times every step once
(the steps alternate with the faiss encoder); reported are the medians over rounds, and whether
the two encoders gave the same codes. Prints one JSON object; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--corpus", required=True, help="folder holding doc_embeddings.f16.npy")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        ap.error("--tokens and --rounds must be at least 1")
    import faiss
    import torch

    import plaid
    from plaid.indexing.kmeans import CentroidAssigner

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    engine = plaid.Searcher(args.index, num_threads=1)._state.engine
    centroids = np.ascontiguousarray(engine.centroids, np.float32)
    codec = engine.codec
    X = np.load(os.path.join(args.corpus, "doc_embeddings.f16.npy"), mmap_mode="r")
    lo = max(0, len(X) // 2 - args.tokens // 2)
    x0 = np.asarray(X[lo : lo + args.tokens], np.float32)
    n = len(x0)
    t0 = time.perf_counter()
    assigner = CentroidAssigner(centroids)
    setup = time.perf_counter() - t0
    codec.encode(x0[:8])  # compile / load the encoder before timing
    steps = {k: [] for k in ("assign", "subtract", "layout", "pq_codes_compiled", "pq_codes_faiss", "decoded_norms")}
    same = True
    for _ in range(args.rounds):
        x = x0.copy()
        t = [time.perf_counter()]
        a = assigner.assign(x)
        t.append(time.perf_counter())
        x -= centroids[a]
        t.append(time.perf_counter())
        z = codec._to_layout(x)
        t.append(time.perf_counter())
        r = codec.encode(x)  # includes the layout again: subtract it below
        t.append(time.perf_counter())
        r_faiss = codec._faiss_pq().compute_codes(z).reshape(n, codec.m)
        t.append(time.perf_counter())
        codec.decoded_norms(centroids, a, r)
        t.append(time.perf_counter())
        d = np.diff(t)
        steps["assign"].append(d[0])
        steps["subtract"].append(d[1])
        steps["layout"].append(d[2])
        steps["pq_codes_compiled"].append(max(0.0, d[3] - d[2]))
        steps["pq_codes_faiss"].append(d[4])
        steps["decoded_norms"].append(d[5])
        same = same and bool(np.array_equal(r, r_faiss))
    us = {k: round(float(np.median(v)) / n * 1e6, 3) for k, v in steps.items()}
    out = {"index": args.index, "tokens": n, "centroids": len(centroids), "code_bytes": codec.code_bytes,
           "assigner_setup_s": round(setup, 2), "us_per_token_one_thread": us,
           "compiled_equals_faiss": same, "load_average": os.getloadavg()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

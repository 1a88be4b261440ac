"""Token pooling at index time: size, build time, quality and latency per pool factor.

For each pool factor (default 1, 2, 3, 4; 1 is no pooling) this builds an index with the default
codec (PQ, pq_m=32) and reports:

* bytes: the whole index folder, per input token and per stored vector, and the vectors kept
  (stored vectors / input tokens);
* build time, with the pooling pass separately (``Indexer.last_timings["pool_s"]``) and its share
  of the rest of the build;
* recall@10 against exhaustive MaxSim on the **unpooled** vectors (tie-tolerant, the ground truth
  of ``benchmarks/corpora.py``), searched with the default settings at k=10;
* nDCG@10 against the qrels (msmarco-5k only: ``qrels/test.tsv``, through plaid.evaluation /
  ir-measures as ``plaid evaluate`` does), of a k=10 search and of a k=100 search (the README's
  evaluation: ``plaid search --k 100``), and of exhaustive MaxSim on the pooled vectors
  themselves (the ceiling pooling leaves, before compression);
* median single-query latency at k=10 (one query per call, default settings), measured in
  ``--rounds`` rounds that interleave the factors (one pass of each per round, the order
  alternating), the best round kept: a slow phase of a shared machine falls on every factor alike.

Builds run one after the other in this process (with ``--threads`` torch/faiss threads), so their
times drift with the machine's load: read the pooling share within each build, not the builds
against each other.

Usage::

    python benchmarks/pooling.py --size 5k --write        # writes benchmarks/results/pooling.md
    python benchmarks/pooling.py --size 50k --rounds 2    # a span-mixed 50k corpus (generated and
                                                          # its ground truth computed on first use
                                                          # under --work, see benchmarks/corpora.py)

The 50k run (3.9M tokens, 350 queries, no qrels) takes roughly 10x the 5k one per factor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from corpora import DEFAULT_SOURCE, DEFAULT_WORK, Recall, prepare  # noqa: E402

import plaid  # noqa: E402
from plaid.indexing.pooling import pool_documents  # noqa: E402


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _load(bundle: str):
    X = np.load(os.path.join(bundle, "doc_embeddings.f16.npy"), mmap_mode="r")
    doclens = np.load(os.path.join(bundle, "doclens.npy")).astype(np.int64)
    Q = np.load(os.path.join(bundle, "query_embeddings.f16.npy"))
    qlens = np.load(os.path.join(bundle, "query_lens.npy"))
    qoff = np.concatenate([[0], np.cumsum(qlens)])
    queries = [np.asarray(Q[qoff[i] : qoff[i + 1]], np.float32) for i in range(len(qlens))]
    return X, doclens, queries


def _lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


class Ndcg:
    """nDCG@10 of rankings against a bundle's qrels (None when it has none)."""

    def __init__(self, bundle: str):
        self.ok = all(os.path.exists(os.path.join(bundle, f)) for f in ("qrels/test.tsv", "doc_ids.txt",
                                                                          "query_ids.txt"))
        if self.ok:
            from plaid.evaluation import load_qrels

            self.qrels = load_qrels(os.path.join(bundle, "qrels", "test.tsv"))
            self.doc_ids = _lines(os.path.join(bundle, "doc_ids.txt"))
            self.query_ids = _lines(os.path.join(bundle, "query_ids.txt"))

    def __call__(self, ids: np.ndarray, scores: np.ndarray):
        if not self.ok:
            return None
        from plaid.evaluation import evaluate

        run = {q: {self.doc_ids[d]: float(s) for d, s in zip(r[:10], sc[:10]) if d >= 0}
               for q, r, sc in zip(self.query_ids, ids.tolist(), scores.tolist())}
        return evaluate(run, self.qrels, ["nDCG@10"])["metrics"]["nDCG@10"]


def _exhaustive_top(queries, vectors, doclens, k=10):
    S = plaid.maxsim(queries, plaid.Embeddings(vectors, doclens), chunk_tokens=1 << 15)
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(S, top, axis=1)


def _latencies(searcher, queries, n: int) -> List[float]:
    out = []
    for q in queries[:n]:
        t = time.perf_counter()
        searcher.search(q, k=10)
        out.append(time.perf_counter() - t)
    return out


def _implementations(X, doclens, factor: float, docs: int, rounds: int) -> dict:
    """Per-document pooling cost (ms, best of ``rounds`` interleaved rounds, one thread) of the
    first ``docs`` documents: plaid's compiled kernel and its numpy fallback, and scipy's and
    scikit-learn's Ward clustering plus the means (where installed), which were the candidates."""
    from plaid.indexing import pooling

    lens = doclens[:docs]
    x = np.asarray(X[: int(lens.sum())], np.float32)
    offs = np.concatenate([[0], np.cumsum(lens)])
    ks = pooling.pooled_doclens(lens, factor)

    def scipy_ward():
        from scipy.cluster.hierarchy import fcluster, linkage

        for i, k in enumerate(ks.tolist()):
            d = x[offs[i] : offs[i + 1]].astype(np.float64)
            if k < len(d):
                lab = fcluster(linkage(d, method="ward"), t=k, criterion="maxclust")
                np.stack([d[lab == c].mean(0) for c in np.unique(lab)])

    def sklearn_ward():
        from sklearn.cluster import AgglomerativeClustering

        for i, k in enumerate(ks.tolist()):
            d = x[offs[i] : offs[i + 1]]
            if k < len(d):
                lab = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(d)
                np.stack([d[lab == c].mean(0) for c in range(k)])

    impls = {"plaid numba kernel": lambda: pool_documents(x, lens, factor, renormalize=True, threads=1),
             "plaid numpy fallback": lambda: pool_documents(
                 x[: int(lens[:docs // 10].sum())], lens[:docs // 10], factor, renormalize=True,
                 kernel=pooling._ward_pool_units_numpy)}
    share = {"plaid numpy fallback": docs // 10}
    for name, fn, module in (("scipy linkage(ward) + fcluster", scipy_ward, "scipy"),
                             ("sklearn AgglomerativeClustering(ward)", sklearn_ward, "sklearn")):
        try:
            __import__(module)
            impls[name] = fn
        except ImportError:
            pass
    pooling._kernel()  # compiled outside the timing
    best = {n: float("inf") for n in impls}
    names = list(impls)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            impls[n]()
            best[n] = min(best[n], (time.perf_counter() - t) / share.get(n, docs))
    return {n: 1000 * v for n, v in best.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="5k", help="5k (msmarco-5k) or a grown size such as 50k")
    ap.add_argument("--factors", default="1,2,3,4", help="pool factors, comma separated (1: no pooling)")
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="msmarco-5k folder")
    ap.add_argument("--work", default=DEFAULT_WORK, help="grown corpora and ground truth cache")
    ap.add_argument("--threads", type=int, default=2, help="torch / faiss threads (build and search)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (best kept)")
    ap.add_argument("--latency-queries", type=int, default=200, help="queries timed per round")
    ap.add_argument("--keep", default=None, help="keep the indexes in this folder (default: a temporary one)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/pooling.{md,json}")
    ap.add_argument("--implementations", type=int, default=500,
                    help="documents timed per implementation of the clustering (0: skip)")
    args = ap.parse_args(argv)

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    factors = [float(f) for f in args.factors.split(",")]
    bundle, meta, gt_ids, gt_scores = prepare(args.size, work=args.work, source=args.source, threads=args.threads)
    X, doclens, queries = _load(bundle)
    recall = Recall(bundle, gt_ids, gt_scores)
    ndcg = Ndcg(bundle)
    root = args.keep or tempfile.mkdtemp(prefix="plaid-pooling-")
    os.makedirs(root, exist_ok=True)
    T = int(doclens.sum())
    print(f"corpus {args.size}: {len(doclens)} documents, {T} tokens, {len(queries)} queries; indexes in {root}",
          flush=True)
    rows: Dict[float, dict] = {}
    exhaustive_ndcg = ndcg(gt_ids[:, :10], gt_scores[:, :10])
    for f in factors:
        path = os.path.join(root, f"pool{f:g}")
        ix = plaid.Indexer(pool_factor=f, show_progress=False)
        t = time.perf_counter()
        index = ix.build(path, plaid.Embeddings(X, doclens), overwrite=True)
        wall = time.perf_counter() - t
        tm = dict(ix.last_timings)
        size = _folder_bytes(path)
        s = plaid.Searcher(path)
        r10 = s.search(queries, k=10)
        r100 = s.search(queries, k=100)
        row = {"factor": f, "vectors": index.num_tokens, "kept": index.num_tokens / T, "folder_bytes": size,
               "bytes_per_input_token": size / T, "bytes_per_vector": size / index.num_tokens,
               "payload_bytes_per_vector": index.payload_bytes_per_token(), "num_centroids": index.num_centroids,
               "build_s": wall, "pool_s": tm.get("pool_s", 0.0), "timings": tm,
               "recall@10": recall(r10.ids, 10), "ndcg@10_k10": ndcg(r10.ids, r10.scores),
               "ndcg@10_k100": ndcg(r100.ids, r100.scores)}
        row["rest_s"] = row["build_s"] - row["pool_s"]
        if ndcg.ok:  # exhaustive MaxSim on the pooled vectors themselves (held in memory: 5k only)
            if f == 1:
                row["ndcg@10_exhaustive_pooled"] = exhaustive_ndcg
            else:
                pv, pl = pool_documents(np.asarray(X, np.float32), doclens, f, renormalize=True,
                                        threads=args.threads)
                row["ndcg@10_exhaustive_pooled"] = ndcg(*_exhaustive_top(queries, pv, pl))
        rows[f] = row
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "timings"}), flush=True)
    # latency: interleaved rounds, best median kept
    searchers = {f: plaid.Searcher(os.path.join(root, f"pool{f:g}")) for f in factors}
    n = min(args.latency_queries, len(queries))
    for f in factors:
        _latencies(searchers[f], queries, n)  # warm: compile, page in
    best = {f: float("inf") for f in factors}
    for r in range(args.rounds):
        for f in (factors if r % 2 == 0 else factors[::-1]):
            best[f] = min(best[f], float(np.median(_latencies(searchers[f], queries, n))))
    for f in factors:
        rows[f]["latency_ms_median"] = 1000 * best[f]
    impl = _implementations(X, doclens, 2.0, args.implementations, args.rounds) if args.implementations else {}
    base = rows.get(1.0)
    result = {"implementations_ms_per_doc": impl, "implementation_docs": args.implementations,
              "size": args.size, "documents": int(len(doclens)), "tokens": T, "queries": len(queries),
              "threads": args.threads, "rounds": args.rounds, "latency_queries": n,
              "exhaustive_ndcg@10_unpooled": exhaustive_ndcg, "rows": [rows[f] for f in factors],
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    md = _markdown(result, base)
    print(md)
    if args.write:
        out = os.path.join(HERE, "results")
        with open(os.path.join(out, f"pooling{'' if args.size == '5k' else '-' + args.size}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(out, f"pooling{'' if args.size == '5k' else '-' + args.size}.md"), "w") as fh:
            fh.write(md)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _markdown(res: dict, base) -> str:
    lines = [f"# Token pooling on {res['size']} ({res['documents']} documents, {res['tokens']} tokens, "
             f"{res['queries']} queries)", "",
             "Generated by `python benchmarks/pooling.py --size " + res["size"] + " --write` on "
             f"{res['created']} ({res['threads']} threads; latency: median of {res['latency_queries']} single "
             f"queries at k=10, best of {res['rounds']} interleaved rounds). Default codec (PQ, pq_m=32), default "
             "search settings. Recall@10 is against exhaustive MaxSim on the unpooled vectors.", ""]
    if res.get("exhaustive_ndcg@10_unpooled") is not None:
        lines += [f"Exhaustive MaxSim on the unpooled vectors: nDCG@10 {res['exhaustive_ndcg@10_unpooled']:.4f}.", ""]
    lines += ["| factor | vectors kept | folder MB | folder / unpooled | B per input token | B per vector | "
              "centroids | build s | pooling s | pooling / rest of build | recall@10 | nDCG@10 k=10 | "
              "nDCG@10 k=100 | nDCG@10 exhaustive on pooled | latency ms | latency / unpooled |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['factor']:g} | {r['kept']:.3f} | {r['folder_bytes'] / 1e6:.2f} | "
            f"{_fmt(r['folder_bytes'] / base['folder_bytes'] if base else None, '.3f')} | "
            f"{r['bytes_per_input_token']:.1f} | {r['bytes_per_vector']:.1f} | {r['num_centroids']} | "
            f"{r['build_s']:.1f} | {r['pool_s']:.2f} | {r['pool_s'] / r['rest_s']:.3f} | {r['recall@10']:.3f} | "
            f"{_fmt(r['ndcg@10_k10'], '.4f')} | {_fmt(r['ndcg@10_k100'], '.4f')} | "
            f"{_fmt(r.get('ndcg@10_exhaustive_pooled'), '.4f')} | {r['latency_ms_median']:.2f} | "
            f"{_fmt(r['latency_ms_median'] / base['latency_ms_median'] if base else None, '.2f')} |")
    impl = res.get("implementations_ms_per_doc") or {}
    if impl:
        mean_len = res["tokens"] / res["documents"]
        lines += ["", f"Clustering cost per document, factor 2, one thread (the first {res['implementation_docs']} "
                  f"documents, mean {mean_len:.0f} tokens; best of {res['rounds']} interleaved rounds), and what "
                  "1M such documents would take:", "",
                  "| implementation | ms per document | 1M documents, one thread |", "|---|---|---|"]
        for name, ms in impl.items():
            lines.append(f"| {name} | {ms:.3f} | {ms * 1e6 / 1000 / 60:.0f} min |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Where a search's recall@10 is lost, stage by stage, and what other stage-3 scores would recover.

For each query, the index is searched at k=10 with ``--ndocs`` for stage 2 (default 256, PLAID's) and the
stage-2 survivors are taken from the trace. They are then re-ranked offline by several stage-3
scores, the best ``n3`` kept, and those ranked by the exact stage-4 score (the codec's decoded
tokens: centroid + residual, divided by the stored norm), giving the recall@10 each stage-3 score
would reach. Scores, per document token t and query token i, max over t, summed over i:

* ``cosine`` — stage 3 as plaid runs it: the query token against the token's unit centroid (the
  int8 scoring rows, :func:`plaid.search.pipeline.scoring_centroids`);
* ``cosine+J`` — plus the first J sub-spaces of the rotated PQ residual (a partial ADC: J byte
  lookups per token; the rotation puts the residual's largest variance first);
* ``exact`` — the stage-4 score itself (no stage-3 loss: what stage 2's survivors allow).

``search`` is the index's own result. The exact ceiling of the codec (every document scored
exactly) is ``exact`` with ``--ndocs`` at the number of documents. Needs a PQ index. Recall is
tie-tolerant against the corpus' exact ground truth (``benchmarks/corpora.py``)::

    python benchmarks/stage_loss.py --index DIR --size 5k [--ndocs 256] [--queries 350]

Prints one JSON object (recall@10 per score and n3); nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpora  # noqa: E402
from _data import load_queries  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--size", default="5k", help="the corpus the index holds (5k = msmarco-5k)")
    ap.add_argument("--ndocs", type=int, default=256, help="stage 2's survivors (PLAID's at k=10: 256; the balanced preset's depth 3: 768)")
    ap.add_argument("--n3", default="64,128", help="stage-3 survivors to try (the default: ndocs // 4)")
    ap.add_argument("--partial", default="4,8", help="PQ sub-spaces J of the cosine+J scores")
    ap.add_argument("--queries", type=int, default=350)
    ap.add_argument("--work", default=corpora.DEFAULT_WORK)
    ap.add_argument("--source", default=corpora.DEFAULT_SOURCE)
    args = ap.parse_args(argv)
    import plaid

    bundle, _, gt_ids, gt_scores = corpora.prepare(args.size, args.work, args.source, log=None)
    queries = load_queries(bundle)[: args.queries]
    recall = corpora.Recall(bundle, gt_ids[: len(queries)], gt_scores[: len(queries)])
    s = plaid.Searcher(args.index, num_threads=1)
    e = s._state.engine
    codec = e.codec
    if codec.name != "pq" or len(e.codes.parts) != 1:
        raise SystemExit("stage_loss.py needs a one-segment PQ index")
    codes = np.asarray(e.codes.parts[0])
    residuals = np.asarray(e.residuals.parts[0])
    norms = e.norm_values[np.asarray(e.norms.parts[0])] if e.norm_values is not None else \
        np.asarray(e.norms.parts[0], np.float32)
    centroids = np.asarray(e.centroids, np.float32)
    unit = e.scoring_rows.astype(np.float32) * e.scoring_factor[:, None]
    codec.decode_numpy(residuals[:1])  # builds the codec's flat sub-centroid table
    books, width, m_sub = codec._np_table, codec.sub_width, codec.m
    n3s = [int(x) for x in args.n3.split(",")]
    partial = [int(x) for x in args.partial.split(",") if int(x) < m_sub]
    names = ["cosine"] + [f"cosine+{j}" for j in partial] + ["exact"]
    picked = {(name, n3): [] for name in names for n3 in n3s}
    found = []
    for q in queries:
        res = s.search(q, k=10, ndocs=args.ndocs, trace=True)
        found.append(res.ids[0])
        d2 = res.traces[0].stage2
        lens = e.doc_offsets[d2 + 1] - e.doc_offsets[d2]
        pos = np.concatenate([np.arange(e.doc_offsets[d], e.doc_offsets[d + 1]) for d in d2])
        seg = np.repeat(np.arange(len(d2)), lens)
        sub = books[(residuals[pos].astype(np.int64) + np.arange(m_sub) * 256).ravel()].reshape(len(pos), m_sub, width)
        ql = codec.query_layout(q).reshape(len(q), m_sub, width)
        parts = np.concatenate([np.zeros((len(q), len(pos), 1), np.float32),
                                np.cumsum(np.einsum("imw,tmw->itm", ql, sub), 2)], 2)  # [m, t, J + 1]
        cos = q @ unit[codes[pos]].T

        def per_doc(S):
            best = np.full((len(d2), len(q)), -np.inf, np.float32)
            np.maximum.at(best, seg, S.T)
            return best.sum(1)

        exact = per_doc((q @ centroids[codes[pos]].T + parts[:, :, m_sub]) / norms[pos])
        scores = {"cosine": per_doc(cos), "exact": exact}
        scores.update({f"cosine+{j}": per_doc(cos + parts[:, :, j]) for j in partial})
        for name, sc in scores.items():
            for n3 in n3s:
                keep = np.argsort(-sc, kind="stable")[:n3]
                top = d2[keep[np.argsort(-exact[keep], kind="stable")[:10]]]
                picked[(name, n3)].append(np.pad(top, (0, 10 - len(top)), constant_values=-1))
    out = {"index": args.index, "size": args.size, "queries": len(queries), "ndocs": args.ndocs,
           "search": recall(np.stack(found), 10),
           "stage3": {f"{name} n3={n3}": recall(np.stack(v), 10) for (name, n3), v in picked.items()}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

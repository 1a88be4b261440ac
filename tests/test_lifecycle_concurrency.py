"""Readers and a writer at once: eight threads share one Searcher while another process commits adds.

The writer hard-links every generation it commits into ``snapshots/<generation>/`` (committed files
are never rewritten, so a link is a frozen copy), which lets the test compute afterwards what a
single-threaded search of each generation returns, and compare every answer the threads got.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import plaid
from plaid.demo import synthetic_corpus, synthetic_queries

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lifecycle_util import copy_index  # noqa: E402

ADDS = 6
ADD_DOCS = 20
THREADS = 8

WRITER = textwrap.dedent("""
    import os, sys, time
    import plaid
    from plaid.demo import synthetic_corpus
    path, snaps, adds, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def snapshot(index):
        d = os.path.join(snaps, str(index.generation))
        os.makedirs(d)
        for e in index.manifest["arrays"].values():
            os.link(os.path.join(path, e["file"]), os.path.join(d, e["file"]))
        with open(os.path.join(path, "manifest.json")) as src, open(os.path.join(d, "manifest.json"), "w") as dst:
            dst.write(src.read())

    index = plaid.Index(path)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(adds):
        docs = synthetic_corpus(n, dim=32, num_topics=24, seed=100 + i, min_len=5, max_len=30)
        index.add(docs, show_progress=False)
        snapshot(index)
        print("commit", index.generation, index.num_documents, flush=True)
        time.sleep(0.15)
""")


def _snapshot(path, dst):
    os.makedirs(dst)
    m = plaid.Index(path).manifest
    for e in m["arrays"].values():
        os.link(os.path.join(path, e["file"]), os.path.join(dst, e["file"]))
    with open(os.path.join(path, "manifest.json")) as src, open(os.path.join(dst, "manifest.json"), "w") as out:
        out.write(src.read())


@pytest.fixture(scope="module")
def corpus():
    docs = synthetic_corpus(400, dim=32, num_topics=24, seed=21, min_len=5, max_len=30)
    return docs, synthetic_queries(docs, 24, seed=22)


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory, corpus):
    """A small index without external ids."""
    path = str(tmp_path_factory.mktemp("conc") / "plain")
    plaid.Indexer(pq_m=8, show_progress=False).build(path, corpus[0])
    return path


def test_eight_threads_search_while_another_process_adds(tmp_path, plain_index, corpus):
    _, queries = corpus
    path = copy_index(plain_index, str(tmp_path / "index"))
    snaps = str(tmp_path / "snapshots")
    _snapshot(path, os.path.join(snaps, "0"))
    shared = plaid.Searcher(path)
    frozen = plaid.Searcher(path)  # never reloaded: must keep answering as generation 0

    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, snaps, str(ADDS), str(ADD_DOCS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    done = threading.Event()
    answers, errors = [], []

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            while not done.is_set():
                qi = np.sort(rng.choice(len(queries), size=int(rng.integers(1, 5)), replace=False))
                g1 = shared.generation
                res = shared.search([queries[i] for i in qi], k=10)
                g2 = shared.generation
                answers.append((g1, g2, qi, res.ids, res.scores))
        except BaseException as e:  # noqa: BLE001 - any error fails the test below
            errors.append(repr(e))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    writer.stdin.write("go\n")
    writer.stdin.flush()
    reloads = 0
    try:
        while writer.poll() is None:
            reloads += shared.reload()
            time.sleep(0.02)
        time.sleep(0.2)
        reloads += shared.reload()
        time.sleep(0.2)
    finally:
        done.set()
        for t in threads:
            t.join()
    out = writer.stdout.read().split("\n")
    assert writer.returncode == 0, out
    commits = [ln.split() for ln in out if ln.startswith("commit")]
    assert len(commits) == ADDS
    last = int(commits[-1][1])
    num_docs = {0: 400, **{int(g): int(n) for _, g, n in commits}}

    assert errors == []
    assert shared.generation == last and reloads >= 2
    seen = {g1 for g1, g2, *_ in answers}
    assert len(seen) >= 3, f"the readers saw generations {sorted(seen)} only"

    # every answer is what a single-threaded search of one committed generation returns
    refs = {}
    for g in range(last + 1):
        s = plaid.Searcher(os.path.join(snaps, str(g)))
        assert s.generation == g
        refs[g] = s.search(queries, k=10)
    for g1, g2, qi, ids, scores in answers:
        assert ids.max() < num_docs[g2]
        matches = [g for g in range(g1, g2 + 1)
                   if np.array_equal(refs[g].ids[qi], ids) and np.allclose(refs[g].scores[qi], scores, atol=1e-5)]
        assert matches, f"an answer read between generations {g1} and {g2} matches none of them"
    print(f"{len(answers)} answers from {THREADS} threads over generations 0..{last}, {reloads} reloads")

    res = frozen.search(queries, k=10)
    assert frozen.generation == 0
    np.testing.assert_array_equal(res.ids, refs[0].ids)
    np.testing.assert_allclose(res.scores, refs[0].scores, atol=1e-5)


def test_searcher_with_doc_ids_survives_an_add_committed_after_it_opened(tmp_path, small_index, small_corpus):
    docs, queries = small_corpus
    path = copy_index(small_index, str(tmp_path / "index"))
    s = plaid.Searcher(path)
    plaid.Index(path).add(docs[:3], doc_ids=["late-0", "late-1", "late-2"], show_progress=False)
    res = s.search(queries[:2], k=5)  # still generation 0
    assert s.generation == 0
    assert all(x.startswith("doc-") for row in res.doc_ids() for x in row)

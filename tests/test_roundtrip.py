"""Round trip: an index reopened in a fresh Python process searches exactly like the one in memory."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import plaid

REOPEN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import plaid

    queries_file, out_file, *paths = sys.argv[1:]
    data = np.load(queries_file)
    queries = [data[f"q{i}"] for i in range(len(data.files))]
    out, meta = {}, []
    for n, path in enumerate(paths):
        for engine in ("numpy", "torch"):
            res = plaid.Searcher(path, engine=engine).search(queries, k=10)
            out[f"{n}_{engine}_ids"], out[f"{n}_{engine}_scores"] = res.ids, res.scores
        index = plaid.Index(path)
        meta.append({"doc_ids": res.doc_ids() if res.names is not None else None,
                     "num_documents": index.num_documents, "verify": index.verify(), "info": index.info()})
    np.savez(out_file, **out)
    print(json.dumps(meta))
""")


def assert_same_scores(child: np.ndarray, here: np.ndarray, engine: str) -> None:
    """The numpy engine's scores bit for bit (its kernels sum in a fixed order); the torch
    engine's within float32 rounding: its stage-4 centroid products are BLAS calls, whose last
    bit may depend on the thread count and on the buffers' alignment in each process (MKL without
    its reproducibility mode)."""
    if engine == "numpy":
        np.testing.assert_array_equal(child, here)
    else:
        np.testing.assert_allclose(child, here, rtol=1e-6, atol=1e-6)


def search_in_fresh_process(tmp_path, index_paths, queries):
    """Open every index in one new Python process, search ``queries`` with both engines there."""
    qfile, ofile = tmp_path / "queries.npz", tmp_path / "results.npz"
    np.savez(qfile, **{f"q{i}": q for i, q in enumerate(queries)})
    env = dict(os.environ)
    # the child must import the same plaid as this process, wherever it is installed
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(plaid.__file__)), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", REOPEN, str(qfile), str(ofile), *map(str, index_paths)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return np.load(ofile), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def just_built(tmp_path_factory, mini_corpus):
    """An index built in this process, with non-ASCII doc_ids, and its in-process results."""
    docs, queries = mini_corpus
    ids = [f"doc/{i}-é" for i in range(len(docs))]
    path = tmp_path_factory.mktemp("rt") / "idx"
    index = plaid.Indexer(show_progress=False, pq_m=16).build(path, docs, doc_ids=ids)
    return index.path, plaid.Searcher(index).search(queries, k=10)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, small_index, small_scalar_index, small_corpus):
    """Results of one child process over the two small indexes (small_corpus queries)."""
    _, queries = small_corpus
    return search_in_fresh_process(tmp_path_factory.mktemp("child"), [small_index, small_scalar_index], queries)


@pytest.mark.parametrize("n,which", [(0, "small_index"), (1, "small_scalar_index")])
def test_reopened_in_a_fresh_process_gives_identical_results(request, fresh_process, small_corpus, n, which):
    _, queries = small_corpus
    path = request.getfixturevalue(which)
    child, meta = fresh_process
    for engine in ("numpy", "torch"):
        res = plaid.Searcher(path, engine=engine).search(queries, k=10)
        np.testing.assert_array_equal(child[f"{n}_{engine}_ids"], res.ids)
        assert_same_scores(child[f"{n}_{engine}_scores"], res.scores, engine)
        assert (res.ids >= 0).all()
    assert meta[n]["verify"] == [] and meta[n]["num_documents"] == len(small_corpus[0])
    assert meta[n]["info"] == json.loads(json.dumps(plaid.Index(path).info()))
    if which == "small_index":
        assert meta[n]["doc_ids"] == [[f"doc-{i}" for i in row] for row in child[f"{n}_torch_ids"]]


def test_fresh_process_round_trip_of_a_just_built_index(tmp_path, just_built, mini_corpus):
    """Build and search in this process, then reopen elsewhere: nothing of the build lingers in memory."""
    _, queries = mini_corpus
    path, res = just_built
    child, meta = search_in_fresh_process(tmp_path, [path], queries)
    np.testing.assert_array_equal(child["0_numpy_ids"], res.ids)
    np.testing.assert_array_equal(child["0_numpy_scores"], res.scores)
    # the child's doc_ids() (of its last, torch-engine search) name the ids it returned
    names = plaid.Index(path).doc_ids
    assert meta[0]["doc_ids"] == [[names[i] for i in row] for row in child["0_torch_ids"]]
    torch_res = plaid.Searcher(path, engine="torch").search(queries, k=10)
    np.testing.assert_array_equal(child["0_torch_ids"], torch_res.ids)
    assert_same_scores(child["0_torch_scores"], torch_res.scores, "torch")


def test_doc_ids_round_trip(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    ids = [f"passage-{i:04d}" if i % 3 else f"ünïcødé/{i} with spaces\t" for i in range(len(docs))]
    ids[5] = "汉字"
    index = plaid.Indexer(show_progress=False, codec="scalar").build(tmp_path / "idx", docs, doc_ids=ids)
    assert index.doc_ids == ids
    assert plaid.Index(index.path).doc_ids == ids  # reopened from disk
    assert index.manifest["has_doc_ids"] is True
    s = plaid.Searcher(index.path)
    assert s.doc_ids.tolist() == ids and s.doc_ids[5] == "汉字" and len(s.doc_ids) == len(ids)
    sub = list(range(0, 30, 3)) + [5]  # 11 documents for k=20 (k beyond the corpus is capped at it)
    res = s.search(queries + [docs[5]], k=20, subset=sub)
    names = res.doc_ids()
    assert len(names) == len(queries) + 1
    for row_ids, row_names in zip(res.ids, names):
        assert len(row_names) == res.ids.shape[1] == 20
        assert [ids[i] if i >= 0 else None for i in row_ids] == row_names
        assert row_names.count(None) == 9  # k exceeds the hits: padding maps to None
    assert names[-1][0] == "汉字"


def test_integer_doc_ids_are_stored_as_strings(tmp_path, mini_corpus):
    """ints (also numpy ints) are accepted and stored as their decimal strings."""
    docs, queries = mini_corpus
    index = plaid.Indexer(show_progress=False, codec="scalar").build(
        tmp_path / "idx", docs, doc_ids=[np.int64(1000 + i) if i % 2 else 1000 + i for i in range(len(docs))])
    assert index.doc_ids[:3] == ["1000", "1001", "1002"]
    res = plaid.Searcher(index.path).search(docs[7], k=1)
    assert res.doc_ids() == [["1007"]]

"""Token pooling at index time (plaid.indexing.pooling, Indexer(pool_factor=...), Index.add).

The pooling function on its own (counts, clusters, determinism, the two implementations against
each other and against scipy's Ward clustering), then pooled indexes: the manifest, add, bad
factors, the command line. The msmarco-5k quality and size figures are in test_msmarco.py.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest

import plaid
from conftest import SMALL_INDEXER, array_fingerprint
from plaid.cli import main
from plaid.demo import synthetic_corpus
from plaid.errors import IndexCorruptError, InvalidInputError
from plaid.indexing import pooling
from plaid.indexing.indexer import TrainedParams
from plaid.indexing.pooling import POOL_BLOCK_TOKENS, pool_documents, pooled_doclens


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat(docs, d):
    parts = [x for x in docs if len(x)]
    return (np.concatenate(parts) if parts else np.zeros((0, d), np.float32)), np.array([len(x) for x in docs])


# -- counts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor, lengths, expected", [
    (2, [0, 1, 2, 3, 7, 78], [0, 1, 1, 2, 4, 39]),
    (3, [0, 1, 2, 3, 7, 78], [0, 1, 1, 1, 3, 26]),
    (4, [5, 228], [2, 57]),
    (1.5, [1, 2, 3, 4], [1, 2, 2, 3]),
    # 1.1 is 1.100000000000000088...: 11 / it is just below 10, so 10 (a float division gives 11)
    (1.1, [11, 22], [10, 20]),
    (1, [0, 1, 5], [0, 1, 5]),
    (1e6, [0, 1, 500], [0, 1, 1]),
])
def test_each_document_keeps_ceil_n_over_factor_vectors(factor, lengths, expected):
    assert pooled_doclens(np.array(lengths), factor).tolist() == expected


def test_documents_beyond_the_block_are_pooled_block_by_block():
    n = 2 * POOL_BLOCK_TOKENS + 5
    # factor 3: blocks of 4096, 4096 and 5 tokens keep 1366 + 1366 + 2 (a whole-document rule: 2733)
    assert pooled_doclens(np.array([n, 7]), 3).tolist() == [1366 + 1366 + 2, 3]
    assert pooled_doclens(np.array([n]), 2).tolist() == [2048 + 2048 + 3]
    in_start, in_len, out_start, out_len, unit_doc = pooling.pool_units(np.array([3, n, 0, 2]), 2)
    assert in_len.tolist() == [3, POOL_BLOCK_TOKENS, POOL_BLOCK_TOKENS, 5, 2]
    assert in_start.tolist() == [0, 3, 3 + POOL_BLOCK_TOKENS, 3 + 2 * POOL_BLOCK_TOKENS, 3 + n]
    assert unit_doc.tolist() == [0, 1, 1, 1, 3] and out_len.tolist() == [2, 2048, 2048, 3, 1]
    assert out_start.tolist() == [0, 2, 2050, 4098, 4101]


def test_pooled_shapes_follow_the_counts():
    rng = np.random.default_rng(0)
    docs = [_unit(rng, n, 16) for n in (0, 1, 2, 3, 9, 40, 0, 17)]
    x, lens = _flat(docs, 16)
    for factor in (1, 1.5, 2, 3, 4, 100):
        out, plens = pool_documents(x, lens, factor, renormalize=True)
        assert plens.tolist() == pooled_doclens(lens, factor).tolist()
        assert out.shape == (int(plens.sum()), 16) and out.dtype == np.float32


# -- what the vectors are -------------------------------------------------------------------------------
def test_obvious_clusters_give_their_means_in_the_order_of_their_first_token():
    rng = np.random.default_rng(1)
    d = 32
    centres = np.eye(d, dtype=np.float32)[[3, 11, 20]]
    member = np.array([1, 0, 2, 1, 2, 0, 0, 1, 2, 1, 0, 2])  # 12 tokens, 4 per cluster, interleaved
    x = centres[member] + 0.05 * rng.standard_normal((12, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out, plens = pool_documents(x, np.array([12]), 4, renormalize=True)
    assert plens.tolist() == [3]
    for row, c in zip(out, [1, 0, 2]):  # cluster 1 holds token 0, cluster 0 token 1, cluster 2 token 2
        mean = x[member == c].astype(np.float64).mean(0)
        assert np.allclose(row, mean / np.linalg.norm(mean), atol=1e-6)
    raw, _ = pool_documents(x, np.array([12]), 4, renormalize=False)
    for row, c in zip(raw, [1, 0, 2]):
        assert np.allclose(row, x[member == c].astype(np.float64).mean(0), atol=1e-6)
        assert np.linalg.norm(row) < 0.999  # a mean of distinct unit vectors is shorter than 1


def test_factor_one_is_the_identity():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 8)).astype(np.float32) * 3  # not unit-norm: copied as they are
    out, plens = pool_documents(x, np.array([10, 0, 20]), 1, renormalize=True)
    assert plens.tolist() == [10, 0, 20] and np.array_equal(out, x)


def test_empty_and_one_token_documents():
    rng = np.random.default_rng(3)
    one = rng.standard_normal((1, 8)).astype(np.float32) * 5  # kept exactly, not renormalised
    x = np.concatenate([one, _unit(rng, 5, 8)])
    out, plens = pool_documents(x, np.array([0, 1, 0, 5, 0]), 2, renormalize=True)
    assert plens.tolist() == [0, 1, 0, 3, 0]
    assert np.array_equal(out[0], one[0])
    out, plens = pool_documents(np.zeros((0, 8), np.float32), np.array([0, 0]), 2, renormalize=True)
    assert plens.tolist() == [0, 0] and out.shape == (0, 8)


def test_unit_norm_is_kept():
    rng = np.random.default_rng(4)
    docs = [_unit(rng, n, 24) for n in rng.integers(2, 60, size=40)]
    x, lens = _flat(docs, 24)
    for factor in (2, 3, 4):
        out, _ = pool_documents(x, lens, factor, renormalize=True)
        assert np.abs(np.linalg.norm(out.astype(np.float64), axis=1) - 1).max() < 1e-6


def test_deterministic_whatever_the_threads_and_the_implementation(monkeypatch):
    rng = np.random.default_rng(5)
    docs = [_unit(rng, n, 48) for n in rng.integers(0, 120, size=60)]
    docs.append(np.repeat(_unit(rng, 3, 48), 4, axis=0))  # exact ties: duplicated tokens
    x, lens = _flat(docs, 48)
    first, _ = pool_documents(x, lens, 2, renormalize=True, threads=1)
    for threads in (1, 2, 3):
        again, _ = pool_documents(x.copy(), lens, 2, renormalize=True, threads=threads)
        assert again.tobytes() == first.tobytes()
    numpy_out, _ = pool_documents(x, lens, 2, renormalize=True, kernel=pooling._ward_pool_units_numpy)
    assert numpy_out.tobytes() == first.tobytes()  # the fallback is the same computation
    monkeypatch.setenv("PLAID_NO_NUMBA", "1")
    assert pooling.backend() == "numpy"
    with pytest.warns(RuntimeWarning, match="PLAID_NO_NUMBA"):
        fallback, _ = pool_documents(x[: lens[:5].sum()], lens[:5], 3, renormalize=False)
    monkeypatch.delenv("PLAID_NO_NUMBA")
    assert pool_documents(x[: lens[:5].sum()], lens[:5], 3, renormalize=False)[0].tobytes() == fallback.tobytes()


def test_the_clusters_are_scipys_ward_clusters():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    rng = np.random.default_rng(6)
    for n, factor in [(78, 2), (31, 3), (120, 4), (9, 2)]:
        x = _unit(rng, n, 64)
        k = math.ceil(n / factor)
        labels = hierarchy.cut_tree(hierarchy.linkage(x.astype(np.float64), method="ward"), n_clusters=k).ravel()
        first = {lab: i for i, lab in reversed(list(enumerate(labels)))}  # cluster -> its first token
        order = sorted(first, key=first.get)
        means = np.stack([x[labels == c].astype(np.float64).mean(0) for c in order])
        out, _ = pool_documents(x, np.array([n]), factor, renormalize=False)
        assert np.allclose(out, means, atol=1e-6), (n, factor)


# -- bad factors ---------------------------------------------------------------------------------------------
BAD_FACTORS = [0, 0.5, -2, 0.999, float("nan"), float("inf"), -float("inf"), True, False, "2", None, [2],
               np.float32("nan"), 2.0 ** 60, 10 ** 400]


@pytest.mark.parametrize("bad", BAD_FACTORS, ids=repr)
def test_bad_pool_factors_are_refused_before_anything_is_written(bad, tmp_path, mini_corpus):
    with pytest.raises(InvalidInputError, match="pool_factor"):
        plaid.Indexer(pool_factor=bad)
    from plaid.pipeline import build_index

    with pytest.raises(InvalidInputError, match="pool_factor"):
        build_index(str(tmp_path / "idx"), embeddings=str(tmp_path / "none"), indexer_options={"pool_factor": bad})
    assert not os.path.exists(tmp_path / "idx")


def test_good_pool_factors_are_accepted():
    for good in (1, 2, np.int64(3), 1.5, np.float32(2.5), 4.0):
        assert plaid.Indexer(pool_factor=good).pool_factor == float(good)


# -- pooled indexes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pooled(tmp_path_factory, small_corpus):
    """The small corpus indexed with pool_factor=2 (ids doc-<i>); copy it before changing it."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("pooled") / "p2")
    plaid.Indexer(**SMALL_INDEXER, pool_factor=2).build(path, docs, doc_ids=[f"doc-{i}" for i in range(len(docs))])
    return path


def test_a_pooled_index_stores_the_pooled_vectors(pooled, small_corpus, small_index):
    docs, queries = small_corpus
    lens = np.array([len(d) for d in docs])
    index = plaid.Index(pooled)
    assert index.pooling == {"method": "ward", "factor": 2} == index.manifest["pooling"]
    assert index.info()["pooling"] == {"method": "ward", "factor": 2}
    assert index.num_tokens == int(pooled_doclens(lens, 2).sum()) < 0.55 * lens.sum()
    assert index.manifest["normalized"] is True
    assert os.listdir(pooled) == [f for f in os.listdir(pooled) if not f.startswith("plaid-spill")]  # spill removed
    unpooled = plaid.Index(small_index)
    assert unpooled.pooling is None and unpooled.manifest["pooling"] is None
    assert index.nbytes() < 0.65 * unpooled.nbytes()
    # the decoded vectors are the pooled ones (up to the codec's error), not the tokens
    searcher = plaid.Searcher(pooled)
    want, _ = pool_documents(np.concatenate(docs), lens, 2, renormalize=True)
    got = searcher.decompress(np.arange(index.num_tokens))
    assert np.mean(np.sum(got * want, axis=1)) > 0.9
    res = searcher.search(queries, k=10)
    exact = plaid.maxsim(queries, docs)
    top = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), top.tolist())])
    assert overlap > 0.7, overlap


def test_the_pooling_decision_follows_normalize(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    scaled = [3 * d for d in docs]  # not unit-norm: the means are not renormalised, nor is the index
    index = plaid.Indexer(**SMALL_INDEXER, pool_factor=2).build(str(tmp_path / "a"), scaled)
    assert index.manifest["normalized"] is False and index.pooling["factor"] == 2
    index = plaid.Indexer(**SMALL_INDEXER, pool_factor=2, normalize=False).build(str(tmp_path / "b"), docs)
    assert index.manifest["normalized"] is False
    index = plaid.Indexer(**SMALL_INDEXER, pool_factor=1).build(str(tmp_path / "c"), docs)
    assert index.pooling is None and index.num_tokens == sum(len(d) for d in docs)


def test_train_then_build_trained_is_the_build(tmp_path, mini_corpus):
    """What a sharded build does: training pools, build_trained pools the same way."""
    docs, _ = mini_corpus
    ix = plaid.Indexer(**SMALL_INDEXER, pool_factor=3)
    trained = ix.train(docs)
    assert trained.pooling == {"method": "ward", "factor": 3}
    ix.build(str(tmp_path / "a"), docs)
    plaid.Indexer(**SMALL_INDEXER).build_trained(str(tmp_path / "b"), docs, trained)
    assert array_fingerprint(str(tmp_path / "a")) == array_fingerprint(str(tmp_path / "b"))
    again = TrainedParams.from_index(str(tmp_path / "a"))
    assert again.pooling == trained.pooling and again.fingerprint() == trained.fingerprint()
    assert TrainedParams.from_payload(trained.to_payload()).fingerprint() == trained.fingerprint()
    unpooled = plaid.Indexer(**SMALL_INDEXER).train(docs)
    assert unpooled.pooling is None
    # the pooling is part of the fingerprint: shards pooled differently never share a sharded index
    assert TrainedParams(**{**vars(unpooled), "pooling": trained.pooling}).fingerprint() != unpooled.fingerprint()


def test_add_pools_the_new_documents(pooled, small_corpus, tmp_path):
    docs, queries = small_corpus
    path = str(tmp_path / "p")
    shutil.copytree(pooled, path)
    index = plaid.Index(path)
    before = index.num_tokens
    new = synthetic_corpus(25, dim=64, num_topics=64, seed=11, min_len=5, max_len=40)
    new.append(np.zeros((0, 64), np.float32))
    with pytest.warns(UserWarning, match="empty"):
        ids = index.add(new, doc_ids=[f"new-{i}" for i in range(len(new))], show_progress=False)
    lens = pooled_doclens(np.array([len(d) for d in new]), 2)
    assert index.num_tokens - before == int(lens.sum())
    assert index.manifest["segments"][-1]["num_tokens"] == int(lens.sum())
    assert index.pooling == {"method": "ward", "factor": 2}
    assert os.listdir(path) == [f for f in os.listdir(path) if not f.startswith("plaid-spill")]
    res = plaid.Searcher(path).search([new[3]], k=1)
    assert res.ids[0, 0] == ids[3]
    assert index.verify() == []
    index.delete(["new-0", "doc-1"])
    index.compact(show_progress=False)  # copies the stored vectors: the record stays, counts shrink
    assert index.pooling == {"method": "ward", "factor": 2}
    gone = int(lens[0]) + int(pooled_doclens(np.array([len(docs[1])]), 2)[0])
    assert index.num_tokens == before + int(lens.sum()) - gone
    assert index.verify() == []


@pytest.mark.parametrize("pooling_value, field", [
    ({"method": "kmeans", "factor": 2}, "pooling.method"),
    ({"method": "ward", "factor": 0.5}, "pooling.factor"),
    ({"method": "ward", "factor": "2"}, "pooling.factor"),
    ("ward", "pooling"),
])
def test_add_refuses_a_pooling_it_cannot_reproduce(pooled, small_corpus, tmp_path, pooling_value, field):
    docs, _ = small_corpus
    path = str(tmp_path / "p")
    shutil.copytree(pooled, path)
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    m["pooling"] = pooling_value
    with open(mpath, "w") as f:
        json.dump(m, f)
    files = sorted(os.listdir(path))
    with pytest.raises(IndexCorruptError, match=field):
        plaid.Index(path).add(docs[:3], doc_ids=["a", "b", "c"], show_progress=False)
    assert sorted(os.listdir(path)) == files
    with open(mpath) as f:
        assert json.load(f) == m


def test_a_refused_pooling_never_reaches_add_through_the_trained_parameters():
    with pytest.raises(IndexCorruptError, match="pooling.method"):
        pooling.pool_factor_of({"method": "kmeans", "factor": 2})
    with pytest.raises(IndexCorruptError, match="pooling.factor"):
        pooling.pool_factor_of({"method": "ward", "factor": 1})
    assert pooling.pool_factor_of(None) == 1.0 and pooling.pool_factor_of({"method": "ward", "factor": 2.5}) == 2.5


def test_a_manifest_without_the_field_is_unpooled(pooled, tmp_path):
    """Format 2 indexes written before pooling existed have no "pooling" field."""
    path = str(tmp_path / "p")
    shutil.copytree(pooled, path)
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    del m["pooling"]
    with open(mpath, "w") as f:
        json.dump(m, f)
    assert plaid.Index(path).pooling is None


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_index_with_pool_factor_and_info(tmp_path, mini_corpus, capsys):
    docs, _ = mini_corpus
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    np.save(bundle / "doc_embeddings.f16.npy", np.concatenate(docs).astype(np.float16))
    np.save(bundle / "doclens.npy", np.array([len(d) for d in docs], np.int32))
    (bundle / "doc_ids.txt").write_text("".join(f"m{i}\n" for i in range(len(docs))))
    idx = str(tmp_path / "idx")
    assert main(["index", idx, "--embeddings", str(bundle), "--pq-m", "16", "--pool-factor", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", idx, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pooling"] == {"method": "ward", "factor": 2}
    assert info["num_tokens"] == int(pooled_doclens(np.array([len(d) for d in docs]), 2).sum())
    assert main(["info", idx]) == 0
    assert "pooling" in capsys.readouterr().out.split("ward, factor 2")[0]

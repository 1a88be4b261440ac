"""plaid.maxsim: the exact reference, checked against a naive per-document loop."""
import numpy as np
import pytest
import torch

import plaid


def naive_maxsim(q: np.ndarray, docs) -> np.ndarray:
    """sum over query tokens of the best dot product with any document token, per document (float64)."""
    q = np.asarray(q, dtype=np.float64)
    out = []
    for d in docs:
        d = np.asarray(d, dtype=np.float64)
        out.append(-np.inf if len(d) == 0 else float((q @ d.T).max(axis=1).sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    dim = 24
    lens = [1, 7, 0, 30, 3, 0, 12, 64, 2, 5]  # varying, with empty documents
    docs = [rng.normal(size=(n, dim)).astype(np.float32) for n in lens]
    queries = [rng.normal(size=(m, dim)).astype(np.float32) for m in (1, 4, 9)]
    return docs, queries


def test_single_query_matches_naive_loop(data):
    docs, queries = data
    for q in queries:
        got = plaid.maxsim(q, docs)
        assert got.dtype == np.float32 and got.shape == (len(docs),)
        np.testing.assert_allclose(got, naive_maxsim(q, docs), rtol=1e-5, atol=1e-4)


def test_empty_documents_score_minus_inf(data):
    docs, queries = data
    got = plaid.maxsim(queries[1], docs)
    empty = np.array([len(d) == 0 for d in docs])
    assert np.all(np.isneginf(got[empty]))
    assert np.all(np.isfinite(got[~empty]))


def test_list_of_queries_with_different_lengths(data):
    docs, queries = data
    got = plaid.maxsim(queries, docs)
    assert got.shape == (len(queries), len(docs)) and got.dtype == np.float32
    for i, q in enumerate(queries):
        np.testing.assert_allclose(got[i], naive_maxsim(q, docs), rtol=1e-5, atol=1e-4)


def test_3d_queries_give_one_row_per_query(data):
    docs, _ = data
    Q = np.random.default_rng(1).normal(size=(3, 5, docs[0].shape[1])).astype(np.float32)
    got = plaid.maxsim(Q, docs)
    assert got.shape == (3, len(docs))
    for i in range(3):
        np.testing.assert_allclose(got[i], naive_maxsim(Q[i], docs), rtol=1e-5, atol=1e-4)


def test_float16_input(data):
    docs, queries = data
    docs16 = [d.astype(np.float16) for d in docs]
    q16 = queries[2].astype(np.float16)
    got = plaid.maxsim(q16, docs16)
    # the reference upcasts the stored float16 values: the result is exact MaxSim of those values
    np.testing.assert_allclose(got, naive_maxsim(q16.astype(np.float32), [d.astype(np.float32) for d in docs16]),
                               rtol=1e-5, atol=1e-4)


def test_torch_input(data):
    docs, queries = data
    tdocs = [torch.from_numpy(d) for d in docs]
    got = plaid.maxsim(torch.from_numpy(queries[1]), tdocs)
    assert isinstance(got, np.ndarray) and got.shape == (len(docs),)
    np.testing.assert_allclose(got, naive_maxsim(queries[1], docs), rtol=1e-5, atol=1e-4)
    # list of torch queries, float64 and bfloat16 tensors are accepted too
    got2 = plaid.maxsim([torch.from_numpy(q).double() for q in queries], tdocs)
    for i, q in enumerate(queries):
        np.testing.assert_allclose(got2[i], naive_maxsim(q, docs), rtol=1e-5, atol=1e-4)
    qb = torch.from_numpy(queries[0]).bfloat16()
    got3 = plaid.maxsim(qb, [torch.from_numpy(d).bfloat16() for d in docs])
    ref = naive_maxsim(qb.float().numpy(), [torch.from_numpy(d).bfloat16().float().numpy() for d in docs])
    np.testing.assert_allclose(got3, ref, rtol=1e-5, atol=1e-4)


def test_embeddings_and_generator_documents(data):
    docs, queries = data
    flat = plaid.Embeddings(np.concatenate(docs), [len(d) for d in docs])
    ref = naive_maxsim(queries[2], docs)
    np.testing.assert_allclose(plaid.maxsim(queries[2], flat), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(plaid.maxsim(queries[2], (d for d in docs)), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 31, 1 << 17])
def test_chunking_does_not_change_scores(data, chunk_tokens):
    """Chunk boundaries fall everywhere, also next to and between empty documents."""
    docs, queries = data
    got = plaid.maxsim(queries, docs, chunk_tokens=chunk_tokens)
    for i, q in enumerate(queries):
        np.testing.assert_allclose(got[i], naive_maxsim(q, docs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_block_bytes", [1, 4 * 14 * 5, 4 * 14 * 40])
def test_block_bound_does_not_change_scores(data, max_block_bytes, monkeypatch):
    """Many query tokens shrink the steps (here to 1, 5 and 40 tokens for 14 query tokens), never
    the results; a single document longer than a step is scored alone."""
    import importlib

    maxsim_module = importlib.import_module("plaid.maxsim")  # the module (plaid.maxsim is the function)

    docs, queries = data
    seen = []
    real = maxsim_module.segment_max

    def spy(values, offsets):
        seen.append((values.shape[0], int((offsets[1:] - offsets[:-1]).max())))
        return real(values, offsets)

    monkeypatch.setattr(maxsim_module, "segment_max", spy)
    got = plaid.maxsim(queries, docs, max_block_bytes=max_block_bytes)
    step = max(1, max_block_bytes // (4 * 14))
    assert seen and all(rows <= step or rows == longest for rows, longest in seen)  # bounded, or one document
    monkeypatch.undo()
    np.testing.assert_allclose(got, plaid.maxsim(queries, docs, chunk_tokens=1), rtol=1e-6, atol=1e-5)
    for i, q in enumerate(queries):
        np.testing.assert_allclose(got[i], naive_maxsim(q, docs), rtol=1e-5, atol=1e-4)


def test_trailing_empty_documents(data):
    docs, queries = data
    dim = docs[0].shape[1]
    docs2 = [docs[0], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)]
    got = plaid.maxsim(queries[0], docs2, chunk_tokens=1)
    assert np.isfinite(got[0]) and np.all(np.isneginf(got[1:]))


def test_maxsim_rejects_bad_input(data):
    docs, queries = data
    with pytest.raises(plaid.InvalidInputError, match="dim"):
        plaid.maxsim(queries[0][:, :10], docs)
    with pytest.raises(plaid.InvalidInputError, match="every document is empty"):
        plaid.maxsim(queries[0], [np.zeros((0, 24), np.float32)] * 2)
    with pytest.raises(plaid.InvalidInputError, match="empty"):
        plaid.maxsim(queries[0], [])
    bad = [d.copy() for d in docs]
    bad[3][5, 0] = np.nan
    with pytest.raises(plaid.InvalidInputError, match="document 3"):
        plaid.maxsim(queries[0], bad)

"""Bad input: every one raises InvalidInputError (a PlaidError and a ValueError) naming the problem.

On-disk problems (missing, corrupt, foreign directories) are in test_store_format.py.
"""
import os

import numpy as np
import pytest
import torch

import plaid
from conftest import SMALL_INDEXER


@pytest.fixture(scope="module")
def searcher(mini_index):
    return plaid.Searcher(mini_index)


def indexer(**kw):
    opts = dict(SMALL_INDEXER)
    opts.update(kw)
    return plaid.Indexer(**opts)


def build_fails(tmp_path, documents, match, **kw):
    """Building ``documents`` into a fresh path fails with InvalidInputError(match) and leaves nothing."""
    path = tmp_path / "idx"
    with pytest.raises(plaid.InvalidInputError, match=match) as info:
        indexer().build(path, documents, **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, plaid.PlaidError)
    assert not os.path.exists(path), f"a failed build left {os.listdir(path)} behind"
    return info.value


def test_error_hierarchy():
    assert issubclass(plaid.InvalidInputError, ValueError)
    assert issubclass(plaid.FormatVersionError, plaid.IndexCorruptError)
    for e in (plaid.InvalidInputError, plaid.IndexExistsError, plaid.IndexNotFoundError, plaid.IndexCorruptError):
        assert issubclass(e, plaid.PlaidError)


# -- queries -------------------------------------------------------------------------------------------
def test_query_dim_mismatch(searcher, mini_corpus):
    _, queries = mini_corpus
    with pytest.raises(plaid.InvalidInputError, match=r"query 0: dim 16 does not match the index dim 32"):
        searcher.search(queries[0][:, :16])
    with pytest.raises(plaid.InvalidInputError, match=r"query 1: dim 48 does not match the index dim 32"):
        searcher.search([queries[0], np.ones((3, 48), np.float32)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_queries(searcher, mini_corpus, bad):
    _, queries = mini_corpus
    q = queries[2].copy()
    q[1, 5] = bad
    with pytest.raises(plaid.InvalidInputError, match=r"query 2 contains NaN or inf"):
        searcher.search([queries[0], queries[1], q])
    with pytest.raises(plaid.InvalidInputError, match=r"query 0 contains NaN or inf"):
        searcher.search(q)
    with pytest.raises(plaid.InvalidInputError, match=r"query 0 contains NaN or inf"):
        searcher.search(torch.from_numpy(q))


UNSUPPORTED = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object]


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=lambda t: np.dtype(t).name)
def test_unsupported_query_dtype(searcher, dtype):
    q = np.ones((3, 32), dtype=dtype)
    name = np.dtype(dtype).name
    with pytest.raises(plaid.InvalidInputError, match=rf"queries: unsupported dtype {name}"):
        searcher.search(q)
    with pytest.raises(plaid.InvalidInputError, match=rf"query 1: unsupported dtype {name}"):
        searcher.search([np.ones((3, 32), np.float32), q])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_unsupported_torch_query_dtype(searcher, dtype):
    with pytest.raises(plaid.InvalidInputError, match=rf"unsupported dtype {dtype}"):
        searcher.search(torch.ones((3, 32), dtype=dtype))


def test_malformed_queries(searcher):
    with pytest.raises(plaid.InvalidInputError, match="no queries"):
        searcher.search([])
    with pytest.raises(plaid.InvalidInputError, match="query 0 has no token vectors"):
        searcher.search(np.zeros((0, 32), np.float32))
    with pytest.raises(plaid.InvalidInputError, match=r"got shape \(32,\)"):
        searcher.search(np.ones(32, np.float32))
    with pytest.raises(plaid.InvalidInputError, match=r"got shape \(1, 2, 3, 32\)"):
        searcher.search(np.ones((1, 2, 3, 32), np.float32))
    with pytest.raises(plaid.InvalidInputError, match=r"query 1: expected a 2-D"):
        searcher.search([np.ones((2, 32), np.float32), np.ones(32, np.float32)])
    with pytest.raises(plaid.InvalidInputError, match="cannot be read as an array"):
        searcher.search([[[1.0, 2.0], [3.0]]])


# -- search parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 2.5, "10", None, True, 10.0])
def test_bad_k(searcher, mini_corpus, k):
    _, queries = mini_corpus
    with pytest.raises(plaid.InvalidInputError, match=r"k must be a positive integer, got "):
        searcher.search(queries[0], k=k)


def test_numpy_integer_k_is_accepted(searcher, mini_corpus):
    _, queries = mini_corpus
    assert searcher.search(queries[0], k=np.int64(4)).ids.shape == (1, 4)


@pytest.mark.parametrize("name", ["ncells", "ndocs"])
@pytest.mark.parametrize("value", [0, -3, 1.5, "8", True])
def test_bad_ncells_and_ndocs(searcher, mini_corpus, name, value):
    _, queries = mini_corpus
    with pytest.raises(plaid.InvalidInputError, match=rf"{name} must be a positive integer, got {value!r}"):
        searcher.search(queries[0], **{name: value})


@pytest.mark.parametrize("value,match", [(float("nan"), "must be a finite number"), (float("inf"), "must be a finite number"),
                                         (-np.inf, "must be a finite number"),
                                         ("high", "must be a number"), ([0.5], "must be a number")])
def test_bad_centroid_score_threshold(searcher, mini_corpus, value, match):
    _, queries = mini_corpus
    with pytest.raises(plaid.InvalidInputError, match=rf"centroid_score_threshold {match}"):
        searcher.search(queries[0], centroid_score_threshold=value)


def test_valid_parameter_overrides_are_accepted(searcher, mini_corpus):
    _, queries = mini_corpus
    res = searcher.search(queries[0], k=3, ncells=np.int32(3), ndocs=64, centroid_score_threshold=np.float32(0.2))
    assert res.ids.shape == (1, 3) and (res.ids >= 0).all()


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2.0), "batch_size"),
    (dict(centroid_precision="float16"), "centroid_precision"), (dict(engine="cupy"), "engine"),
])
def test_bad_searcher_arguments(mini_index, kw, match):
    with pytest.raises(plaid.InvalidInputError, match=match):
        plaid.Searcher(mini_index, **kw)


# -- documents -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("form", ["list", "generator", "Embeddings", "3-D", "torch list"])
def test_nan_or_inf_in_documents_names_the_document(tmp_path, mini_corpus, bad, form):
    docs, _ = mini_corpus
    if form == "3-D":
        docs = np.stack([d[:3] for d in docs])
        docs[77, 2, 4] = bad
    else:
        docs = [d.copy() for d in docs]
        docs[77][len(docs[77]) - 1, 4] = bad
    documents = {
        "list": lambda: docs,
        "3-D": lambda: docs,
        "generator": lambda: (d for d in docs),
        "torch list": lambda: [torch.from_numpy(d) for d in docs],
        "Embeddings": lambda: plaid.Embeddings(np.concatenate(docs), [len(d) for d in docs]),
    }[form]()
    build_fails(tmp_path, documents, r"document 77 contains NaN or inf")


def test_nan_in_the_sample_and_after_empty_documents(tmp_path, mini_corpus):
    """The document position is right also when empty documents come before it."""
    docs, _ = mini_corpus
    docs = [d.copy() for d in docs]
    for i in (0, 1, 5):
        docs[i] = np.zeros((0, 32), np.float32)
    docs[6][0, 0] = np.nan
    with pytest.warns(UserWarning, match="empty"):
        build_fails(tmp_path, docs, r"document 6 contains NaN or inf")


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=lambda t: np.dtype(t).name)
def test_unsupported_document_dtype(tmp_path, mini_corpus, dtype):
    docs, _ = mini_corpus
    name = np.dtype(dtype).name
    bad = list(docs)
    bad[4] = np.ones((3, 32), dtype=dtype)
    build_fails(tmp_path, bad, rf"document 4: unsupported dtype {name}")
    build_fails(tmp_path, iter(bad), rf"document 4: unsupported dtype {name}")
    build_fails(tmp_path, np.ones((5, 3, 32), dtype=dtype), rf"documents: unsupported dtype {name}")
    with pytest.raises(plaid.InvalidInputError, match=rf"Embeddings.vectors: unsupported dtype {name}"):
        plaid.Embeddings(np.ones((6, 32), dtype=dtype), [3, 3])


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool])
def test_unsupported_torch_document_dtype(tmp_path, mini_corpus, dtype):
    docs, _ = mini_corpus
    bad = [torch.from_numpy(d) for d in docs[:5]] + [torch.ones((3, 32), dtype=dtype)]
    build_fails(tmp_path, bad, rf"document 5: unsupported dtype {dtype}")


def test_document_shape_errors(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    build_fails(tmp_path, list(docs[:3]) + [docs[3][:, :16]], r"document 3: dim 16 differs from the first document's dim 32")
    build_fails(tmp_path, iter(list(docs[:3]) + [docs[3][:, :16]]), r"document 3: dim 16 differs")
    build_fails(tmp_path, list(docs[:3]) + [docs[3][0]], r"document 3: expected a 2-D \[n_tokens, dim\] array, got shape \(32,\)")
    build_fails(tmp_path, np.ones((4, 32), np.float32), r"a single array must be 3-D")
    build_fails(tmp_path, 42, r"documents must be plaid.Embeddings, a sequence .* got int")
    build_fails(tmp_path, "some text", r"got str")


def test_empty_corpus(tmp_path):
    build_fails(tmp_path, [], r"the corpus is empty \(no documents\)")
    build_fails(tmp_path, iter([]), r"the corpus is empty \(no documents\)")
    build_fails(tmp_path, np.zeros((0, 4, 32), np.float32), r"the corpus is empty")
    build_fails(tmp_path, plaid.Embeddings(np.zeros((0, 32), np.float32), []), r"the corpus is empty")


def test_all_empty_corpus(tmp_path):
    empties = [np.zeros((0, 32), np.float32)] * 3
    build_fails(tmp_path, empties, r"every document is empty")
    build_fails(tmp_path, iter(empties), r"every document is empty")
    build_fails(tmp_path, plaid.Embeddings(np.zeros((0, 32), np.float32), [0, 0]), r"every document is empty")


def test_embeddings_validation():
    v = np.ones((10, 8), np.float32)
    with pytest.raises(plaid.InvalidInputError, match=r"doclens sum to 9 tokens but vectors has 10 rows"):
        plaid.Embeddings(v, [4, 5])
    with pytest.raises(plaid.InvalidInputError, match=r"document 1 has a negative length -2"):
        plaid.Embeddings(v, [12, -2])
    with pytest.raises(plaid.InvalidInputError, match=r"doclens must hold integers"):
        plaid.Embeddings(v, [4.5, 5.5])
    with pytest.raises(plaid.InvalidInputError, match=r"doclens must be 1-D"):
        plaid.Embeddings(v, [[5, 5]])
    with pytest.raises(plaid.InvalidInputError, match=r"vectors must be 2-D"):
        plaid.Embeddings(np.ones((2, 5, 8), np.float32), [5, 5])
    e = plaid.Embeddings(v, np.array([4.0, 0.0, 6.0]))  # integral floats are fine
    assert len(e) == 3 and e[1].shape == (0, 8) and e[-1].shape == (6, 8) and e.dim == 8


# -- Indexer parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(codec="opq"), "unknown codec 'opq'"),
    (dict(kmeans_niter=0), "kmeans_niter must be a positive integer"),
    (dict(kmeans_points_per_centroid=-1), "kmeans_points_per_centroid must be a positive integer"),
    (dict(chunk_tokens=1.5), "chunk_tokens must be a positive integer"),
    (dict(num_centroids=0), "num_centroids must be a positive integer"),
    (dict(num_centroids=2.5), "num_centroids must be a positive integer"),
    (dict(normalize="yes"), "normalize must be"),
    (dict(preset="fast"), "unknown preset 'fast'; choose one of 'compact', 'balanced', 'accurate'"),
    (dict(preset=None), "unknown preset None"),
    (dict(pq_rotation="yes"), "pq_rotation must be True or False"),
    (dict(nbits=3), "nbits must be 1, 2 or 4"),
    (dict(pq_m=0), "pq_m must be a positive integer"),
    (dict(search_depth=0), r"search_depth must be an integer in \[1, 64\], got 0"),
    (dict(search_depth=65), r"search_depth must be an integer in \[1, 64\], got 65"),
    (dict(search_depth=2.0), r"search_depth must be an integer in \[1, 64\], got 2.0"),
    (dict(search_depth="4"), r"search_depth must be an integer in \[1, 64\], got '4'"),
    (dict(search_depth=True), r"search_depth must be an integer in \[1, 64\], got True"),
])
def test_bad_indexer_parameters(kw, match):
    with pytest.raises(plaid.InvalidInputError, match=match):
        plaid.Indexer(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(pq_m=33), r"the number of sub-quantisers m=33 must be between 1 and the dimension 32"),
    (dict(preset="accurate", pq_m=40), r"m=40 must be between 1 and the dimension 32"),
    (dict(pq_m=33, pq_rotation=False), r"m=33 must be between 1 and the dimension 32"),
    (dict(codec="scalar", nbits=3), r"nbits must be 1, 2 or 4, got 3"),
])
def test_codec_parameters_that_do_not_fit_the_data(tmp_path, mini_corpus, kw, match):
    docs, _ = mini_corpus
    path = tmp_path / "idx"
    with pytest.raises(plaid.InvalidInputError, match=match):
        indexer(**kw).build(path, docs)
    assert not os.path.exists(path)


# -- doc_ids -------------------------------------------------------------------------------------------
def test_doc_ids_wrong_count(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    build_fails(tmp_path, docs, r"doc_ids has 119 entries for 120 documents", doc_ids=[f"d{i}" for i in range(119)])
    build_fails(tmp_path, docs, r"doc_ids has 121 entries for 120 documents", doc_ids=[f"d{i}" for i in range(121)])


def test_doc_ids_duplicates(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    ids = [f"d{i}" for i in range(120)]
    ids[50] = "d7"
    ids[90] = "d7"
    ids[100] = "d3"
    build_fails(tmp_path, docs, r"doc_ids are not unique: 2 duplicated, e.g. \['d7', 'd3'\]", doc_ids=ids)


@pytest.mark.parametrize("bad", [None, 1.5, b"bytes", ("a", "b"), "", ["x"]])
def test_doc_ids_non_strings(tmp_path, mini_corpus, bad):
    docs, _ = mini_corpus
    ids = [f"d{i}" for i in range(120)]
    ids[33] = bad
    build_fails(tmp_path, docs, rf"doc_ids\[33\] must be a non-empty string, got {__import__('re').escape(repr(bad))}",
                doc_ids=ids)


def test_doc_ids_single_string(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    build_fails(tmp_path, docs, r"doc_ids must be a sequence of strings, not a single string", doc_ids="abc")


def test_doc_ids_of_an_index_without_them(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    index = indexer(codec="scalar").build(tmp_path / "noids", docs)
    assert index.doc_ids is None
    res = plaid.Searcher(index).search(queries[0], k=3)
    with pytest.raises(plaid.InvalidInputError, match="stores no external doc_ids"):
        res.doc_ids()

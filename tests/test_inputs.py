"""Document input forms give the same index, and the same input and seed give byte-identical files."""
import os

import numpy as np
import pytest
import torch

import plaid
from conftest import array_fingerprint


@pytest.fixture(scope="module")
def fixed_len_docs():
    """100 unit-norm documents of 10 tokens (dim 32): representable as one 3-D array."""
    rng = np.random.default_rng(11)
    topics = rng.normal(size=(12, 32))
    x = topics[rng.integers(0, 12, size=(100, 10))] + 0.3 * rng.normal(size=(100, 10, 32))
    return (x / np.linalg.norm(x, axis=2, keepdims=True)).astype(np.float32)


def build(path, documents, **kwargs):
    opts = dict(show_progress=False, codec="scalar", nbits=2)
    opts.update(kwargs)
    return plaid.Indexer(**opts).build(str(path), documents)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fixed_len_docs):
    path = tmp_path_factory.mktemp("inputs") / "ref"
    build(path, [d for d in fixed_len_docs])
    return array_fingerprint(str(path))


def _forms(tmp_path, docs3d):
    flat = docs3d.reshape(-1, docs3d.shape[2])
    np.save(tmp_path / "flat.npy", flat)
    mm = np.load(tmp_path / "flat.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap)
    return {
        "list of torch tensors": [torch.from_numpy(d.copy()) for d in docs3d],
        "tuple of numpy arrays": tuple(d for d in docs3d),
        "3-D numpy array": docs3d,
        "3-D torch tensor": torch.from_numpy(docs3d.copy()),
        "generator": (d for d in docs3d),
        "one-shot iterator": iter(list(docs3d)),
        "Embeddings over a memory-mapped .npy": plaid.Embeddings(mm, np.full(len(docs3d), docs3d.shape[1])),
        "Embeddings over a torch tensor": plaid.Embeddings(torch.from_numpy(flat.copy()),
                                                           torch.full((len(docs3d),), docs3d.shape[1])),
    }


FORMS = ["list of torch tensors", "tuple of numpy arrays", "3-D numpy array", "3-D torch tensor", "generator",
         "one-shot iterator", "Embeddings over a memory-mapped .npy", "Embeddings over a torch tensor"]


@pytest.mark.parametrize("form", FORMS)
def test_every_input_form_gives_the_same_index(tmp_path, fixed_len_docs, reference, form):
    documents = _forms(tmp_path, fixed_len_docs)[form]
    index = build(tmp_path / "idx", documents)
    assert index.num_documents == 100 and index.num_tokens == 1000
    assert array_fingerprint(index.path) == reference
    # nothing but the index is left in its folder (no spill file of a one-shot iterator)
    assert all(f in ("manifest.json", ".plaid-lock", ".plaid-journal") or f.endswith(".npy") for f in os.listdir(index.path))


def test_float16_inputs_agree_across_forms(tmp_path, fixed_len_docs):
    docs16 = fixed_len_docs.astype(np.float16)
    np.save(tmp_path / "flat16.npy", docs16.reshape(-1, 32))
    mm = np.load(tmp_path / "flat16.npy", mmap_mode="r")
    a = build(tmp_path / "list", [d for d in docs16])
    b = build(tmp_path / "mmap", plaid.Embeddings(mm, [10] * 100))
    c = build(tmp_path / "gen", (torch.from_numpy(d.copy()) for d in docs16))
    d = build(tmp_path / "f32", [d.astype(np.float32) for d in docs16])  # the same values in float32
    assert array_fingerprint(a.path) == array_fingerprint(b.path) == array_fingerprint(c.path) \
        == array_fingerprint(d.path)


def test_bfloat16_torch_documents(tmp_path, fixed_len_docs):
    bf = [torch.from_numpy(d.copy()).bfloat16() for d in fixed_len_docs]
    a = build(tmp_path / "bf16", bf)
    b = build(tmp_path / "f32", [d.float().numpy() for d in bf])
    assert array_fingerprint(a.path) == array_fingerprint(b.path)


def test_variable_length_generator_matches_list(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    a = build(tmp_path / "list", docs, codec="pq", pq_m=16)
    b = build(tmp_path / "gen", (d for d in docs), codec="pq", pq_m=16)
    assert array_fingerprint(a.path) == array_fingerprint(b.path)
    ra, rb = plaid.Searcher(a).search(queries), plaid.Searcher(b).search(queries)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)


@pytest.mark.parametrize("codec", ["pq", "scalar"])
def test_same_seed_and_input_give_byte_identical_files(tmp_path, mini_corpus, codec):
    docs, _ = mini_corpus
    kw = dict(codec=codec, pq_m=16)
    a = build(tmp_path / "a", docs, **kw)
    b = build(tmp_path / "b", docs, **kw)
    fa, fb = array_fingerprint(a.path), array_fingerprint(b.path)
    assert fa == fb
    for name, entry in a.manifest["arrays"].items():  # the files themselves, not only the manifests
        with open(os.path.join(a.path, entry["file"]), "rb") as f1, open(os.path.join(b.path, entry["file"]), "rb") as f2:
            assert f1.read() == f2.read(), name
    # the check is not vacuous: another seed moves the centroids, hence the codes
    c = build(tmp_path / "c", docs, seed=1, **kw)
    fc = array_fingerprint(c.path)
    assert fc["centroids"] != fa["centroids"] and fc["seg0_codes"] != fa["seg0_codes"]
    assert fc["doclens"] == fa["doclens"]


def test_generator_of_mixed_float16_and_float32_documents(tmp_path, mini_corpus):
    """A float32 document after a float16 one is not rounded to float16 on the way (regression)."""
    docs, _ = mini_corpus
    mixed = [docs[0].astype(np.float16)] + list(docs[1:])
    a = build(tmp_path / "list", mixed)
    b = build(tmp_path / "gen", iter(mixed))
    assert array_fingerprint(a.path) == array_fingerprint(b.path)
    # float16 cannot hold 1e6: it must not turn into inf (which fails the build as "NaN or inf")
    big = mixed[:1] + [docs[1] * 1e6] + list(docs[2:])
    exact = plaid.maxsim(docs[1], big)
    np.testing.assert_array_equal(plaid.maxsim(docs[1], iter(big)), exact)
    build(tmp_path / "big", iter(big))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 40])
def test_encoding_chunk_size_does_not_change_the_index(tmp_path, mini_corpus, chunk_tokens):
    """Chunks are document-aligned: any chunk size (smaller than a document, too) gives the same arrays."""
    docs, _ = mini_corpus
    docs = list(docs)
    docs[5] = docs[6] = np.zeros((0, 32), np.float32)  # empty documents at chunk boundaries
    with pytest.warns(UserWarning, match="empty"):
        a = build(tmp_path / "default", docs)
    with pytest.warns(UserWarning, match="empty"):
        b = build(tmp_path / "chunked", docs, chunk_tokens=chunk_tokens)
    assert array_fingerprint(a.path) == array_fingerprint(b.path)
    assert b.manifest["build"]["chunk_tokens"] == chunk_tokens


def test_num_centroids(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    index = build(tmp_path / "c16", docs, num_centroids=16)
    assert index.num_centroids == 16 and plaid.Index(index.path).manifest["arrays"]["centroids"]["shape"] == [16, 32]
    tokens = sum(len(d) for d in docs)
    with pytest.warns(UserWarning, match=rf"num_centroids=5000 exceeds the {tokens} tokens of the corpus; using {tokens}"):
        big = build(tmp_path / "c5000", docs, num_centroids=5000)
    assert big.num_centroids == tokens
    res = plaid.Searcher(big).search(docs[:10], k=1)
    assert np.mean(res.ids[:, 0] == np.arange(10)) >= 0.9

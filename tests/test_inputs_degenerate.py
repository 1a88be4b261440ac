"""Degenerate documents and queries are refused with an InvalidInputError that names the argument:
dimension 0, meta / sparse / nested tensors, scipy sparse matrices, objects that are no array,
queries of the wrong number of dims, bad doclens. Valid but unusual forms still work."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import plaid
from plaid.embeddings import as_corpus, as_queries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, mini_corpus):
    docs, _ = mini_corpus
    path = str(tmp_path_factory.mktemp("degenerate") / "idx")
    plaid.Indexer(show_progress=False, pq_m=16).build(path, docs)
    return plaid.Searcher(path)


def _q(m=4, dim=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(m, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sparse_csr(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return t.to_sparse_csr()


def _nested(ts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are a prototype"
        return torch.nested.nested_tensor(ts)


# -- queries -------------------------------------------------------------------------------------------
QUERY_CASES = {
    "[m, 0]": (lambda: np.zeros((4, 0), np.float32), r"queries: vectors of dimension 0 \(shape \(4, 0\)\)"),
    "[nq, m, 0]": (lambda: np.zeros((2, 4, 0), np.float32), r"queries: vectors of dimension 0"),
    "list of [m, 0]": (lambda: [_q(), np.zeros((3, 0), np.float32)], r"query 1: vectors of dimension 0"),
    "torch [m, 0]": (lambda: torch.zeros(4, 0), r"queries: vectors of dimension 0"),
    "meta tensor": (lambda: torch.empty(4, 32, device="meta"), r"queries: a meta tensor holds no data"),
    "meta in a list": (lambda: [_q(), torch.empty(4, 32, device="meta")], r"query 1: a meta tensor"),
    "sparse COO": (lambda: torch.from_numpy(_q()).to_sparse(), r"queries: sparse tensors \(layout torch.sparse_coo\)"),
    "sparse CSR": (lambda: _sparse_csr(torch.from_numpy(_q())), r"queries: sparse tensors \(layout torch.sparse_csr\)"),
    "sparse 3-D batch": (lambda: torch.from_numpy(_q()[None]).to_sparse(), r"queries: sparse tensors"),
    "nested tensor": (lambda: _nested([torch.from_numpy(_q()), torch.from_numpy(_q(2))]), r"queries: nested tensors"),
    "4-D array": (lambda: _q()[None, None], r"queries: expected \[m, dim\], \[nq, m, dim\].*shape \(1, 1, 4, 32\)"),
    "5-D tensor": (lambda: torch.zeros(1, 1, 1, 4, 32), r"queries: expected .*shape \(1, 1, 1, 4, 32\)"),
    "list of 3-D arrays": (lambda: [_q()[None]], r"query 0: expected a 2-D \[n_tokens, dim\] array, got shape \(1, 4, 32\)"),
    "1-D vector": (lambda: _q()[0], r"queries: expected .*got shape \(32,\)"),
    "list of 1-D vectors": (lambda: [_q()[0], _q()[1]], r"query 0: expected a 2-D .*a list is a list of queries"),
    "0-D": (lambda: np.float32(1.0), r"queries: expected .*got shape \(\)"),
    "no queries [0, m, dim]": (lambda: np.zeros((0, 4, 32), np.float32), r"queries: no queries given"),
    "no tokens [nq, 0, dim]": (lambda: np.zeros((2, 0, 32), np.float32), r"query 0 has no token vectors"),
    "empty list": (lambda: [], r"queries: no queries given"),
    "wrong dim, 3-D": (lambda: np.zeros((2, 4, 16), np.float32), r"query 0: dim 16 does not match the index dim 32"),
    "integer dtype": (lambda: np.ones((4, 32), np.int32), r"queries: unsupported dtype int32"),
    "complex tensor": (lambda: torch.zeros(4, 32, dtype=torch.complex64), r"queries: unsupported dtype torch.complex64"),
    "NaN in a 3-D batch": (lambda: np.where(np.arange(32) == 3, np.nan, _q()[None].repeat(2, 0)).astype(np.float32),
                           r"query 0 contains NaN or inf"),
    "generator": (lambda: (q for q in [_q()]), r"queries: expected an array or tensor, got generator"),
    "None": (lambda: None, r"queries: expected an array or tensor, got NoneType"),
    "str": (lambda: "a query", r"queries: expected an array or tensor, got str"),
    "dict": (lambda: {"q": _q()}, r"queries: expected an array or tensor, got dict"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_degenerate_queries_are_refused(searcher, case):
    make, match = QUERY_CASES[case]
    with pytest.raises(plaid.InvalidInputError, match=match):
        searcher.search(make(), k=3)


def test_scipy_sparse_query_is_refused(searcher):
    sp = pytest.importorskip("scipy.sparse")
    with pytest.raises(plaid.InvalidInputError, match=r"queries: sparse matrices \(csr_matrix\).*toarray"):
        searcher.search(sp.csr_matrix(_q()), k=3)


def test_maxsim_refuses_zero_dimension_vectors():
    with pytest.raises(plaid.InvalidInputError, match=r"queries: vectors of dimension 0"):
        plaid.maxsim(np.zeros((4, 0), np.float32), [np.zeros((5, 0), np.float32)])
    with pytest.raises(plaid.InvalidInputError, match=r"document 0: vectors of dimension 0"):
        plaid.maxsim(_q(), [np.zeros((5, 0), np.float32)])


def test_unusual_but_valid_queries_still_work(searcher, mini_corpus):
    docs, _ = mini_corpus
    q = docs[7]
    ref = searcher.search(q, k=3)
    t = torch.from_numpy(q.copy())
    forms = {
        "negative-bit view": (-t)._neg_view(),  # -(-q) as a lazily negated view
        "requires_grad": t.clone().requires_grad_(),
        "bfloat16": t.bfloat16(),
        "non-contiguous": torch.from_numpy(np.repeat(q, 2, axis=1))[:, ::2],
        "Fortran order": np.asfortranarray(q),
    }
    for name, form in forms.items():
        res = searcher.search(form, k=3)
        assert res.ids[0, 0] == ref.ids[0, 0] == 7, name


# -- documents -----------------------------------------------------------------------------------------
DOC_CASES = {
    "[n, 0] in a list": (lambda: [_q(), np.zeros((5, 0), np.float32)], r"document 1: vectors of dimension 0 \(shape \(5, 0\)\)"),
    "only [n, 0]": (lambda: [np.zeros((5, 0), np.float32)] * 3, r"document 0: vectors of dimension 0"),
    "[0, 0] then [n, 0]": (lambda: [np.zeros((0, 0), np.float32), np.zeros((5, 0), np.float32)], r"document 1: vectors of dimension 0"),
    "3-D [docs, n, 0]": (lambda: np.zeros((3, 5, 0), np.float32), r"documents: vectors of dimension 0"),
    "generator of [n, 0]": (lambda: (np.zeros((5, 0), np.float32) for _ in range(3)), r"document 0: vectors of dimension 0"),
    "Embeddings [T, 0]": (lambda: plaid.Embeddings(np.zeros((5, 0), np.float32), [5]), r"Embeddings.vectors: vectors of dimension 0"),
    "Embeddings [0, 0]": (lambda: plaid.Embeddings(np.zeros((0, 0), np.float32), [0]), r"Embeddings.vectors: dim is 0"),
    "meta tensor": (lambda: [torch.empty(5, 32, device="meta")], r"document 0: a meta tensor holds no data"),
    "3-D meta tensor": (lambda: torch.empty(3, 5, 32, device="meta"), r"documents: a meta tensor"),
    "sparse COO": (lambda: [torch.from_numpy(_q()), torch.from_numpy(_q()).to_sparse()], r"document 1: sparse tensors \(layout torch.sparse_coo\)"),
    "sparse CSR": (lambda: [_sparse_csr(torch.from_numpy(_q()))], r"document 0: sparse tensors \(layout torch.sparse_csr\)"),
    "3-D sparse": (lambda: torch.from_numpy(_q()[None].repeat(3, 0)).to_sparse(), r"documents: sparse tensors"),
    "generator of sparse": (lambda: (torch.from_numpy(_q()).to_sparse() for _ in range(2)), r"document 0: sparse tensors"),
    "Embeddings meta": (lambda: plaid.Embeddings(torch.empty(5, 32, device="meta"), [5]), r"Embeddings.vectors: a meta tensor"),
    "Embeddings sparse": (lambda: plaid.Embeddings(torch.from_numpy(_q(5)).to_sparse(), [5]), r"Embeddings.vectors: sparse tensors"),
    "doclens meta": (lambda: plaid.Embeddings(_q(5), torch.empty(1, dtype=torch.long, device="meta")), r"Embeddings.doclens: a meta tensor"),
    "doclens strings": (lambda: plaid.Embeddings(_q(5), ["5"]), r"Embeddings.doclens must hold integers, got dtype <U1"),
    "doclens bool": (lambda: plaid.Embeddings(_q(1), [True]), r"Embeddings.doclens must hold integers, got dtype bool"),
    "doclens NaN": (lambda: plaid.Embeddings(_q(5), [np.nan]), r"Embeddings.doclens must hold integers"),
    "doclens huge float": (lambda: plaid.Embeddings(_q(5), [1e30]), r"Embeddings.doclens must hold integers"),
    "None": (lambda: None, r"documents must be plaid.Embeddings"),
}


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_degenerate_documents_are_refused(tmp_path, case):
    make, match = DOC_CASES[case]
    with pytest.raises(plaid.InvalidInputError, match=match):
        plaid.Indexer(show_progress=False).build(str(tmp_path / "idx"), make())
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_zero_dimension_documents_never_reach_faiss(tmp_path):
    """faiss' k-means dies with SIGFPE on [n, 0] vectors: the build must refuse them first. Run
    in a child process, so that a regression shows as a signal instead of killing the test run."""
    code = (
        "import numpy as np, plaid, sys\n"
        "try:\n"
        f"    plaid.Indexer(show_progress=False).build({str(tmp_path / 'z')!r}, [np.zeros((5, 0), np.float32)] * 20)\n"
        "except plaid.InvalidInputError as e:\n"
        "    print('refused:', e); sys.exit(0)\n"
        "print('built'); sys.exit(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"child exited {p.returncode} (negative: a signal)\n{p.stdout}\n{p.stderr}"
    assert "refused: document 0: vectors of dimension 0" in p.stdout


def test_empty_documents_of_any_form_are_still_empty_documents():
    """[0, 0] and 1-D empty arrays stay empty documents (not dimension-0 vectors)."""
    docs = [_q(3), np.zeros((0, 0), np.float32), np.zeros((0,), np.float32), _q(2, seed=1)]
    corpus = as_corpus(docs)
    assert corpus.dim == 32 and corpus.doclens.tolist() == [3, 0, 0, 2]
    assert as_corpus(np.zeros((2, 4, 32), np.float32) + 1).dim == 32


def test_as_queries_names_the_query():
    with pytest.raises(plaid.InvalidInputError, match=r"query 2: a meta tensor"):
        as_queries([_q(), _q(), torch.empty(2, 32, device="meta")])
    with pytest.raises(plaid.InvalidInputError, match=r"query 1: dim 16 differs from query 0's dim 32"):
        as_queries([_q(), _q(dim=16)])

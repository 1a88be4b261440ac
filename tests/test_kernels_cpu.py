"""plaid.search.kernels_cpu: every kernel equals the numpy stages bit for bit (compared with ==),
on random data, on a small real index and on msmarco-5k; edge cases; the numpy fallback."""
from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import plaid
from plaid.errors import IndexCorruptError
from plaid.search import kernels_cpu as K
from plaid.search.stages import split_ids
import reference_stages as stages  # the numpy stages, frozen (incl. the policy helpers)

from conftest import requires_msmarco

HAVE_NUMBA = K.backend() == "numba"
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not importable here (fallback only)")


def same(a, b) -> bool:
    """Bit-for-bit equality of float32 results (-inf included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


# -- references: the numpy engine's own code --------------------------------------------------------
def ref_docside(Re, keep, docs, dcells, dcell_offsets):
    offs, cells = stages.document_cells(docs, dcells, dcell_offsets)
    if keep is None:
        return stages.approximate_maxsim(Re, cells, offs), np.ones(len(docs), bool)
    return (stages.approximate_maxsim(Re, stages.pruned_cells(cells, keep), offs),
            stages.covered_documents(cells, keep, offs))


def ref_stage4(table, cs, slot, codes, residuals, norms, offsets):
    """Searcher._stage4_sims + stages.maxsim_scores, on gathered tokens."""
    sims = stages.adc_scores(torch.from_numpy(table), residuals)
    sims += cs.take(slot[codes], axis=1).T
    if norms is not None:
        sims /= torch.from_numpy(np.asarray(norms)).float().numpy()[:, None]
    return stages.maxsim_scores(sims, offsets)


def random_ivf(rng, N, C, max_cells=12):
    """A random inverted file: each document in 1..max_cells distinct centroids."""
    pairs = []
    for d in range(N):
        for c in rng.choice(C, size=int(rng.integers(1, max_cells + 1)), replace=False):
            pairs.append((c, d))
    pairs.sort()
    cells = np.array([p[0] for p in pairs])
    ivf = np.array([p[1] for p in pairs], np.int32)
    ivf_offsets = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(cells, minlength=C), out=ivf_offsets[1:])
    return ivf, ivf_offsets


def tied_scores(rng, shape):
    """float32 scores on a 1/16 grid: many exact ties."""
    return (np.round(rng.uniform(-1, 1, shape) * 16) / 16).astype(np.float32)


# -- numpy's summation orders --------------------------------------------------------------------------
@needs_numba
def test_pairwise_sum_is_numpys_order():
    from plaid.search import _kernels_numba as nb

    rng = np.random.default_rng(0)
    for n in list(range(0, 140)) + [255, 256, 257, 300, 1000, 1031]:
        for _ in range(4):
            a = (rng.normal(size=n) * 10 ** rng.uniform(-4, 4, n)).astype(np.float32)
            assert nb.pairwise_sum(a, n) == a.sum(dtype=np.float32), n
            if n:  # the axis-1 row sum of stage 4 and the single-column sum of stages 2-3
                assert nb.token_sum(a, n, True) == a[None, :].sum(1, dtype=np.float32)[0]
                assert nb.token_sum(a, n, True) == a[:, None].sum(0, dtype=np.float32)[0]
                two = np.stack([a, a[::-1]], 1)  # [m, 2]: numpy adds rows in order
                assert nb.token_sum(a, n, False) == two.sum(0, dtype=np.float32)[0]


# -- stage 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 7, 9])
def test_stage1_random(m):
    rng = np.random.default_rng(m)
    N, C = 300, 203
    ivf, ivf_offsets = random_ivf(rng, N, C, max_cells=4)
    mark = np.zeros(N, bool)
    for R in (tied_scores(rng, (m, C)), rng.normal(size=(m, C)).astype(np.float32)):
        cuts = stages.CellCuts(R)
        for nc in (1, 2, 3, 16, 17, 64, 65, 150, C - 1, C, C + 5):
            docs, kth = K.candidates(R, nc, ivf, ivf_offsets, mark)
            assert not mark.any()
            assert np.array_equal(docs, stages.candidates(R, nc, ivf, ivf_offsets, cuts)), nc
            assert docs.dtype == np.int64
            if nc < C:
                assert same(kth, np.asarray(cuts.kth(nc), np.float32)), nc
            else:
                assert same(kth, R.min(1))
            assert float(kth.min()) == stages.probed_floor(cuts, nc)
    # few documents listed against many flags: the sorted-collection branch
    big = np.zeros(100_000, bool)
    docs, _ = K.candidates(R, 2, (ivf * 300).astype(np.int32), ivf_offsets, big)
    assert np.array_equal(docs, stages.candidates(R, 2, ivf, ivf_offsets) * 300) and not big.any()


# -- stages 2-3 on random data ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 7, 8, 9, 17, 32, 33])
def test_stages_2_3_random(m):
    rng = np.random.default_rng(m)
    N, C = 400, 97
    ivf, ivf_offsets = random_ivf(rng, N, C)
    dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, N)
    R = tied_scores(rng, (m, C))
    Re = stages.centroid_table(R)
    ReT = K.centroid_table_t(Re)
    assert ReT.shape == (C + 1, -(-m // 8) * 8) and same(ReT[:, :m], np.ascontiguousarray(Re.T))
    buf = np.full((C + 1, 40), np.nan, np.float32)
    assert K.centroid_table_t(Re, out=buf) is buf and same(buf[:, :m], ReT[:, :m])
    slot = np.full(N, -1, np.int32)
    for trial in range(6):
        n = [1, 2, 3, 50, 200, N][trial]
        docs = np.sort(rng.choice(N, n, replace=False)).astype(np.int64)
        counts = dcell_offsets[docs + 1] - dcell_offsets[docs]
        for density in (0.0, 0.05, 0.5, 1.0):
            keep = rng.random(C) < density
            want, want_cov = ref_docside(Re, keep, docs, dcells, dcell_offsets)
            for kw in ({}, {"ReT": ReT}):
                got, cov = K.approx_maxsim_docs(Re, keep, docs, dcells, dcell_offsets, return_covered=True, **kw)
                assert same(got, want) and (cov == want_cov).all(), (n, density, kw.keys())
            got, cov = K.approx_maxsim_ivf(Re, keep, docs, ivf, ivf_offsets, counts, slot)
            assert same(got, want) and (cov == want_cov).all(), (n, density)
            assert (slot == -1).all()
            shuffled = rng.permutation(n)  # any order of the candidates (the kernel ranks them sorted)
            got, cov = K.approx_maxsim_ivf(Re, keep, docs[shuffled], ivf, ivf_offsets, counts[shuffled], slot)
            assert same(got, want[shuffled]) and (cov == want_cov[shuffled]).all(), (n, density)
            ref_ivf = stages.pruned_maxsim(keep, Re, docs, ivf, ivf_offsets, counts, slot, return_covered=True)
            assert same(ref_ivf[0], want)
        want, _ = ref_docside(Re, None, docs, dcells, dcell_offsets)
        assert same(K.approx_maxsim_docs(Re, None, docs, dcells, dcell_offsets), want)
        assert same(K.approx_maxsim_docs(Re, None, docs, dcells, dcell_offsets, ReT=ReT), want)


def test_stages_2_3_edge_cases():
    rng = np.random.default_rng(1)
    N, C, m = 50, 20, 5
    ivf, ivf_offsets = random_ivf(rng, N - 1, C)  # document N-1 is empty (in no list)
    dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, N)
    Re = stages.centroid_table(tied_scores(rng, (m, C)))
    slot = np.full(N, -1, np.int32)
    none = np.zeros(0, np.int64)
    for kw in ({}, {"ReT": K.centroid_table_t(Re)}):
        s, cov = K.approx_maxsim_docs(Re, np.ones(C, bool), none, dcells, dcell_offsets, return_covered=True, **kw)
        assert s.shape == (0,) and cov.shape == (0,)
        # every centroid pruned: m * PRUNED_SCORE, not covered (as the numpy stages)
        docs = np.arange(10, dtype=np.int64)
        s, cov = K.approx_maxsim_docs(Re, np.zeros(C, bool), docs, dcells, dcell_offsets, return_covered=True, **kw)
        assert (s == np.float32(m * stages.PRUNED_SCORE)).all() and not cov.any()
        # an empty document scores -inf and is not covered; the others are unchanged
        docs = np.array([3, N - 1], np.int64)
        keep = rng.random(C) < 0.5
        s, cov = K.approx_maxsim_docs(Re, keep, docs, dcells, dcell_offsets, return_covered=True, **kw)
        one, one_cov = ref_docside(Re, keep, docs[:1], dcells, dcell_offsets)
        assert s[1] == -np.inf and not cov[1] and cov[0] == one_cov[0]
        # (the kernel sums doc 3 sequentially, n being 2; numpy summed its single column pairwise)
        two = np.array([3, 3], np.int64)
        assert s[0] == K.approx_maxsim_docs(Re, keep, two, dcells, dcell_offsets)[0]
    counts = dcell_offsets[docs + 1] - dcell_offsets[docs]
    s, cov = K.approx_maxsim_ivf(Re, keep, docs, ivf, ivf_offsets, counts, slot)
    assert s[1] == -np.inf and not cov[1]
    s, cov = K.approx_maxsim_ivf(Re, keep, none, ivf, ivf_offsets, counts[:0], slot)
    assert s.shape == (0,) and (slot == -1).all()
    with pytest.raises(ValueError):
        K.approx_maxsim_docs(Re, np.ones(C + 1, bool), docs, dcells, dcell_offsets)


# -- stage 4 on random data ----------------------------------------------------------------------------
def random_stage4(rng, m, B, U, C, lens, codes_dtype, norms_kind):
    table = (rng.normal(size=(B * 256, m)) * rng.uniform(0.01, 1, (B * 256, 1))).astype(np.float32)
    cs = rng.normal(size=(m, U)).astype(np.float32)
    u = np.sort(rng.choice(C, U, replace=False))
    slot = np.full(C, -1, np.int32)
    slot[u] = np.arange(U, dtype=np.int32)
    t = int(sum(lens))
    codes = u[rng.integers(0, U, t)].astype(codes_dtype)
    residuals = rng.integers(0, 256, (t, B)).astype(np.uint8)
    norms = None
    if norms_kind != "none":
        norms = rng.uniform(0.5, 1.5, t).astype(np.float16 if norms_kind == "f16" else np.float32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return table, cs, slot, codes, residuals, norms, offsets


@pytest.mark.parametrize("m", [1, 6, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("codes_dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("norms_kind", ["f16", "f32", "none"])
def test_stage4_random(m, codes_dtype, norms_kind):
    rng = np.random.default_rng(m * 7 + len(norms_kind))
    for B in (16, 32):
        lens = [1, 2, 3, 7, 40, 1, 90]
        table, cs, slot, codes, residuals, norms, offsets = random_stage4(rng, m, B, 60, 300, lens, codes_dtype,
                                                                         norms_kind)
        want = ref_stage4(table, cs, slot, codes, residuals, norms, offsets)
        assert same(K.exact_maxsim(table, cs, slot, codes, residuals, norms, offsets), want)
        # the in-place variant over the same arrays, for a subset of the "documents"
        docs = np.array([0, 2, 3, 6], np.int64)
        got = K.exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, offsets, docs)
        assert same(got, want[docs])
        # one candidate
        assert same(K.exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, offsets, docs[1:2]), want[2:3])
        # used_centroids finds the columns the tokens use
        u, sl = K.used_centroids(codes, offsets, np.arange(len(lens)), len(slot))
        assert (u == np.unique(codes)).all() and (sl[u] == np.arange(len(u))).all()
        assert ((sl >= 0).sum()) == len(u)


@needs_numba
@pytest.mark.parametrize("C", [47, 203, 1000])  # (one column: BLAS runs a gemv, summed otherwise)
def test_scores_product_is_the_batched_blas_product(C):
    """Q·Sᵀ·diag(f) by the kernel from int8 rows S: fused multiply-adds over the dimensions in
    order, then one multiply by the factor, so each row's scores do not depend on its batch, and
    equal a BLAS sgemm that sums in that order (torch's MKL on a batch of rows: what the engine's
    fallback and tests/reference_search.py use) times the factors."""
    rng = np.random.default_rng(C)
    S = rng.integers(-127, 128, size=(C, 128)).astype(np.int8)
    f = rng.random(C).astype(np.float32) / 100
    P = K.product_panels(S)
    assert P.dtype == np.int8 and P.shape == (-(-C // 48) * 128, 48)
    assert (P.reshape(-1, 128, 48).transpose(0, 2, 1).reshape(-1, 128)[:C] == S).all()
    batch = rng.normal(size=(40, 128)).astype(np.float32)
    want = (torch.from_numpy(batch) @ torch.from_numpy(S.astype(np.float32)).T).numpy() * f
    for rows in (slice(0, 40), slice(0, 1), slice(3, 5), slice(7, 14)):
        Q = np.ascontiguousarray(batch[rows])
        out = np.full((len(Q), C), np.nan, np.float32)
        assert K.scores_product(Q, P, f, out, 0, C)
        assert same(out, want[rows])  # a row's bits do not depend on its batch
        split = np.full_like(out, np.nan)  # disjoint column ranges (as threads fill them)
        cut = min(C, K.PRODUCT_ALIGN)
        K.scores_product(Q, P, f, split, cut, C)
        K.scores_product(Q, P, f, split, 0, cut)
        assert same(split, out)
    with pytest.raises(ValueError):  # float32 panels are not the kernel's layout
        K.scores_product(batch[:4], P.astype(np.float32), f, np.empty((4, C), np.float32), 0, C)
    with pytest.raises(ValueError):
        K.product_panels(S.astype(np.float32))


def test_scoring_rows_are_the_stored_int8_centroids(tmp_path):
    """Stages 1-3 score the centroids' int8 rows as a format-3 index stores them, times 1/|row|
    for unit vectors: the scores are the unit centroids' within float32 rounding."""
    from plaid.codecs import dequantize_centroids, quantize_centroids
    from plaid.search.pipeline import scoring_centroids

    rng = np.random.default_rng(0)
    c = rng.normal(size=(300, 64)).astype(np.float32)
    c[5] = 0.0  # a zero centroid scores 0
    stored = quantize_centroids(c)
    deq = dequantize_centroids(stored["centroids"], stored["centroid_scales"])
    rows, factor = scoring_centroids(deq, normalized=True)
    assert rows.dtype == np.int8 and (rows == stored["centroids"]).all()
    unit = deq / np.maximum(np.linalg.norm(deq, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(rows.astype(np.float32) * factor[:, None], unit, rtol=0, atol=1e-6)
    assert factor[5] == 0
    rows, factor = scoring_centroids(deq, normalized=False)
    assert (rows == stored["centroids"]).all()
    np.testing.assert_array_max_ulp(factor, stored["centroid_scales"], 1)  # re-derived from the dequantized rows
    with pytest.raises(ValueError):  # a factor the kernel was not compiled for is refused, not compiled
        K.scores_product(np.zeros((1, 64), np.float32), K.product_panels(rows), factor.astype(np.float64),
                         np.empty((1, 300), np.float32), 0, 300)


@pytest.mark.parametrize("m", [1, 7, 8, 9, 33])
def test_centroid_terms_fixed_order(m):
    """Stage 4's centroid terms: float32 products added in order d = 0.. from 0, never fused, in
    the kernel and in numpy alike (so the fallback gives the same bits); within rounding of BLAS."""
    rng = np.random.default_rng(m)
    C, dim = 300, 128
    centroids = rng.normal(size=(C, dim)).astype(np.float32)
    q = rng.normal(size=(m, dim)).astype(np.float32)
    for U in (0, 1, 3, 4, 5, 57):
        u = np.sort(rng.choice(C, U, replace=False)).astype(np.int64)
        want = np.zeros((m, U), np.float32)
        for d in range(dim):
            want += q[:, d : d + 1] * centroids[u, d][None, :]
        got = K.centroid_terms(q, centroids, u)
        assert got.shape == (m, U) and same(got, want)
        np.testing.assert_allclose(got, q @ centroids[u].T, rtol=0, atol=1e-4)


def test_stage4_edge_cases():
    rng = np.random.default_rng(5)
    table, cs, slot, codes, residuals, norms, offsets = random_stage4(rng, 7, 16, 20, 100, [3, 0, 4], np.uint16, "f16")
    got = K.exact_maxsim(table, cs, slot, codes, residuals, norms, offsets)
    assert got[1] == -np.inf  # a candidate without tokens
    keep = np.array([0, 2])
    want = ref_stage4(table, cs, slot, codes, residuals, norms, np.array([0, 3, 7]))
    assert same(got[keep], want)
    none = np.zeros(0, np.int64)
    assert K.exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, offsets, none).shape == (0,)
    u, sl = K.used_centroids(codes, offsets, none, len(slot))
    assert len(u) == 0 and (sl == -1).all()
    # corrupt values are refused, never scored (in-place reads validate what they read)
    bad = codes.copy()
    bad[5] = 100  # >= C
    with pytest.raises(IndexCorruptError):
        K.exact_maxsim(table, cs, slot, bad, residuals, norms, offsets)
    with pytest.raises(IndexCorruptError):
        K.used_centroids(bad, offsets, np.arange(3), len(slot))
    unused = codes.copy()
    unused[0] = np.flatnonzero(slot < 0)[0]  # a centroid the product did not score
    with pytest.raises(IndexCorruptError):
        K.exact_maxsim(table, cs, slot, unused, residuals, norms, offsets)
    for v in (0.0, -1.0, np.inf, np.nan):
        n2 = norms.copy()
        n2[4] = v
        with pytest.raises(IndexCorruptError):
            K.exact_maxsim(table, cs, slot, codes, residuals, n2, offsets)
        with pytest.raises(IndexCorruptError):
            K.exact_maxsim(table, cs, slot, codes, residuals, n2.astype(np.float32), offsets)
    with pytest.raises(ValueError):  # token ranges past the arrays
        K.exact_maxsim_ranges(table, cs, slot, codes, residuals, norms, offsets + 100, np.array([0]))


# -- a real (small) index and msmarco-5k ----------------------------------------------------------------
def check_index(path, queries, nq):
    """Every kernel against the numpy stages on the stage inputs of real queries (default k=10 params)."""
    s = plaid.Searcher(path, engine="numpy")
    st = s._state.engine
    slot = np.full(st.num_documents, -1, np.int32)
    codes, residuals = st.codes.parts[0], st.residuals.parts[0]  # memory-mapped, read in place
    norms = st.norms.parts[0] if st.norms is not None else None
    checked = 0
    for q in queries[:nq]:
        q = np.asarray(q, np.float32)
        R = st.centroid_scores(q)
        docs = stages.candidates(R, 2, st.ivf, st.ivf_offsets)
        mark = np.zeros(st.num_documents, bool)
        for nc in (1, 2, 3, 5):
            got, kth = K.candidates(R, nc, st.ivf, st.ivf_offsets, mark)
            assert np.array_equal(got, stages.candidates(R, nc, st.ivf, st.ivf_offsets)) and not mark.any()
        Re = stages.centroid_table(R)
        keep = stages.surviving(R, 0.5)
        counts = st.dcell_offsets[docs + 1] - st.dcell_offsets[docs]
        want, want_cov = ref_docside(Re, keep, docs, st.dcells, st.dcell_offsets)
        got, cov = K.approx_maxsim_ivf(Re, keep, docs, st.ivf, st.ivf_offsets, counts, slot)
        assert same(got, want) and (cov == want_cov).all()
        got, cov = K.approx_maxsim_docs(Re, keep, docs, st.dcells, st.dcell_offsets, return_covered=True)
        assert same(got, want) and (cov == want_cov).all()
        ReT = K.centroid_table_t(Re)
        top = np.sort(stages.top_n(want, 256))
        want3, _ = ref_docside(Re, None, docs[top], st.dcells, st.dcell_offsets)
        assert same(K.approx_maxsim_docs(Re, None, docs[top], st.dcells, st.dcell_offsets, ReT=ReT), want3)
        assert same(K.approx_maxsim_docs(Re, None, docs[top], st.dcells, st.dcell_offsets), want3)
        d4 = docs[np.sort(stages.top_n(want3, 64))]
        starts = st.doc_offsets[d4]
        pos, offs = stages.expand_ranges(starts, st.doc_offsets[d4 + 1] - starts)
        want4 = stages.maxsim_scores(st.token_sims(q, pos), offs)
        assert same(K.exact_scores(q, st.codec, st.centroids, codes, residuals, norms, st.doc_offsets, d4,
                                   norm_values=st.norm_values), want4)
        cc = st.token_codes(pos)
        u, sl = K.used_centroids(cc, offs, np.arange(len(d4)), st.num_centroids)
        cs = K.centroid_terms(q, st.centroids, u)
        gathered_norms = st.token_norms(pos) if norms is not None else None
        table = st.codec.score_table(q).numpy()
        got4 = K.exact_maxsim(table, cs, sl, cc, st.residuals.take(pos), gathered_norms, offs)
        assert same(got4, want4)
        # the centroid terms are summed in the kernels' own fixed order (not a BLAS's): within
        # float32 rounding of the torch product the replaced pipeline used
        cs_blas = (torch.from_numpy(q) @ torch.from_numpy(np.take(st.centroids, u, axis=0)).T).numpy()
        np.testing.assert_allclose(cs, cs_blas, rtol=0, atol=1e-5)
        blas4 = K.exact_maxsim(table, cs_blas, sl, cc, st.residuals.take(pos), gathered_norms, offs)
        np.testing.assert_allclose(got4, blas4, rtol=0, atol=1e-5)
        checked += 1
    assert slot.min() == -1 and slot.max() == -1
    return checked


def test_small_index(small_index, small_corpus):
    _, queries = small_corpus
    assert check_index(small_index, queries, 30) == 30


def test_small_scalar_index(small_scalar_index, small_corpus):
    _, queries = small_corpus
    assert check_index(small_scalar_index, queries, 10) == 10


def test_unnormalised_index(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    path = str(tmp_path / "raw")
    rng = np.random.default_rng(0)
    plaid.Indexer(show_progress=False, pq_m=16).build(
        path, [d * rng.uniform(0.5, 2.0, size=(len(d), 1)).astype(np.float32) for d in docs])
    assert not plaid.Searcher(path).normalized
    assert check_index(path, queries, 6) == 6


@requires_msmarco
@pytest.mark.msmarco
def test_msmarco(msmarco, msmarco_default):
    assert check_index(msmarco_default, msmarco.queries, 10) == 10


# -- threads ----------------------------------------------------------------------------------------
def test_kernels_from_two_threads(small_index, small_corpus):
    _, queries = small_corpus
    s = plaid.Searcher(small_index, engine="numpy")
    st = s._state.engine
    codes, residuals, norms = st.codes.parts[0], st.residuals.parts[0], st.norms.parts[0]

    def run(qs, out):
        slot = np.full(st.num_documents, -1, np.int32)  # one scratch per thread
        for q in qs:
            R = st.centroid_scores(q)
            docs = stages.candidates(R, 2, st.ivf, st.ivf_offsets)
            Re = stages.centroid_table(R)
            counts = st.dcell_offsets[docs + 1] - st.dcell_offsets[docs]
            a, _ = K.approx_maxsim_ivf(Re, stages.surviving(R, 0.5), docs, st.ivf, st.ivf_offsets, counts, slot)
            e = K.exact_scores(q, st.codec, st.centroids, codes, residuals, norms, st.doc_offsets, docs[:64],
                               norm_values=st.norm_values)
            out.append((a, e))

    serial = []
    run(queries, serial)
    outs = [[], []]
    threads = [threading.Thread(target=run, args=(queries[i::2], outs[i])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for (a, e), (a2, e2) in zip(outs[i], serial[i::2]):
            assert same(a, a2) and same(e, e2)


# -- fallback ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_backend(monkeypatch):
    K.reset()
    yield monkeypatch
    monkeypatch.undo()
    K.reset()
    K.warmup(np.uint16)  # loaded again, as conftest leaves them for the tests that follow


def all_kernels(seed=0):
    """The outputs of every public kernel on one random problem (a list of arrays)."""
    rng = np.random.default_rng(seed)
    N, C, m = 120, 40, 9
    ivf, ivf_offsets = random_ivf(rng, N, C)
    dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, N)
    Re = stages.centroid_table(tied_scores(rng, (m, C)))
    keep = rng.random(C) < 0.3
    docs = np.sort(rng.choice(N, 60, replace=False)).astype(np.int64)
    counts = dcell_offsets[docs + 1] - dcell_offsets[docs]
    slot = np.full(N, -1, np.int32)
    out = list(K.candidates(Re[:, :C], 3, ivf, ivf_offsets, np.zeros(N, bool)))
    out += list(K.approx_maxsim_docs(Re, keep, docs, dcells, dcell_offsets, return_covered=True))
    out.append(K.approx_maxsim_docs(Re, None, docs, dcells, dcell_offsets, ReT=K.centroid_table_t(Re)))
    out += list(K.approx_maxsim_ivf(Re, keep, docs, ivf, ivf_offsets, counts, slot))
    table, cs, sl, codes, residuals, norms, offsets = random_stage4(rng, m, 16, 30, 200, [4, 9, 1, 30], np.uint16,
                                                                   "f16")
    out.append(K.exact_maxsim(table, cs, sl, codes, residuals, norms, offsets))
    out.append(K.exact_maxsim_ranges(table, cs, sl, codes, residuals, None, offsets, np.array([1, 3])))
    out += list(K.used_centroids(codes, offsets, np.array([0, 2]), len(sl)))
    out.append(K.centroid_terms(rng.normal(size=(m, 16)).astype(np.float32),
                                 rng.normal(size=(200, 16)).astype(np.float32), np.array([3, 1, 150, 7, 9])))
    return out


def wide_ivf(rng, N, C, present):
    """An inverted file over ``present`` documents scattered in [0, N) (ids past 16 bits), each in
    1..6 centroids, lists ascending: (ivf int32, ivf_offsets int64 [C + 1])."""
    docs = np.sort(rng.choice(N, present, replace=False))
    d = np.repeat(docs, rng.integers(1, 7, len(docs)))
    pairs = np.unique(np.stack([rng.integers(0, C, len(d)), d], 1), axis=0)  # by centroid, then document
    ivf_offsets = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=C), out=ivf_offsets[1:])
    return pairs[:, 1].astype(np.int32), ivf_offsets


@pytest.mark.parametrize("compiled", [True, False])
def test_sixteen_bit_ids_in_blocks_give_what_whole_ids_give(fresh_backend, compiled):
    """The CPU engine's inverted file (stages.split_ids: uint16 ids in blocks of 65,536 documents)
    gives stage 1 and stage 2 exactly what the int32 ids give, compiled and in the numpy fallback;
    a list not ascending (not as plaid writes it) is regrouped with the same results."""
    if compiled and not HAVE_NUMBA:
        pytest.skip("numba is not importable here")
    if not compiled:
        fresh_backend.setenv("PLAID_NO_NUMBA", "1")
    rng = np.random.default_rng(7)
    N, C, m = 250_000, 50, 9
    ivf, ivf_offsets = wide_ivf(rng, N, C, 3000)
    shuffled = ivf.copy()
    for c in range(C):
        rng.shuffle(shuffled[ivf_offsets[c]:ivf_offsets[c + 1]])
    dcells, dcell_offsets = stages.doc_cells(ivf, ivf_offsets, N)
    Re = stages.centroid_table(tied_scores(rng, (m, C)))
    slot = np.full(N, -1, np.int32)
    for source in (ivf, shuffled):
        low, blocks = split_ids(source, ivf_offsets, N)
        assert low.dtype == np.uint16 and len(blocks) == 4 * C + 1 and int(ivf.max()) >= 3 << 16
        assert np.array_equal(blocks[::4], ivf_offsets)
        for nc in (1, 3, C):
            whole = K.candidates(Re[:, :C], nc, ivf, ivf_offsets, np.zeros(N, bool))
            split = K.candidates(Re[:, :C], nc, low, ivf_offsets, np.zeros(N, bool), blocks)
            assert all(same(a, b) for a, b in zip(whole, split))
        docs = whole[0]
        counts = dcell_offsets[docs + 1] - dcell_offsets[docs]
        for keep in (rng.random(C) < 0.3, np.ones(C, bool)):
            a = K.approx_maxsim_ivf(Re, keep, docs, ivf, ivf_offsets, counts, slot)
            b = K.approx_maxsim_ivf(Re, keep, docs, low, ivf_offsets, counts, slot, blocks)
            assert same(a[0], b[0]) and same(a[1], b[1]) and (slot == -1).all()
    assert K.backend() == ("numba" if compiled else "numpy")
    with pytest.raises(ValueError, match="ivf_blocks"):
        K.candidates(Re[:, :C], 1, low, ivf_offsets, np.zeros(N, bool), blocks[:-1])
    with pytest.raises(ValueError, match="ivf_blocks"):
        K.candidates(Re[:, :C], 1, ivf, ivf_offsets, np.zeros(N, bool), blocks)  # int32 ids with blocks
    bad = blocks.copy()
    bad[1], bad[2] = bad[2] + 5, bad[1]  # inner starts out of order (a list read past its end)
    with pytest.raises(ValueError, match="ivf_blocks"):
        K.approx_maxsim_ivf(Re, keep, docs, low, ivf_offsets, counts, slot, bad)
    bad = blocks.copy()
    bad[1] = 1 << 40
    bad.flags.writeable = False  # a read-only array is checked too, once
    for _ in range(2):
        with pytest.raises(ValueError, match="ivf_blocks"):
            K.candidates(Re[:, :C], 1, low, ivf_offsets, np.zeros(N, bool), bad)


def test_fallback_by_environment_warns_once_and_agrees(fresh_backend):
    fast = all_kernels()
    K.reset()
    fresh_backend.setenv("PLAID_NO_NUMBA", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slow = all_kernels()
        slow2 = all_kernels()
    ours = [w for w in caught if "compiled CPU kernels unavailable" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "PLAID_NO_NUMBA" in str(ours[0].message)
    assert K.backend() == "numpy"
    for a, b, c in zip(fast, slow, slow2):
        assert same(a, b) and same(b, c)


def test_fallback_when_compilation_fails(fresh_backend):
    want = all_kernels(1)
    K.reset()
    K.backend()

    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("simulated compile failure")
            return fail

    fresh_backend.setattr(K, "_nb", Broken())
    if K.backend() != "numba":  # numba missing: the fallback is in use already
        pytest.skip("numba is not importable here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = all_kernels(1)
    ours = [w for w in caught if "compiled CPU kernels unavailable" in str(w.message)]
    assert len(ours) == 1 and "simulated compile failure" in str(ours[0].message)
    assert K.backend() == "numpy"
    for a, b in zip(want, got):
        assert same(a, b)


def test_import_compiles_nothing():
    code = ("import sys; import plaid.search.kernels_cpu as K; import plaid.search.searcher; "
            "assert 'numba' not in sys.modules, 'numba imported at import time'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_warmup(fresh_backend):
    t = K.warmup(np.uint16, background=True)
    t.join(120)
    assert not t.is_alive()
    K.warmup(np.int32)
    assert same(all_kernels(2)[0], all_kernels(2)[0])
    K.reset()
    fresh_backend.setenv("PLAID_NO_NUMBA", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert K.warmup() is None and K.backend() == "numpy"


# -- while numba loads in the background ------------------------------------------------------------
class _Spy:
    """Stands in for the numba kernel module: records which kernels were looked up."""

    def __init__(self, real):
        self.real, self.used = real, []

    def __getattr__(self, name):
        self.used.append(name)
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def rotated_index(tmp_path_factory, small_corpus):
    """A rotated-PQ index of small_corpus (the default codec's query rotation is on the query path)."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("idx") / "rotated")
    plaid.Indexer(show_progress=False, pq_m=16, pq_rotation=True).build(path, docs)
    return path


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_a_query_does_not_wait_for_numba_to_load_and_a_batch_does(rotated_index, small_corpus, monkeypatch, threads):
    """While a background warmup runs (a fresh process: numba's start-up ~0.5-1 s, a cold compile
    ~20 s), a one-query search in another thread looks up no compiled kernel, so it never waits
    on numba's compiler lock, and returns what the compiled search returns: ids, scores and every
    stage's survivors and threshold, for queries of 1-7 tokens (the torch product's bits depend on
    the number of rows). A call of several queries waits for the loader instead
    (pipeline.WAIT_FOR_KERNELS_ABOVE), then runs the compiled kernels."""
    from plaid import _loading
    from plaid import codecs

    _, queries = small_corpus
    qs = [q[:n] for q in queries[:8] for n in (1, 2, 3, 5, 7)]
    s = plaid.Searcher(rotated_index, centroid_precision="float32", num_threads=threads)
    assert s._state.engine.codec.rotation  # the query rotation is on the path

    def singles():
        return [s.search(q, k=k, trace=True) for q in qs for k in (10, 100)]

    want, want_batch = singles(), s.search(queries, k=10)
    spy = _Spy(K._nb)
    monkeypatch.setattr(K, "_nb", spy)
    rot = codecs._ROT.get()
    rotations = []
    monkeypatch.setattr(codecs._ROT, "fn", lambda *a: rotations.append(1) or rot(*a))
    release = threading.Event()
    t = _loading.start(lambda: release.wait(60), "test-loader")
    try:
        assert not K.ready() and K.backend() == "numba"
        got = singles()
        assert spy.used == [] and rotations == []
        timer = threading.Timer(0.5, release.set)
        timer.start()
        got_batch = s.search(queries, k=10)  # waits for the loader: released by the timer
        assert release.is_set() and spy.used and rotations  # then the compiled kernels
    finally:
        release.set()
        t.join()
    for a, b in zip(want + [want_batch], got + [got_batch]):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    for a, b in zip(want, got):
        ta, tb = a.traces[0], b.traces[0]
        for name in ("candidates", "stage2", "stage3"):
            np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
        assert ta.threshold == tb.threshold and ta.ncells == tb.ncells
    assert K.wait() and K.ready()


def test_a_forked_child_is_not_left_waiting_for_its_parent_loader():
    """A process forked while a loader thread runs has no such thread: nothing is loading in it."""
    import os

    from plaid import _loading

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    release = threading.Event()
    t = _loading.start(lambda: release.wait(60), "test-loader")
    try:
        assert _loading.busy()
        pid = os.fork()
        if pid == 0:  # the child: report by exit status only
            os._exit(0 if (not _loading.busy() and _loading.wait(1)) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert _loading.busy() and not _loading.wait(0.01)  # the parent's loader still runs
    finally:
        release.set()
        t.join()
    assert not _loading.busy() and _loading.wait(0)

"""Searching: stage-4 exactness, query forms, k beyond the corpus, engines, devices, tiny corpora."""
import warnings

import numpy as np
import pytest
import torch

import plaid
import plaid.store
from conftest import SMALL_INDEXER, decompressed_docs, doc_offsets
from plaid.codecs import NORM_CORE_LEVELS, NORM_TAIL_LEVELS


def assert_stage4_exact(searcher, offsets, queries, res, atol=1e-4, rtol=0.0):
    """Every returned score is exact MaxSim over the decompressed vectors of the returned document."""
    checked = 0
    for i, q in enumerate(queries):
        ids = res.ids[i][res.ids[i] >= 0]
        assert len(ids) > 0
        exact = plaid.maxsim(q, decompressed_docs(searcher, offsets, ids))
        np.testing.assert_allclose(res.scores[i][: len(ids)], exact, rtol=rtol, atol=atol)
        assert np.all(np.isneginf(res.scores[i][len(ids):]))
        checked += len(ids)
    return checked


# -- stage 4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine,precision", [("numpy", "float32"), ("numpy", "bfloat16"), ("torch", "auto")])
@pytest.mark.parametrize("which", ["small_index", "small_scalar_index"])
def test_stage4_scores_are_exact_maxsim_on_decompressed_vectors(request, small_corpus, engine, precision, which):
    """The CPU engine never decodes (centroid score + per-query byte table, over the stored norm):
    with float32 centroid scores it reuses them, with bfloat16 ones it rescores the centroids it
    needs; either way the scores are exact on what ``decompress`` returns."""
    docs, queries = small_corpus
    searcher = plaid.Searcher(request.getfixturevalue(which), engine=engine, centroid_precision=precision)
    res = searcher.search(queries, k=10)
    assert assert_stage4_exact(searcher, doc_offsets(docs), queries, res) == 10 * len(queries)
    # and the results are sorted best first
    assert np.all(np.diff(res.scores, axis=1) <= 0)


@pytest.mark.parametrize("which", ["small_index", "small_scalar_index"])
def test_score_table_sums_to_the_decoded_residual_scores(request, which):
    """Byte j of either codec decodes on its own: summing one table row per byte gives <q, residual>."""
    from plaid.search.stages import adc_scores

    codec = plaid.Index(request.getfixturevalue(which)).load_codec()
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(500, codec.code_bytes), dtype=np.uint8)
    q = rng.normal(size=(6, codec.dim)).astype(np.float32)
    table = codec.score_table(q)
    assert table.shape == (codec.code_bytes * 256, 6) and table.dtype == torch.float32
    np.testing.assert_allclose(adc_scores(table, codes), codec.decode_numpy(codes) @ q.T, rtol=1e-5, atol=1e-5)


def test_stored_norms_are_the_norms_of_the_decoded_vectors(small_index):
    index = plaid.Index(small_index)
    seg = index.manifest["segments"][0]["name"]
    snap = plaid.store.open_snapshot(small_index)
    codes = snap.mapped(f"{seg}_norms")
    assert codes.dtype == np.uint8 and len(codes) == index.num_tokens
    values = snap.norm_quantizer.values
    raw = index.load_codec().decode_numpy(np.ascontiguousarray(snap.mapped(f"{seg}_residuals")))
    raw += snap.centroids[snap.mapped(f"{seg}_codes")]
    # one byte per norm: the nearest (in log) of 256 increasing values, so within half the gap
    # to the neighbouring level on the far side (+1e-6: the encoder's float32 norms and these
    # may differ in the last bit)
    gaps = np.diff(np.log(values.astype(np.float64)))
    half_gap = np.maximum(np.r_[gaps[0], gaps], np.r_[gaps, gaps[-1]]) / 2  # per level
    err = np.abs(np.log(values[codes].astype(np.float64) / np.linalg.norm(raw, axis=1)))
    np.testing.assert_array_less(err, half_gap[codes] + 1e-6)
    # the core levels span the training sample's band finely; the tails (for tokens added
    # later) are coarser, and almost no token of the build itself falls there
    lo, hi = NORM_TAIL_LEVELS, NORM_TAIL_LEVELS + NORM_CORE_LEVELS
    assert half_gap[lo + 1 : hi - 1].max() < 2e-3
    assert np.mean((codes >= lo) & (codes < hi)) > 0.99


def test_decompress_reconstructs_the_vectors(small_index, small_corpus):
    docs, _ = small_corpus
    s = plaid.Searcher(small_index)
    flat = np.concatenate(docs)
    pos = np.arange(0, len(flat), 7)
    dec = s.decompress(pos)
    assert dec.dtype == np.float32 and dec.shape == (len(pos), flat.shape[1])
    # the corpus is unit-norm, so the index renormalises: decoded vectors are unit-norm too, up
    # to the float16 rounding of the stored norms (relative 2**-11)
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1.0, atol=2.0**-11 + 1e-6)
    assert np.abs(np.linalg.norm(dec, axis=1) - 1).mean() < 2e-4
    cos = np.einsum("ij,ij->i", dec, flat[pos])
    assert cos.mean() > 0.9 and cos.min() > 0.5
    # both engines decode identically
    np.testing.assert_allclose(plaid.Searcher(small_index, engine="torch").decompress(pos), dec, atol=1e-6)


def test_stage4_exact_without_normalisation(tmp_path, mini_corpus):
    """Non-unit input: the index does not renormalise, stage 4 still scores exactly what decompress returns."""
    docs, queries = mini_corpus
    rng = np.random.default_rng(0)
    scaled = [d * rng.uniform(0.5, 2.0, size=(len(d), 1)).astype(np.float32) for d in docs]
    index = plaid.Indexer(**SMALL_INDEXER).build(tmp_path / "u", scaled)
    assert index.manifest["normalized"] is False
    assert not any(n.endswith("_norms") for n in index.manifest["arrays"])
    for engine, precision in (("numpy", "float32"), ("numpy", "bfloat16"), ("torch", "float32")):
        s = plaid.Searcher(index, engine=engine, centroid_precision=precision)
        assert_stage4_exact(s, doc_offsets(scaled), queries, s.search(queries, k=5))


def test_vectors_beyond_the_float16_range(tmp_path, mini_corpus, small_index):
    """int8 centroids with a float32 scale per row hold any finite range (regression: inf centroids
    when they were float16)."""
    docs, _ = mini_corpus
    big = [d * 1e6 for d in docs]
    index = plaid.Indexer(**SMALL_INDEXER).build(tmp_path / "big", big)
    assert index.manifest["arrays"]["centroids"]["dtype"] == "|i1"
    assert plaid.Index(small_index).manifest["arrays"]["centroids"]["dtype"] == "|i1"
    s = plaid.Searcher(index)
    res = s.search(big[:20], k=3)
    assert np.isfinite(res.scores).all() and (res.ids >= 0).all()
    assert np.mean(res.ids[:, 0] == np.arange(20)) >= 0.8  # a document finds itself
    assert_stage4_exact(s, doc_offsets(big), big[:20], res, atol=0, rtol=1e-4)


# -- query forms ---------------------------------------------------------------------------------------
def test_query_forms_give_the_same_results(small_index, small_corpus):
    _, queries = small_corpus
    s = plaid.Searcher(small_index)
    batch = s.search(queries, k=10)  # list with different lengths
    assert batch.ids.shape == (len(queries), 10) and batch.ids.dtype == np.int64
    assert batch.scores.shape == (len(queries), 10) and batch.scores.dtype == np.float32
    assert len({len(q) for q in queries}) > 1
    for i in (0, 5, len(queries) - 1):
        single = s.search(queries[i], k=10)  # one 2-D array
        assert single.ids.shape == (1, 10)
        np.testing.assert_array_equal(single.ids[0], batch.ids[i])
        np.testing.assert_array_equal(single.scores[0], batch.scores[i])
        tq = s.search(torch.from_numpy(queries[i]), k=10)
        np.testing.assert_array_equal(tq.ids, single.ids)
        np.testing.assert_array_equal(tq.scores, single.scores)
    # 3-D: same-length queries stacked
    m = min(len(q) for q in queries)
    stacked = np.stack([q[:m] for q in queries])
    res3 = s.search(stacked, k=10)
    res_list = s.search([q[:m] for q in queries], k=10)
    np.testing.assert_array_equal(res3.ids, res_list.ids)
    np.testing.assert_array_equal(res3.scores, res_list.scores)
    # float16 / float64 queries are searched as their float32 values
    q16 = queries[3].astype(np.float16)
    np.testing.assert_array_equal(s.search(q16, k=10).ids, s.search(q16.astype(np.float32), k=10).ids)
    np.testing.assert_array_equal(s.search(queries[3].astype(np.float64), k=10).ids, batch.ids[3:4])
    # Results unpacks as (ids, scores)
    ids, scores = batch
    assert ids is batch.ids and scores is batch.scores and len(batch) == len(queries)


def test_finds_the_exact_best_document(small_index, small_corpus):
    docs, queries = small_corpus
    res = plaid.Searcher(small_index).search(queries, k=10)
    exact = plaid.maxsim(queries, docs)
    assert np.mean(res.ids[:, 0] == exact.argmax(1)) >= 0.9


def test_batch_size_does_not_change_results(small_index, small_corpus):
    _, queries = small_corpus
    ref = plaid.Searcher(small_index).search(queries, k=10)
    for engine in ("numpy", "torch"):
        res = plaid.Searcher(small_index, engine=engine, batch_size=3, centroid_precision="float32").search(queries, k=10)
        ref_e = plaid.Searcher(small_index, engine=engine, batch_size=64, centroid_precision="float32").search(queries, k=10)
        np.testing.assert_array_equal(res.ids, ref_e.ids)
        # the torch engine multiplies padded batches: the same sums, rounded in another order
        np.testing.assert_allclose(res.scores, ref_e.scores, rtol=0, atol=1e-5)
    assert ref.ids.shape == (len(queries), 10)


def test_load_all_gives_the_same_results(small_index, small_corpus):
    _, queries = small_corpus
    a = plaid.Searcher(small_index).search(queries, k=10)
    b = plaid.Searcher(small_index, load_all=True).search(queries, k=10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_search_params_are_used(small_index, small_corpus, monkeypatch):
    """Overrides reach the stages: ncells is what stage 1 probes first, ndocs bounds stages 2-3."""
    from plaid.search import pipeline

    docs, queries = small_corpus
    s = plaid.Searcher(small_index)
    # watched through the pipeline's stages in Python (the CPU engine's compiled query makes the
    # same decisions: tests/test_pipeline.py::test_compiled_query_equals_the_stages)
    s._state.engine.query_arrays = None
    seen = []
    real = pipeline.CellCuts.cells
    monkeypatch.setattr(pipeline.CellCuts, "cells", lambda self, nc: seen.append(nc) or real(self, nc))
    s.search(queries[:1], k=10)
    assert seen[0] == 2  # the default for k <= 10
    seen.clear()
    s.search(queries[:1], k=10, ncells=7, ndocs=10_000)
    assert seen[0] == 7 and seen[-1] >= 7  # a minimum: widened while fewer than ndocs candidates
    seen.clear()
    s.search(queries[:1], k=1, ncells=5, ndocs=1)
    assert seen == [5]  # enough candidates at once
    res = s.search(queries, k=10, ndocs=10, trace=True)  # stage 3 keeps max(ndocs // 4, k) = 10 documents
    assert all(len(t.stage3) <= 10 and len(t.stage2) <= 10 for t in res.traces)
    wide = s.search(queries, k=10, ndocs=4096, trace=True)
    assert any(len(t.stage3) > 10 for t in wide.traces)
    assert plaid.default_search_params(10) == {"ncells": 2, "centroid_score_threshold": 0.5, "ndocs": 256}
    assert plaid.default_search_params(100)["ndocs"] == 1024
    assert plaid.default_search_params(1000)["ndocs"] == 4096


# -- k beyond the corpus --------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_k_larger_than_the_corpus_is_capped_at_the_corpus(small_index, small_corpus, engine):
    """k above the number of documents gives num_documents columns (see also
    test_search_fallback.py: k=10**13 allocates nothing for it). A k that reaches the corpus
    makes stage 1 probe until every document is a candidate: all of them come back (the padding
    of empty documents: test_empty_documents_are_never_returned)."""
    docs, queries = small_corpus
    s = plaid.Searcher(small_index, engine=engine)
    C = plaid.Index(small_index).num_centroids
    k = len(docs) + 50
    res = s.search(queries[:4], k=k, ncells=C)  # every cell probed: every document is a candidate
    assert res.ids.shape == res.scores.shape == (4, len(docs))
    for i in range(4):
        assert sorted(res.ids[i].tolist()) == list(range(len(docs)))  # each document once
        assert np.all(np.isfinite(res.scores[i])) and np.all(np.diff(res.scores[i]) <= 0)
    # the default parameters of the capped k (600: ndocs 4096 at depth 1) reach every document too
    res = s.search(queries[:2], k=k)
    assert res.ids.shape == (2, len(docs)) and (res.ids >= 0).all()
    res = s.search(queries[:2], k=k, ncells=1)  # even from one cell
    assert (res.ids >= 0).all()
    with pytest.raises(plaid.InvalidInputError, match=r"ndocs \(24\) must be at least k \(650\)"):
        s.search(queries[:2], k=k, ncells=1, ndocs=24)  # refused whatever the corpus size


# -- empty documents -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_with_empty_docs(tmp_path_factory, mini_corpus):
    docs, _ = mini_corpus
    dim = docs[0].shape[1]
    docs = list(docs)
    empty = [0, 3, 50, len(docs) - 1]
    for i in empty:
        docs[i] = np.zeros((0, dim), np.float32)
    docs[50] = np.zeros((0,), np.float32)  # a 1-D empty array is an empty document too
    path = str(tmp_path_factory.mktemp("idx") / "empties")
    with pytest.warns(UserWarning, match=r"4 empty document\(s\) \(ids 0, 3, 50, 119\)") as rec:
        index = plaid.Indexer(**SMALL_INDEXER).build(path, docs, doc_ids=[f"e{i}" for i in range(len(docs))])
    assert any("never returned" in str(w.message) for w in rec)
    return index, docs, empty


def test_empty_documents_keep_their_ids(index_with_empty_docs):
    index, docs, empty = index_with_empty_docs
    assert index.num_documents == len(docs)
    assert index.manifest["num_empty_documents"] == len(empty)
    assert index.num_tokens == sum(len(d) for d in docs)
    assert index.doc_ids[3] == "e3" and index.doc_ids[4] == "e4" and len(index.doc_ids) == len(docs)
    s = plaid.Searcher(index)
    # a query made of document 4's own tokens finds document 4 (ids are not shifted by empty docs)
    for j in (1, 4, 51, len(docs) - 2):
        res = s.search(docs[j], k=3)
        assert res.ids[0, 0] == j
        assert res.doc_ids()[0][0] == f"e{j}"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_empty_documents_are_never_returned(index_with_empty_docs, mini_corpus, engine):
    index, docs, empty = index_with_empty_docs
    _, queries = mini_corpus
    s = plaid.Searcher(index, engine=engine)
    k = len(docs) + 10
    res = s.search(queries + [d for d in docs if len(d)][:5], k=k, ncells=index.num_centroids)
    assert res.ids.shape == (len(queries) + 5, len(docs))  # k capped at the number of documents
    for row, scores in zip(res.ids, res.scores):
        returned = row[row >= 0]
        assert not set(empty) & set(returned.tolist())
        assert len(returned) == len(docs) - len(empty)  # every non-empty one is
        hits = len(returned)  # then one column of padding per empty document
        assert (row[:hits] >= 0).all() and (row[hits:] == -1).all() and np.isneginf(scores[hits:]).all()


# -- engines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision,k", [
    ("float32", 1), ("float32", 10), ("float32", 100), ("bfloat16", 1),
    ("bfloat16", 10),
    ("bfloat16", 100),
])
def test_torch_engine_matches_numpy_engine(small_index, small_corpus, precision, k):
    _, queries = small_corpus
    a = plaid.Searcher(small_index, engine="numpy", centroid_precision=precision).search(queries, k=k)
    b = plaid.Searcher(small_index, engine="torch", centroid_precision=precision).search(queries, k=k)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def test_stage1_keeps_every_cell_tied_at_the_cut():
    """The probed cells are every centroid at or above the ncells-th best score of some token:
    ties at the cut are all kept, so the result does not depend on a sort order (one policy,
    both engines)."""
    from plaid.search.pipeline import CellCuts

    # one query token; centroids 1, 2, 3, 4 and 6 tie for the best score
    R = np.array([[0.1, 0.5, 0.5, 0.5, 0.5, 0.2, 0.5, 0.0]], np.float32)
    for ncells in (1, 2, 3, 4, 5, 6, 7, 8, 20):
        got = CellCuts(R).cells(ncells).tolist()
        expected = [1, 2, 3, 4, 6] if ncells <= 5 else {6: [1, 2, 3, 4, 5, 6], 7: list(range(7))}.get(ncells, list(range(8)))
        assert got == expected, ncells


def test_top_n_keeps_the_lower_index_first_on_ties():
    from plaid.search.pipeline import top_n

    scores = np.array([0.0, 1.0, 0.5, 1.0, 1.0, 0.25, 1.0], np.float32)
    for n in (1, 2, 3, 5, 7, 9):
        got = top_n(scores, n)
        np.testing.assert_array_equal(got[: min(n, 4)], [1, 3, 4, 6][: min(n, 4)])
        np.testing.assert_array_equal(got, np.argsort(-scores, kind="stable")[:n])


@pytest.fixture(scope="module")
def duplicated_index(tmp_path_factory, mini_corpus):
    """Each of 40 documents four times in a row: copies get identical codes, hence tied scores."""
    docs, queries = mini_corpus
    dup = [docs[i // 4] for i in range(160)]
    path = str(tmp_path_factory.mktemp("idx") / "dup")
    plaid.Indexer(**SMALL_INDEXER).build(path, dup)
    return path, dup


def test_duplicate_documents_tie_and_come_lowest_id_first(duplicated_index, mini_corpus):
    """numpy engine: copies of a document score the same and come together, lowest id first."""
    path, dup = duplicated_index
    _, queries = mini_corpus
    res = plaid.Searcher(path, centroid_precision="float32").search(queries, k=12)
    for ids, scores in zip(res.ids, res.scores):
        groups = ids // 4
        for j in range(12):
            if j == 0 or groups[j] != groups[j - 1]:
                assert ids[j] % 4 == 0, ids  # a run of copies starts with the lowest id
                assert groups[j] not in groups[:j], ids  # and is not split
            else:
                assert ids[j] == ids[j - 1] + 1 and scores[j] == scores[j - 1], (ids, scores)


@pytest.mark.parametrize("k", [10, 12])
def test_torch_engine_matches_numpy_engine_on_tied_documents(duplicated_index, mini_corpus, k):
    path, _ = duplicated_index
    _, queries = mini_corpus
    a = plaid.Searcher(path, engine="numpy", centroid_precision="float32").search(queries, k=k)
    b = plaid.Searcher(path, engine="torch", centroid_precision="float32").search(queries, k=k)
    np.testing.assert_array_equal(a.ids, b.ids)




@pytest.mark.parametrize("engine", [
    "numpy", "torch"])
def test_ndocs_below_k_is_refused_and_ndocs_equal_to_k_returns_k_hits(small_index, small_corpus, engine):
    _, queries = small_corpus
    s = plaid.Searcher(small_index, engine=engine, centroid_precision="float32")
    with pytest.raises(plaid.InvalidInputError, match=r"ndocs \(20\) must be at least k \(50\)"):
        s.search(queries[:5], k=50, ndocs=20)
    res = s.search(queries[:5], k=50, ndocs=50)
    assert np.all((res.ids >= 0).sum(1) == 50)


def test_engine_selection(small_index):
    assert plaid.Searcher(small_index).engine == "numpy"
    assert plaid.Searcher(small_index, engine="torch").engine == "torch"
    with pytest.raises(plaid.InvalidInputError, match="engine"):
        plaid.Searcher(small_index, engine="jax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu(small_index, small_corpus):
    docs, queries = small_corpus
    g = plaid.Searcher(small_index, device="cuda")
    assert g.engine == "torch"
    res = g.search(queries, k=10)
    cpu = plaid.Searcher(small_index, engine="torch", centroid_precision="float32").search(queries, k=10)
    np.testing.assert_array_equal(res.ids, cpu.ids)
    np.testing.assert_allclose(res.scores, cpu.scores, rtol=0, atol=1e-4)
    assert_stage4_exact(g, doc_offsets(docs), queries, res)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_an_input_error(small_index):
    with pytest.raises(plaid.InvalidInputError, match="CUDA"):
        plaid.Searcher(small_index, device="cuda")


def test_numpy_engine_is_cpu_only(small_index):
    with pytest.raises(plaid.InvalidInputError, match="CPU"):
        plaid.Searcher(small_index, device="meta", engine="numpy")


# -- tiny corpora ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["pq", "scalar"])
@pytest.mark.parametrize("n_docs", [1, 3])
def test_tiny_corpora_build_and_search(tmp_path, codec, n_docs):
    rng = np.random.default_rng(n_docs)
    docs = [rng.normal(size=(n, 32)).astype(np.float32) for n in (4, 1, 9)[:n_docs]]
    docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "num_centroids exceeds the tokens" and the like are fine here
        index = plaid.Indexer(show_progress=False, codec=codec, pq_m=16).build(tmp_path / "t", docs)
    assert index.num_documents == n_docs and index.num_tokens == sum(len(d) for d in docs)
    exact = plaid.maxsim(docs[0], docs)
    for engine in ("numpy", "torch"):
        s = plaid.Searcher(index, engine=engine)
        res = s.search([docs[0], docs[-1][:1]], k=10)
        assert res.ids.shape == (2, n_docs)  # k=10 is capped at the corpus
        for row in res.ids:
            assert sorted(row.tolist()) == list(range(n_docs))
        assert np.all(np.isfinite(res.scores))
        assert res.ids[0, 0] == int(np.argmax(exact))
        assert_stage4_exact(s, doc_offsets(docs), [docs[0], docs[-1][:1]], res)


@pytest.mark.parametrize("scale", [1.0, 1e6])
@pytest.mark.parametrize("threshold", [0.2, 0.45, 0.6])
def test_both_sides_of_stage2_give_the_same_scores(small_index, small_corpus, threshold, scale, monkeypatch):
    """Stage 2 reads the surviving centroids' inverted lists or the candidates' centroids,
    whichever is shorter: the two give bit-identical pruned scores, as do the two ways of
    deduplicating stage 1's candidates (sort, flag scan)."""
    from plaid.search import engine_cpu, stages
    from plaid.search.pipeline import QueryScores, surviving

    _, queries = small_corpus
    s = plaid.Searcher(small_index, centroid_precision="float32")
    st = s._state.engine
    N = st.num_documents
    for q in queries[:6]:
        # scale 1e6: scores far below PRUNED_SCORE (a non-normalised index of large vectors)
        R = st.centroid_scores(q) * np.float32(scale)
        threshold_s = threshold * scale
        S = QueryScores(R)
        cells = S.cuts.cells(3)
        docs = st.candidates(S, cells)
        monkeypatch.setattr(engine_cpu, "FLAG_SCAN_RATIO", 0)  # the sort instead of the flag scan
        np.testing.assert_array_equal(docs, st.candidates(S, cells))
        monkeypatch.setattr(engine_cpu, "FLAG_SCAN_RATIO", 1 << 40)  # the flag scan
        np.testing.assert_array_equal(docs, st.candidates(S, cells))
        monkeypatch.undo()
        assert not st._scratch.marks(N).any()
        Re = stages.centroid_table(R)
        keep = surviving(R, threshold_s)
        offs, dc = stages.document_cells(docs, st.dcells, st.dcell_offsets)
        doc_side = stages.approximate_maxsim(Re, stages.pruned_cells(dc, keep), offs)
        slot = np.full(N, -1, np.int32)
        ivf_side = stages.pruned_maxsim(keep, Re, docs, st.ivf, st.ivf_offsets, np.diff(offs), slot)
        np.testing.assert_array_equal(ivf_side, doc_side)
        assert (slot == -1).all()
        # and both are the definition: per query token, the best surviving centroid of the document
        d = int(docs[len(docs) // 2])
        own = st.dcells[st.dcell_offsets[d]:st.dcell_offsets[d + 1]]
        np.testing.assert_array_equal(own, np.unique(st.codes.take(np.arange(st.doc_offsets[d], st.doc_offsets[d + 1]))))
        sc = np.where(keep[own][None, :], R[:, own], stages.PRUNED_SCORE).max(1).sum()
        assert ivf_side[len(docs) // 2] == pytest.approx(sc, rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_engines_agree_through_every_stage(small_index, small_corpus, threshold):
    """A small ndocs makes every query run stages 2 and 3; threshold 0.1 keeps so many centroids
    that stage 2 reads the candidates' side, 0.5 reads the inverted lists: both engines agree."""
    _, queries = small_corpus
    kw = dict(k=5, ncells=2, centroid_score_threshold=threshold, ndocs=24)
    a = plaid.Searcher(small_index, engine="numpy", centroid_precision="float32").search(queries, **kw)
    b = plaid.Searcher(small_index, engine="torch", centroid_precision="float32").search(queries, **kw)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)

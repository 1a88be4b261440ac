"""One pipeline: the new search returns exactly what the pipeline it replaced returned, on both
engines, and the engines agree stage by stage.

The replaced numpy engine is kept, frozen, in ``tests/reference_search.py`` (with its stage
functions in ``tests/reference_stages.py``); both run on the same index in the same session, so
the comparison does not depend on the machine that built the index.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import plaid
import plaid.search.kernels_cpu
from conftest import SMALL_INDEXER, requires_msmarco, synthetic_corpus, synthetic_queries
from reference_search import RefIndex, reference_search

#: benchmarks/run.py's sweep at k=10 (ncells, threshold, ndocs), plus the defaults at k=10 and k=100
GRID = [(1, 0.5, 256), (2, 0.5, 256), (2, 0.45, 1024), (4, 0.4, 1024), (4, 0.4, 4096), (8, 0.3, 8192)]


def _params(k, setting, depth=1):
    if setting is None:
        d = plaid.default_search_params(k, depth)
        return d["ncells"], d["centroid_score_threshold"], d["ndocs"]
    return setting


def _compare(path, queries, k, setting, engine, subsets=None):
    nc, th, nd = _params(k, setting, plaid.Index(path).search_depth)
    s = plaid.Searcher(path, engine=engine, centroid_precision="float32")
    res = s.search(queries, k=k, ncells=nc, centroid_score_threshold=th, ndocs=max(nd, k), subset=subsets)
    ids, scores = reference_search(RefIndex(path), [np.asarray(q, np.float32) for q in queries], res.ids.shape[1],
                                   nc, th, max(nd, k), subsets=None if subsets is None else s._subsets(
                                       s._state, subsets, len(queries)))
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.scores, scores, rtol=0, atol=1e-5)
    return res


@pytest.mark.msmarco
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("k,setting", [(10, s) for s in GRID] + [(100, s) for s in GRID if s[2] >= 100]
                         + [(10, None), (100, None)])
def test_same_results_as_the_replaced_pipeline_on_msmarco(msmarco, msmarco_default, engine, k, setting):
    queries = [np.asarray(q, np.float32) for q in msmarco.queries]
    _compare(msmarco_default, queries, k, setting, engine)


@pytest.fixture(scope="module")
def living(tmp_path_factory, small_corpus):
    """Three segments (build + two adds), 40 documents deleted."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("pipeline") / "living")
    idx = plaid.Indexer(**SMALL_INDEXER).build(path, docs[:400], doc_ids=[f"d{i}" for i in range(400)])
    idx.add(docs[400:500], doc_ids=[f"d{i}" for i in range(400, 500)], show_progress=False)
    idx.add(docs[500:], doc_ids=[f"d{i}" for i in range(500, len(docs))], show_progress=False)
    idx.delete(list(range(0, 400, 10)))
    return path


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("setting", [(1, 0.5, 16), (2, 0.45, 64), (4, 0.4, 300), None])
def test_same_results_with_segments_tombstones_and_subsets(living, small_corpus, engine, setting):
    _, queries = small_corpus
    _compare(living, queries, 10, setting, engine)
    rng = np.random.default_rng(0)
    big = sorted(rng.choice(600, 400, replace=False).tolist())
    small = [f"d{i}" for i in range(5, 600, 40)]
    for subset in (big, small, [big if i % 2 else small for i in range(len(queries))]):
        _compare(living, queries, 10, setting, engine, subsets=subset)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
def test_engines_agree_stage_by_stage(living, small_corpus, threshold):
    """Candidates, stage-2 and stage-3 survivors, the fallback's threshold and the final scores."""
    _, queries = small_corpus
    kw = dict(k=5, ncells=2, centroid_score_threshold=threshold, ndocs=24, trace=True)
    a = plaid.Searcher(living, engine="numpy", centroid_precision="float32").search(queries, **kw)
    b = plaid.Searcher(living, engine="torch", centroid_precision="float32").search(queries, **kw)
    ran = 0
    for ta, tb in zip(a.traces, b.traces):
        for name in ("candidates", "stage2", "stage3"):
            np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
        assert ta.threshold == tb.threshold and ta.ncells == tb.ncells
        ran += len(ta.candidates) > len(ta.stage2) > len(ta.stage3)
    assert ran > 0  # stages 2 and 3 really narrowed
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


# -- the CPU engine's compiled query (stages 1-4 in one call) against the pipeline's stages ------------
#: settings that exercise each branch: no stage 2 (few candidates), the inverted-file and the
#: document side of stage 2, the pruning fallback (a threshold nothing reaches), ncells above the
#: kernel's sorted buffer (np.partition), widening, k above ndocs // 4
COMPILED_GRID = [(10, 1, 0.5, 256), (10, 2, 0.45, 1024), (10, 2, 0.9, 24), (10, 2, 0.0, 24), (10, 2, -1.0, 16),
                 (5, 70, 0.5, 40), (10, 1, 0.3, 10), (100, 4, 0.4, 100)]


def _staged_and_compiled(path, queries, settings, **searcher_kw):
    """The compiled query (one call per query, with traces), the pipeline's stages, and groups of
    queries in one compiled call (no traces: the whole batch on one thread, parts of 4 queries on
    two; one query per call on two threads, stage 2 split) return the same ids and scores, bit for
    bit, and the same candidates at every stage."""
    s = plaid.Searcher(path, engine="numpy", centroid_precision="float32", **searcher_kw)
    grouped = {t: plaid.Searcher(path, engine="numpy", centroid_precision="float32", num_threads=t, **searcher_kw)
               for t in (1, 2)}
    eng = s._state.engine
    arrays = eng.query_arrays
    assert arrays is not None or len(eng.codes.parts) > 1
    for k, nc, th, nd in settings:
        kw = dict(k=k, ncells=nc, centroid_score_threshold=th, ndocs=max(nd, k), trace=True)
        eng.query_arrays = arrays
        a = s.search(queries, **kw)
        eng.query_arrays = None  # the pipeline's stages on the same engine's kernels
        b = s.search(queries, **kw)
        eng.query_arrays = arrays
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        for g in grouped.values():
            c = g.search(queries, **dict(kw, trace=False))
            np.testing.assert_array_equal(a.ids, c.ids)
            np.testing.assert_array_equal(a.scores, c.scores)
        for ta, tb in zip(a.traces, b.traces):
            for name in ("candidates", "stage2", "stage3"):
                np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
            assert ta.threshold == tb.threshold and ta.ncells == tb.ncells
            assert set(ta.timings) == set(tb.timings)
        if arrays is not None:
            _single_queries_split(grouped[2], queries, kw, a)
    return s


def _single_queries_split(s, queries, kw, expected):
    """One query per call on two threads, stage 2's inverted lists and stage 4's candidates scored
    in two parts whatever their size: the same ids, scores and trace as the one-call path
    (``expected``)."""
    K = plaid.search.kernels_cpu
    names = ("SPLIT_MIN_ENTRIES", "SPLIT_MIN_DOCS", "SPLIT_MIN_INDEX_ENTRIES", "SPLIT_MERGE_RATIO")
    split, saved = K._split_stage2, [getattr(K, n) for n in names]
    used = []

    def counting(*args, **kw2):
        r = split(*args, **kw2)
        used.append(r is not None and r[2] is not None and r[2].shape[0] == 2)
        return r

    K._split_stage2 = counting
    for n, v in zip(names, (0, 1, 0, 0)):
        setattr(K, n, v)
    try:
        for i, q in enumerate(queries):
            r = s.search([q], **kw)
            np.testing.assert_array_equal(r.ids[0], expected.ids[i])
            np.testing.assert_array_equal(r.scores[0], expected.scores[i])
            t, e = r.traces[0], expected.traces[i]
            for name in ("candidates", "stage2", "stage3"):
                np.testing.assert_array_equal(getattr(t, name), getattr(e, name), err_msg=name)
            assert t.threshold == e.threshold and t.ncells == e.ncells
    finally:
        K._split_stage2 = split
        for n, v in zip(names, saved):
            setattr(K, n, v)
    assert len(used) == len(queries)
    SPLIT_USED.extend(used)


#: Whether each single query of _single_queries_split scored stage 2 in two parts (tests assert some did)
SPLIT_USED: list = []


def test_parts_not_started_run_on_the_caller_and_the_first_error_is_raised():
    """A single query's parts: those the pool (busy with another search) has not started when the
    caller's part ends run on the caller, not after the other search; an error reaches the caller
    once every part has ended."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    K = plaid.search.kernels_cpu
    with ThreadPoolExecutor(1) as pool:
        gate = threading.Event()
        busy = pool.submit(gate.wait, 30)  # the only worker, taken by another search
        me = threading.get_ident()
        assert K.in_parts(pool, lambda p: (p, threading.get_ident()), 3) == [(0, me), (1, me), (2, me)]
        gate.set()
        busy.result()
        ended = []

        def failing(p):
            if p == 0:
                raise ValueError("part 0 failed")
            ended.append(p)
            return p

        with pytest.raises(ValueError, match="part 0 failed"):
            K.in_parts(pool, failing, 2)
        assert ended in ([], [1])  # part 1 ran to its end on the worker, or was never started


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_closing_a_searcher_while_it_searches_on_threads(small_index, small_corpus, monkeypatch):
    """close() while other threads search single queries split over the pool (product, stage 2,
    stage 4): every search finishes with the one-thread results, no error, the compiled kernels
    stay in use, and a closed Searcher searches on one thread."""
    import threading

    from plaid.search import engine_cpu

    K = plaid.search.kernels_cpu
    for name, value in (("SPLIT_MIN_INDEX_ENTRIES", 0), ("SPLIT_MIN_ENTRIES", 0), ("SPLIT_MERGE_RATIO", 0),
                        ("SPLIT_MIN_DOCS", 1)):
        monkeypatch.setattr(K, name, value)
    monkeypatch.setattr(engine_cpu, "MIN_SPLIT_MACS", 1)
    _, queries = small_corpus
    want = plaid.Searcher(small_index, num_threads=1).search(queries, k=10).ids
    s = plaid.Searcher(small_index, num_threads=2)
    errors, wrong = [], []
    started = threading.Barrier(4)

    def searching(offset):
        try:
            for r in range(4):
                for i in range(offset, len(queries), 3):
                    if not np.array_equal(s.search(queries[i], k=10).ids[0], want[i]):
                        wrong.append(i)
                    if r == 0 and i == offset:
                        started.wait(30)  # every thread is searching on the pool: close it now
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=searching, args=(o,)) for o in range(3)]
    for w in workers:
        w.start()
    started.wait(30)
    s.close()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers) and errors == [] and wrong == []
    assert K.backend() == "numba" and s._pool(2) is None  # closed: one thread from now on


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_a_corrupt_token_is_refused_alike_by_a_split_query(tmp_path, small_index, small_corpus, monkeypatch):
    """Stage 4 in parts on two threads meets an out-of-range centroid id as the one call does: an
    IndexCorruptError naming the index files, and the next search of a healthy index is right."""
    import shutil

    K = plaid.search.kernels_cpu
    monkeypatch.setattr(K, "SPLIT_MIN_DOCS", 1)
    monkeypatch.setattr(K, "SPLIT_MIN_INDEX_ENTRIES", 0)
    monkeypatch.setattr(K, "SPLIT_MIN_ENTRIES", 0)  # stage 4 is split after a split stage 2
    monkeypatch.setattr(K, "SPLIT_MERGE_RATIO", 0)
    _, queries = small_corpus
    path = str(tmp_path / "bad")
    shutil.copytree(small_index, path)
    codes_file = plaid.Index(path).manifest["arrays"]["seg0_codes"]["file"]
    codes = np.load(os.path.join(path, codes_file), mmap_mode="r+")
    codes[:] = 65535  # past the centroids
    codes.flush()
    del codes
    runs = []
    stage4 = K._nb.stage4
    monkeypatch.setattr(K._nb, "stage4", lambda *a: runs.append(len(a[-3])) or stage4(*a))  # the parts' calls
    messages = []
    for threads in (1, 2):
        with pytest.raises(plaid.IndexCorruptError, match="stage 4: token") as e:
            plaid.Searcher(path, num_threads=threads).search(queries[0], k=10, ndocs=32)
        assert codes_file in str(e.value)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    # stage 4's 10 candidates (n3 = k) in two parts, then once more in one call for the one call's error
    assert len(runs) == 3 and sum(runs[:2]) == 10 and min(runs[:2]) > 0 and runs[2] == 10, runs
    good = plaid.Searcher(small_index, num_threads=2)
    np.testing.assert_array_equal(good.search(queries[0], k=10).ids,
                                  plaid.Searcher(small_index, num_threads=1).search(queries[0], k=10).ids)


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_compiled_query_equals_the_stages(small_index, small_scalar_index, small_corpus, tmp_path):
    _, queries = small_corpus
    SPLIT_USED.clear()
    _staged_and_compiled(small_index, queries, COMPILED_GRID)
    assert sum(SPLIT_USED) >= 10, SPLIT_USED  # the split path ran (the others did not reach stage 2's lists)
    _staged_and_compiled(small_scalar_index, queries, COMPILED_GRID[:4])
    # deleted documents (one segment: the compiled query skips them like the pipeline)
    import shutil
    path = str(tmp_path / "deleted")
    shutil.copytree(small_index, path)
    plaid.Index(path).delete(list(range(0, 600, 3)))
    _staged_and_compiled(path, queries, COMPILED_GRID)


def test_stage4_takes_its_centroid_terms_from_stage1_scores(small_index, small_scalar_index, small_corpus):
    """Stage 4's centroid terms are stage 1's float32 scores times a gain per centroid (the int8
    row's scale over its factor): equal to the raw centroids' float32 products within float32
    rounding, so the search's scores equal stage 4 from the raw products within 1e-5, and every
    path that has R gives the compiled query's bits. bfloat16 scores are never used for it."""
    from plaid.search.pipeline import centroid_gain

    _, queries = small_corpus
    for path in (small_index, small_scalar_index):
        s = plaid.Searcher(path, centroid_precision="float32")
        e = s._state.engine
        assert e.centroid_gain is not None and e.centroid_gain.dtype == np.float32
        for q in queries[:8]:
            q = np.asarray(q, np.float32)
            R = e.centroid_scores(q)
            raw = q @ e.centroids.T
            assert np.abs(R * e.centroid_gain - raw).max() <= 2e-6 * max(1.0, float(np.abs(raw).max()))
            res = s.search(q, k=10)
            docs = np.sort(res.ids[0][res.ids[0] >= 0])
            got = dict(zip(res.ids[0].tolist(), res.scores[0].tolist()))
            with_r = e.exact_scores(q, docs, R)
            assert [got[d] for d in docs.tolist()] == with_r.tolist()  # the same bits as the one call
            # ... which are the byte-table kernel's over R[:, u] * gain[u] computed by numpy
            K = plaid.search.kernels_cpu
            codes, resid = e.codes.parts[0], e.residuals.parts[0]
            norms = e.norms.parts[0] if e.norms is not None else None
            u, slot = K.used_centroids(codes, e.doc_offsets, docs, e.num_centroids)
            want = K.exact_maxsim_ranges(e.codec.score_table(q).numpy(), K.gained_terms(R, e.centroid_gain, u), slot,
                                         codes, resid, norms, e.doc_offsets, docs, e.norm_values)
            assert want.tolist() == with_r.tolist()
            np.testing.assert_allclose(e.exact_scores(q, docs), with_r, rtol=0, atol=1e-5)  # raw products
        assert plaid.Searcher(path, centroid_precision="bfloat16")._state.engine.centroid_gain is None
    # the gain: scale * |row| for unit-vector indexes, 1 otherwise, a zero row 0; None for
    # centroids that are not exactly int8 rows times a scale (float16 or float32 storage)
    rows = np.array([[127, 0, -3], [0, 0, 0], [5, -127, 1]], np.int8)
    scales = np.array([0.01, 0.5, 0.002], np.float32)
    c = rows.astype(np.float32) * scales[:, None]
    g = centroid_gain(c, normalized=True)
    np.testing.assert_allclose(g, scales * np.linalg.norm(rows.astype(np.float64), axis=1), rtol=1e-7)
    assert g[1] == 0 and (centroid_gain(c, normalized=False) == 1).all()
    assert centroid_gain(c + np.float32(1e-4), normalized=True) is None
    # a finite centroid whose gain (scale * |row|, |row| up to 127 * sqrt(dim)) overflows float32
    huge = np.full((1, 128), 127, np.int8).astype(np.float32) * np.float32(np.finfo(np.float32).max / 254)
    assert np.isfinite(huge).all() and centroid_gain(huge, normalized=True) is None


def test_stage4_centroid_terms_from_stage1_on_several_segments(living, small_corpus):
    """A several-segment index (stages run one by one, stage 4 over gathered tokens) takes the same
    centroid terms from R: a subset search, the staged search and exact_scores with R agree."""
    _, queries = small_corpus
    s = plaid.Searcher(living)
    e = s._state.engine
    assert len(e.codes.parts) > 1 and e.centroid_gain is not None and e.query_arrays is None
    for q in queries[:6]:
        q = np.asarray(q, np.float32)
        R = e.centroid_scores(q)
        res = s.search(q, k=10)
        docs = np.sort(res.ids[0][res.ids[0] >= 0])
        got = dict(zip(res.ids[0].tolist(), res.scores[0].tolist()))
        assert [got[d] for d in docs.tolist()] == e.exact_scores(q, docs, R).tolist()
        sub = s.search(q, k=10, subset=docs)  # a small subset: stage 4 over it directly
        assert dict(zip(sub.ids[0].tolist(), sub.scores[0].tolist())) == got
        np.testing.assert_allclose(e.exact_scores(q, docs), e.exact_scores(q, docs, R), rtol=0, atol=1e-5)


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_one_token_queries_score_alike_on_every_path(small_index, small_scalar_index, small_corpus):
    """A one-token query's byte table is one column: numpy computes such a product by another
    BLAS routine (gemv), whose sums round otherwise; every path builds the table through the
    same 8-column product, so the compiled, grouped, staged and subset paths give equal scores."""
    docs, _ = small_corpus
    rng = np.random.default_rng(11)
    picks = [docs[i][rng.integers(len(docs[i]))] for i in rng.choice(len(docs), 40, replace=False)]
    queries = [(p + rng.normal(0, 0.05, p.shape)).astype(np.float32)[None, :] for p in picks]
    for path in (small_scalar_index, small_index):
        s = _staged_and_compiled(path, queries, [(100, 2, 0.45, 1024), (10, 2, 0.5, 256)])
        res = s.search(queries[:5], k=1)
        for q, d, sc in zip(queries[:5], res.ids[:, 0], res.scores[:, 0]):
            assert s.search([q], k=1, subset=[int(d)]).scores[0, 0] == sc


def test_parts_spread_over_the_threads_and_stop_at_an_error(small_index, small_corpus, monkeypatch):
    """Two threads: a batch of 4 queries runs as 4 parts of 1 and 50 as 7 parts of 7 and one of 1 (each
    thread gets at least 4 parts), 200 queries as parts of 8; a part that raises stops the other
    threads after their current part, and the error reaches the caller."""
    _, queries = small_corpus
    s = plaid.Searcher(small_index, num_threads=2)
    eng = s._state.engine
    if not eng.independent_rows:
        pytest.skip("the compiled product is not in use here")
    sizes = []
    search_many = eng.search_many

    def counting(qs, b):
        sizes.append(len(qs))
        return search_many(qs, b)

    monkeypatch.setattr(eng, "search_many", counting)
    s.search(queries[:4], k=10)
    assert sorted(sizes) == [1, 1, 1, 1]
    sizes.clear()
    s.search((queries * 2)[:50], k=10)
    assert sorted(sizes) == [1] + [7] * 7
    sizes.clear()
    many = (queries * 7)[:200]
    s.search(many, k=10)
    assert sorted(sizes) == [8] * 25

    def failing(qs, b):
        sizes.append(len(qs))
        raise plaid.IndexCorruptError("planted")

    sizes.clear()
    monkeypatch.setattr(eng, "search_many", failing)
    with pytest.raises(plaid.IndexCorruptError, match="planted"):
        s.search(many, k=10)
    assert len(sizes) <= 3, f"{len(sizes)} parts ran after the first failed"


@pytest.fixture(scope="module")
def wide_index(tmp_path_factory):
    """70,000 documents of 1-4 tokens (dim 32, 512 centroids) and 20 queries: document ids past 16
    bits, so the CPU engine holds its inverted file in two blocks of 65,536 documents."""
    docs = synthetic_corpus(70_000, dim=32, num_topics=64, seed=5, min_len=1, max_len=4)
    path = str(tmp_path_factory.mktemp("wide") / "wide")
    plaid.Indexer(show_progress=False, pq_m=8, num_centroids=512).build(path, docs)
    return path, synthetic_queries(docs, 20, seed=6)


def test_ids_past_sixteen_bits(wide_index):
    """The 16-bit inverted file in blocks returns what the frozen reference (int32 ids) returns,
    on both engines; the compiled query, the stages and the split single query agree bit for bit;
    documents of the second block are found."""
    path, queries = wide_index
    eng = plaid.Searcher(path, engine="numpy")._state.engine
    assert eng.ivf.dtype == np.uint16 and len(eng.ivf_blocks) == 2 * eng.num_centroids + 1
    for engine in ("numpy", "torch"):
        for k, setting in ((10, (2, 0.5, 256)), (10, (1, 0.45, 64)), (100, None)):
            res = _compare(path, queries, k, setting, engine)
            assert (res.ids >= 1 << 16).any() and ((res.ids >= 0) & (res.ids < 1 << 16)).any()
    if plaid.search.kernels_cpu.backend() == "numba":
        _staged_and_compiled(path, queries, COMPILED_GRID)


@pytest.mark.msmarco
@requires_msmarco
@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_compiled_query_equals_the_stages_on_msmarco(msmarco, msmarco_default):
    queries = [np.asarray(q, np.float32) for q in msmarco.queries]
    _staged_and_compiled(msmarco_default, queries, [(k, *g) for k in (10, 100) for g in GRID if g[2] >= k]
                         + COMPILED_GRID)


_FALLBACK_CHILD = """
import sys, warnings, numpy as np, plaid
warnings.simplefilter("ignore")
from plaid.search import kernels_cpu
assert kernels_cpu.backend() == "numpy"
path, qfile, out = sys.argv[1:4]
qs = list(np.load(qfile, allow_pickle=True))
res = [plaid.Searcher(path, centroid_precision="float32").search(qs, k=k) for k in (1, 10, 100)]
np.savez(out, *[r.ids for r in res], *[r.scores for r in res])
"""


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_numpy_fallback_gives_the_same_results(small_index, small_corpus, tmp_path):
    """PLAID_NO_NUMBA=1 (a fresh process: the backend is chosen once): the pipeline's stages in
    numpy and torch return the compiled query's ids and scores, bit for bit."""
    import os
    import subprocess
    import sys

    _, queries = small_corpus
    qfile, out = str(tmp_path / "q.npy"), str(tmp_path / "out.npz")
    arr = np.empty(len(queries), object)
    arr[:] = [np.asarray(q, np.float32) for q in queries]
    np.save(qfile, arr, allow_pickle=True)
    env = dict(os.environ, PLAID_NO_NUMBA="1")
    r = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD, small_index, qfile, out], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(out)
    s = plaid.Searcher(small_index, centroid_precision="float32")
    for j, k in enumerate((1, 10, 100)):
        want = s.search(queries, k=k)
        np.testing.assert_array_equal(got[f"arr_{j}"], want.ids)
        np.testing.assert_array_equal(got[f"arr_{j + 3}"], want.scores)


def test_reload_follows_a_commit_through_the_pipeline(tmp_path, small_corpus):
    docs, queries = small_corpus
    path = str(tmp_path / "idx")
    idx = plaid.Indexer(**SMALL_INDEXER).build(path, docs[:300])
    s = plaid.Searcher(path, centroid_precision="float32")
    before = s.search(docs[350], k=1)
    idx.add(docs[300:], show_progress=False)
    assert s.search(docs[350], k=1).ids.tolist() == before.ids.tolist()  # the generation it holds
    assert s.reload()
    assert s.search(docs[350], k=1).ids.tolist() == [[350]]
    _compare(path, queries, 10, None, "numpy")


# -- SearchParams ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(ncells=0), "ncells must be a positive integer"),
    (dict(ncells=1.5), "ncells must be a positive integer"),
    (dict(ndocs=5, k=10), r"ndocs \(5\) must be at least k \(10\)"),
    (dict(centroid_score_threshold=float("nan")), "centroid_score_threshold must be a finite number"),
    (dict(centroid_score_threshold="high"), "centroid_score_threshold must be a number"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(k=0), "k must be a positive integer"),
    (dict(k=True), "k must be a positive integer"),
])
def test_search_params_out_of_range_are_refused_naming_the_field(kw, match):
    with pytest.raises(plaid.InvalidInputError, match=match):
        plaid.SearchParams(**kw)


def test_search_params_defaults_budgets_and_use(small_index, small_corpus):
    p = plaid.SearchParams(k=10)
    b = p.budgets(600)
    assert (b.k, b.ncells, b.threshold, b.n2, b.n3, b.small_subset) == (10, 2, 0.5, 256, 64, 256)
    b = plaid.SearchParams(k=10**13).budgets(600)  # capped at the corpus, defaults of the capped k
    assert b.k == 600 and b.n2 == 4096
    with pytest.raises(AttributeError):
        p.k = 5  # frozen
    _, queries = small_corpus
    s = plaid.Searcher(small_index)
    a = s.search(queries, params=plaid.SearchParams(k=7, ncells=3, threads=2))
    b = s.search(queries, k=7, ncells=3)
    np.testing.assert_array_equal(a.ids, b.ids)
    with pytest.raises(plaid.InvalidInputError, match="either params"):
        s.search(queries, k=5, params=p)


def test_presets_record_their_search_depth():
    """The default (balanced) searches 3x PLAID's budgets, accurate 4x, compact 1x; an explicit
    search_depth overrides the preset's."""
    assert plaid.Indexer().search_depth == 3 and plaid.Indexer(preset="balanced").search_depth == 3
    assert plaid.Indexer(preset="compact").search_depth == 1 and plaid.Indexer(preset="accurate").search_depth == 4
    assert plaid.Indexer(search_depth=1).search_depth == 1 and plaid.Indexer(preset="accurate", search_depth=2).search_depth == 2
    assert plaid.default_search_params(10, plaid.Indexer().search_depth)["ndocs"] == 768


def test_search_depth_multiplies_ndocs():
    b = plaid.SearchParams(k=10).budgets(10**6, 1, depth=4)
    assert (b.n2, b.n3, b.small_subset) == (1024, 256, 1024)
    b = plaid.SearchParams(k=100).budgets(10**6, 1, depth=2)
    assert (b.ncells, b.n2, b.n3) == (2, 2048, 512)
    b = plaid.SearchParams(k=10, ndocs=300).budgets(10**6, 1, depth=4)  # an explicit ndocs is used as given
    assert (b.n2, b.n3) == (300, 75)
    for bad in (0, 65, 2.5, True, "2"):
        with pytest.raises(plaid.InvalidInputError, match="search depth must be an integer in"):
            plaid.SearchParams(k=10).budgets(100, 1, depth=bad)


def test_index_search_depth_is_recorded_applied_and_kept(tmp_path, small_index, small_corpus):
    """An index built with search_depth=2 searches as the same index at depth 1 with ndocs=512
    (k=10), and keeps its depth through add()."""
    docs, queries = small_corpus
    path = str(tmp_path / "deep")
    plaid.Indexer(**dict(SMALL_INDEXER, search_depth=2)).build(path, docs, doc_ids=[f"doc-{i}" for i in range(len(docs))])
    assert plaid.Index(path).manifest["search"] == {"depth": 2} and plaid.Index(path).info()["search_depth"] == 2
    assert plaid.Index(small_index).manifest["search"] == {"depth": 1}  # SMALL_INDEXER's
    deep, flat = plaid.Searcher(path), plaid.Searcher(small_index)
    assert (deep.search_depth, flat.search_depth) == (2, 1)
    a = deep.search(queries, k=10, trace=True)
    b = flat.search(queries, k=10, ndocs=512, trace=True)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert any(len(t.stage2) > 256 for t in a.traces)  # deeper than depth 1 for some query
    index = plaid.Index(path)
    index.add(docs[:3], doc_ids=["x0", "x1", "x2"])
    assert plaid.Index(path).manifest["search"] == {"depth": 2}


@pytest.mark.parametrize("split_macs", [None, 1])  # 1: the product split over the threads even for one query
def test_threads_give_the_same_results(small_index, small_corpus, monkeypatch, split_macs):
    from plaid.search import engine_cpu

    if split_macs is not None:
        monkeypatch.setattr(engine_cpu, "MIN_SPLIT_MACS", split_macs)
    _, queries = small_corpus
    one = plaid.Searcher(small_index, num_threads=1).search(queries, k=10)
    two_s = plaid.Searcher(small_index, num_threads=2)
    two = two_s.search(queries, k=10)
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_array_equal(one.scores, two.scores)
    single = [two_s.search([q], k=10) for q in queries[:5]]
    np.testing.assert_array_equal(np.concatenate([r.ids for r in single]), one.ids[:5])
    np.testing.assert_array_equal(np.concatenate([r.scores for r in single]), one.scores[:5])
    with pytest.raises(plaid.InvalidInputError, match="num_threads"):
        plaid.Searcher(small_index, num_threads=0)


@pytest.mark.skipif(plaid.search.kernels_cpu.backend() != "numba", reason="numba is not importable here")
def test_a_one_thread_search_keeps_to_one_core(small_index, small_corpus):
    """num_threads=1 means one core: no other thread of the process works during the search (a
    BLAS product on the query path once ran on OpenBLAS's threads, which spin after it: a
    one-thread search used two cores, and two search threads lost a core to them). Measured as
    the CPU time of the process's other threads over the call's wall time (best of three, as
    another test's leftover thread may wake meanwhile)."""
    import resource
    import time

    _, queries = small_corpus
    qs = queries * 8  # 240 queries: products of a few hundred rows, where OpenBLAS uses its threads
    s = plaid.Searcher(small_index, num_threads=1)
    s.search(qs, k=10)
    shares = []
    for _ in range(3):
        r0, th0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
        s.search(qs, k=10)
        r1, th1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
        process = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        shares.append((process - (th1 - th0)) / (t1 - t0))
        if shares[-1] < 0.25:
            break
    assert min(shares) < 0.25, f"other threads worked {min(shares):.2f} s per second of a one-thread search"

"""Search cannot silently miss: stage 2's pruning fallback at several similarity scales, and k
beyond the corpus.

PLAID's ``centroid_score_threshold`` is an absolute score (0.5 / 0.45 / 0.4, set for ColBERTv2's
cosine scale). On embeddings of another scale no centroid may reach it: every candidate then
scored ``m * PRUNED_SCORE`` in stage 2 and the lowest document ids filled its ``ndocs`` slots,
so a query made of a high-id document's own tokens did not find it. The fallback
(:func:`plaid.search.stages.fallback_threshold`): when stage 2 would drop candidates while fewer
than it keeps have a surviving centroid, the query is pruned at ``min(threshold, floor)``, floor
= the lowest score among the cells stage 1 probed.

Corpora (300 documents each, default Indexer, built once per module):

* ``unit-64`` / ``unit-128``: i.i.d. unit vectors, 1-10 tokens per document (short documents:
  few tokens reach the threshold; before the fallback ids 281-299 were missed);
* ``norms-3-10``: clustered vectors (64 topic directions + noise, 4-22 tokens) scaled to norms 3-10: every
  centroid passes the threshold, pruning never prunes and the fallback never triggers;
* ``norms-0.05-0.3``: clustered, norms 0.05-0.3: no centroid reaches the threshold for any
  query, every query goes through the fallback.

(i.i.d. Gaussian vectors of random norms are left out: without cluster structure centroid
scores say little about a token and stage 3's centroid-only ranking, not pruning, drops ~7% of
the self-matches; see the report of the change.)
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import plaid
from plaid.search import stages, stages_torch

N_DOCS = 300


def _corpus(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    docs = []
    if kind in ("unit-64", "unit-128"):
        dim = int(kind.split("-")[1])
        for _ in range(N_DOCS):
            x = rng.normal(size=(int(rng.integers(1, 11)), dim))
            docs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
        return docs
    dim, ntop, (lo, hi) = 64, {"norms-3-10": 64, "norms-0.05-0.3": 256}[kind], \
        {"norms-3-10": (3.0, 10.0), "norms-0.05-0.3": (0.05, 0.3)}[kind]
    topics = rng.normal(size=(ntop, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    for _ in range(N_DOCS):
        n = int(rng.integers(4, 23))
        mix = rng.choice(ntop, size=3, replace=False)
        x = topics[rng.choice(mix, size=n)] + rng.normal(scale=0.5 / np.sqrt(dim), size=(n, dim))
        x *= rng.uniform(lo, hi, size=(n, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
        docs.append(x.astype(np.float32))
    return docs


KINDS = ["unit-64", "unit-128", "norms-3-10", "norms-0.05-0.3"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """kind -> (docs, index path, sample): ``sample`` the documents whose own tokens score
    themselves at least 2% above any other document by exact MaxSim (all of them for unit
    vectors; a larger-norm document can beat a query's own document otherwise)."""
    out = {}
    root = tmp_path_factory.mktemp("fallback")
    for kind in KINDS:
        docs = _corpus(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few tokens per centroid: the Indexer says so
            index = plaid.Indexer(show_progress=False).build(str(root / kind), docs)
        exact = plaid.maxsim(docs, docs)
        own = np.diag(exact).copy()
        np.fill_diagonal(exact, -np.inf)
        clear = own > exact.max(1) + 0.02 * np.abs(own)
        out[kind] = (docs, index.path, np.flatnonzero(clear))
    return out


def _spy_numpy(monkeypatch):
    """Record the (threshold, returned) pairs of every stages.fallback_threshold call."""
    calls = []
    real = stages.fallback_threshold

    def spy(threshold, covered, n_keep, floor):
        out = real(threshold, covered, n_keep, floor)
        calls.append((threshold, out, covered, n_keep))
        return out

    monkeypatch.setattr(stages, "fallback_threshold", spy)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_sample_is_most_of_the_corpus(corpora, kind):
    docs, _, sample = corpora[kind]
    assert len(sample) >= 0.9 * len(docs)
    assert len(set(sample.tolist()) & set(range(len(docs) - 10, len(docs)))) >= 8  # the highest ids too
    if kind.startswith("unit"):
        assert len(sample) == len(docs)


@pytest.mark.parametrize("engine,precision", [("numpy", "float32"), ("numpy", "bfloat16"), ("torch", "float32")])
@pytest.mark.parametrize("kind", KINDS)
def test_a_documents_own_tokens_find_it_first(corpora, kind, engine, precision):
    """Default search parameters (k=10): every sampled document comes first for its own tokens
    (numpy: every one of the sample; torch, slower on CPU: a seeded 100 of them plus the 20
    highest ids)."""
    docs, path, sample = corpora[kind]
    if engine == "torch":
        rng = np.random.default_rng(5)
        sample = np.union1d(rng.choice(sample, 100, replace=False), sample[-20:])
    s = plaid.Searcher(path, engine=engine, centroid_precision=precision)
    res = s.search([docs[i] for i in sample], k=10)
    missed = sample[res.ids[:, 0] != sample]
    assert len(missed) == 0, f"{kind}: {len(missed)} documents not found first by their own tokens: {missed[:20]}"


@pytest.mark.parametrize("kind", KINDS)
def test_when_the_fallback_triggers(corpora, kind, monkeypatch):
    """The corpora exercise what they are meant to: the fallback triggers on the short unit
    documents and on every query of the small-norm corpus, never where every centroid passes."""
    docs, path, sample = corpora[kind]
    calls = _spy_numpy(monkeypatch)
    s = plaid.Searcher(path, engine="numpy", centroid_precision="float32")
    lowered = 0
    for i in sample:
        calls.clear()
        s.search(docs[i], k=10)
        lowered += any(out < thr for thr, out, _, _ in calls)
    if kind == "norms-3-10":
        assert lowered == 0 and not calls
    elif kind == "norms-0.05-0.3":
        assert lowered >= 0.9 * len(sample)  # the rest: stage 2 kept every candidate (a no-op)
    else:
        assert lowered >= 0.25 * len(sample)


@pytest.mark.parametrize("kind", ["unit-64", "unit-128", "norms-0.05-0.3"])
def test_without_the_fallback_high_ids_are_missed(corpora, kind, monkeypatch):
    """The property test can fail: with the fallback disabled the uncovered candidates tie and
    the lowest ids take stage 2's slots, so documents near the end of the corpus are missed."""
    docs, path, sample = corpora[kind]
    monkeypatch.setattr(stages, "fallback_threshold", lambda threshold, covered, n_keep, floor: threshold)
    s = plaid.Searcher(path, engine="numpy", centroid_precision="float32")
    res = s.search([docs[i] for i in sample], k=10)
    missed = sample[res.ids[:, 0] != sample]
    assert len(missed) > 0 and missed.min() > len(docs) // 2


@pytest.mark.parametrize("ndocs", [None, 32])
@pytest.mark.parametrize("kind", ["unit-64", "norms-0.05-0.3"])
def test_engines_agree_under_the_fallback(corpora, kind, ndocs, monkeypatch):
    """The numpy and torch engines make the same fallback decision and keep the same candidates
    (float32 centroid scores: then only stage 4's summation order differs)."""
    docs, path, _ = corpora[kind]
    queries = docs[::3] + [np.concatenate(docs[-3:])]  # 101 queries, one of them long
    calls = _spy_numpy(monkeypatch)
    floors = []
    real_floor = stages_torch.probed_floor
    monkeypatch.setattr(stages_torch, "probed_floor", lambda *a: floors.append(1) or real_floor(*a))
    kw = dict(k=10) if ndocs is None else dict(k=5, ndocs=ndocs)
    a = plaid.Searcher(path, engine="numpy", centroid_precision="float32").search(queries, **kw)
    b = plaid.Searcher(path, engine="torch", centroid_precision="float32", batch_size=16).search(queries, **kw)
    assert any(out < thr for thr, out, _, _ in calls) and floors  # both took the fallback
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def test_probed_floor_is_the_same_in_both_engines_and_covers_every_candidate(corpora):
    """stages.probed_floor (numpy) == stages_torch.probed_floor per query, at any ncells; at the
    floor every stage-1 candidate keeps a centroid, on both sides of the numpy stage 2."""
    docs, path, _ = corpora["unit-64"]
    s = plaid.Searcher(path, centroid_precision="float32")
    st = s._state
    qs = [docs[i] for i in (0, 7, 150, 299)]
    m = max(len(q) for q in qs)
    S = torch.full((len(qs), m, st.num_centroids), 7.0)
    qmask = torch.zeros((len(qs), m), dtype=torch.bool)
    for ncells in (1, 2, 5, st.num_centroids, 10 * st.num_centroids):
        got_t = []
        for i, q in enumerate(qs):
            R = s._centroid_scores(st, torch.from_numpy(q)).numpy()
            S[i, : len(q)] = torch.from_numpy(R)
            qmask[i, : len(q)] = True
            cuts = stages.CellCuts(R)
            floor = stages.probed_floor(cuts, ncells)
            nc = min(ncells, st.num_centroids)
            want = min(np.sort(row)[::-1][nc - 1] for row in R)
            assert floor == want
            docs_c = stages.candidates(R, ncells, st.ivf, st.ivf_offsets, cuts)
            keep = stages.surviving(R, floor)
            offs, cells = stages.document_cells(docs_c, st.dcells, st.dcell_offsets)
            assert stages.covered_documents(cells, keep, offs).all()
            slot = np.full(st.num_documents, -1, np.int32)
            _, cov = stages.pruned_maxsim(keep, stages.centroid_table(R), docs_c, st.ivf, st.ivf_offsets,
                                          np.diff(offs), slot, return_covered=True)
            assert cov.all()
            got_t.append(floor)
        nc_t = torch.full((len(qs),), ncells, dtype=torch.long)
        np.testing.assert_array_equal(stages_torch.probed_floor(S, qmask, nc_t).numpy(), np.float32(got_t))


def test_covered_documents_agree_on_both_sides_and_in_torch(corpora):
    """The three ways of counting covered candidates (numpy: inverted-list side, document side;
    torch: per pair) agree, at thresholds that cover none, some and all of them."""
    docs, path, _ = corpora["unit-64"]
    s = plaid.Searcher(path, engine="torch", centroid_precision="float32")
    st = s._state
    from plaid.search.stages import doc_cells

    dcells, dcell_offsets = doc_cells(st.ivf, st.ivf_offsets, st.num_documents)
    q = np.concatenate(docs[10:13])
    R = s._centroid_scores(st, torch.from_numpy(q)).numpy()
    S = torch.from_numpy(R)[None]
    qmask = torch.ones((1, len(q)), dtype=torch.bool)
    cand = stages.candidates(R, 4, st.ivf, st.ivf_offsets)
    offs, cells = stages.document_cells(cand, dcells, dcell_offsets)
    seen = set()
    for thr in (2.0, 0.6, 0.45, 0.3, -2.0):
        keep = stages.surviving(R, thr)
        doc_side = stages.covered_documents(cells, keep, offs)
        slot = np.full(st.num_documents, -1, np.int32)
        scores, ivf_side = stages.pruned_maxsim(keep, stages.centroid_table(R), cand, st.ivf, st.ivf_offsets,
                                                np.diff(offs), slot, return_covered=True)
        np.testing.assert_array_equal(scores, stages.approximate_maxsim(stages.centroid_table(R),
                                                                        stages.pruned_cells(cells, keep), offs))
        np.testing.assert_array_equal(doc_side, ivf_side)
        table = stages_torch.prune_centroid_scores(S, qmask, thr).transpose(1, 2).contiguous()
        pq = torch.zeros(len(cand), dtype=torch.long)
        _, cov_t = stages_torch.approximate_scores(table, pq, torch.from_numpy(cand), st.doc_offsets_t,
                                                   lambda pos: st.codes_t[pos],
                                                   covered_by=stages_torch.surviving(S, qmask, thr))
        np.testing.assert_array_equal(cov_t.numpy(), doc_side)
        # per-query thresholds give what a scalar one gives
        t1 = stages_torch.prune_centroid_scores(S, qmask, torch.tensor([thr]))
        assert torch.equal(t1, stages_torch.prune_centroid_scores(S, qmask, thr))
        seen.add("none" if not doc_side.any() else "all" if doc_side.all() else "some")
    assert seen == {"none", "some", "all"}


def test_fallback_threshold_rule():
    assert stages.fallback_threshold(0.5, covered=10, n_keep=256, floor=0.2) == 0.2
    assert stages.fallback_threshold(0.5, covered=256, n_keep=256, floor=0.2) == 0.5  # enough covered
    assert stages.fallback_threshold(0.5, covered=0, n_keep=256, floor=0.7) == 0.5  # never raised


# -- k beyond the corpus ---------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_huge_k_is_capped_at_the_number_of_documents(corpora, engine):
    docs, path, _ = corpora["unit-64"]
    s = plaid.Searcher(path, engine=engine, centroid_precision="float32")
    qs = [docs[0], docs[299], docs[150][:1]]
    capped = s.search(qs, k=len(docs))
    for k in (10**13, np.int64(2**62), len(docs) + 1):
        res = s.search(qs, k=k)  # raised MemoryError (a [3, 10**13] result) before
        assert res.ids.shape == res.scores.shape == (3, len(docs))
        np.testing.assert_array_equal(res.ids, capped.ids)
        np.testing.assert_array_equal(res.scores, capped.scores)
    for row in capped.ids:  # k = N reaches every document
        assert sorted(row.tolist()) == list(range(len(docs)))
    assert capped.ids[0, 0] == 0 and capped.ids[1, 0] == 299
    # with explicit budgets and a subset, too
    res = s.search(qs, k=10**13, ndocs=8, ncells=1, subset=list(range(0, 300, 2)))
    assert res.ids.shape == (3, len(docs))
    for row, sc in zip(res.ids, res.scores):
        hits = row >= 0
        n = int(hits.sum())
        assert n == 150 and hits[:n].all() and set(row[:n].tolist()) == set(range(0, 300, 2))
        assert np.isneginf(sc[n:]).all() and np.isfinite(sc[:n]).all()
    with pytest.raises(plaid.InvalidInputError, match="k must be a positive integer"):
        s.search(qs, k=0)
    with pytest.raises(plaid.InvalidInputError, match="k must be a positive integer"):
        s.search(qs, k=float(10**13))


"""The torch engine on a CUDA device: the same pipeline, the same results as the CPU engine.

Every test here is marked ``gpu`` and skips where torch sees no CUDA device (CI has none; run
``python -m pytest -m gpu`` on a machine with one).
"""
import numpy as np
import pytest
import torch

import plaid

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_cuda_engine_agrees_with_the_cpu_engine_stage_by_stage(small_index, small_corpus, threshold):
    _, queries = small_corpus
    kw = dict(k=5, ncells=2, centroid_score_threshold=threshold, ndocs=24, trace=True)
    a = plaid.Searcher(small_index, engine="numpy", centroid_precision="float32").search(queries, **kw)
    g = plaid.Searcher(small_index, device="cuda", centroid_precision="float32")
    assert g.engine == "torch" and g._state.engine.codes_t.device.type == "cuda"
    assert g._state.engine.codes_t.dtype == torch.int32 and g._state.engine.ivf_t.dtype == torch.int32
    b = g.search(queries, **kw)
    for ta, tb in zip(a.traces, b.traces):
        for name in ("candidates", "stage2", "stage3"):
            np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-4)


def test_cuda_subsets_and_tombstones(tmp_path, small_corpus):
    docs, queries = small_corpus
    path = str(tmp_path / "idx")
    idx = plaid.Indexer(show_progress=False, pq_m=16).build(path, docs, doc_ids=[f"d{i}" for i in range(len(docs))])
    idx.delete(list(range(0, 600, 7)))
    sub = [f"d{i}" for i in range(1, 600, 3)]
    a = plaid.Searcher(path, centroid_precision="float32").search(queries, k=10, subset=sub)
    b = plaid.Searcher(path, device="cuda", centroid_precision="float32").search(queries, k=10, subset=sub)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-4)


def _agree(path, queries, **kw):
    """The device's ids and scores equal the numpy engine's (float32 centroid scores on both)."""
    a = plaid.Searcher(path, centroid_precision="float32").search(queries, **kw)
    b = plaid.Searcher(path, device="cuda", centroid_precision="float32").search(queries, **kw)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-4)
    return b


def test_cuda_scalar_codec_k100(small_scalar_index, small_corpus):
    _, queries = small_corpus
    res = _agree(small_scalar_index, queries, k=100)
    assert (res.ids[:, :10] >= 0).all()


def test_cuda_one_token_queries(small_index, small_corpus):
    _, queries = small_corpus
    _agree(small_index, [q[:1] for q in queries], k=10)


def test_cuda_multi_segment_index_and_reload(tmp_path, small_corpus):
    """Two segments (build + add), a deletion, and a device Searcher that reloads after the add."""
    docs, queries = small_corpus
    path = str(tmp_path / "idx")
    idx = plaid.Indexer(show_progress=False, pq_m=16).build(path, docs[:400])
    g = plaid.Searcher(path, device="cuda", centroid_precision="float32")
    before = g.search(queries, k=10)
    assert before.ids.max() < 400
    idx.add(docs[400:], show_progress=False)
    idx.delete([1, 2, 3, 401])
    assert g.reload()
    after = g.search(queries, k=10)
    ref = plaid.Searcher(path, centroid_precision="float32").search(queries, k=10)
    np.testing.assert_array_equal(after.ids, ref.ids)
    np.testing.assert_allclose(after.scores, ref.scores, rtol=0, atol=1e-4)
    assert not np.isin(after.ids, [1, 2, 3, 401]).any() and after.ids.max() >= 400

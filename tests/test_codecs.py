"""Residual codecs, the one-byte norms and int8 centroids (plaid.codecs): what is stored decodes to
what search scores, within the stated error bounds."""
import numpy as np
import pytest
import torch

import plaid
from plaid.codecs import (NORM_LEVELS, NormQuantizer, PQCodec, ScalarCodec, allocate_widths, check_codec_params,
                          codec_array_specs, codec_from_manifest, dequantize_centroids, quantize_centroids)
from plaid.search.stages import adc_scores


def _residual_like(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Correlated anisotropic vectors (variances spanning 10x), like token residuals."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    scales = np.geomspace(1.0, 0.1, dim)
    return (rng.normal(size=(n, dim)) * scales @ basis.T).astype(np.float32)


CODECS = [
    dict(m=16), dict(m=16, rotation=True), dict(m=21, rotation=True),
    dict(m=64, rotation=True), dict(m=8, widths=[1, 3, 12, 8, 8, 8, 16, 8]),
]


@pytest.mark.parametrize("kw", CODECS, ids=lambda kw: "-".join(f"{k}{v if not isinstance(v, list) else 'w'}" for k, v in kw.items()))
def test_pq_table_scores_equal_dot_products_with_decoded_vectors(kw):
    """Stage 4 never decodes: the sum of code_bytes table entries must be <q, decode(code)>."""
    x = _residual_like(1500)
    codec = PQCodec(64, train_iters=3, **kw)
    codec.train(x[:1000], seed=1)
    codes = codec.encode(x[1000:])
    assert codes.shape == (500, codec.code_bytes) and codes.dtype == np.uint8
    decoded = codec.decode_numpy(codes)
    q = _residual_like(9, seed=5)
    np.testing.assert_allclose(adc_scores(codec.score_table(q), codes), decoded @ q.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(codec.decode(torch.from_numpy(codes)).numpy(), decoded, rtol=0, atol=1e-5)
    # the manifest round trip gives the same codec
    params = check_codec_params(64, codec.params())
    again = codec_from_manifest(64, params, codec.arrays())
    np.testing.assert_array_equal(again.decode_numpy(codes), decoded)
    assert set(codec.arrays()) == set(codec_array_specs(64, params))
    for name, (dtype, shape) in codec_array_specs(64, params).items():
        assert codec.arrays()[name].dtype == dtype and codec.arrays()[name].shape == shape


@pytest.mark.parametrize("kw", CODECS, ids=lambda kw: "-".join(f"{k}{v if not isinstance(v, list) else 'w'}" for k, v in kw.items()))
def test_compiled_pq_encoder_gives_faiss_codes(kw, monkeypatch):
    """The compiled encoder (plaid._codecs_numba) picks faiss's nearest sub-centroids, tie-free
    data and padded layouts alike; without it (numba missing or failing) faiss encodes, with one
    warning."""
    import plaid.codecs as codecs

    x = _residual_like(3000, seed=2)
    codec = PQCodec(64, train_iters=3, **kw)
    codec.train(x[:1000], seed=1)
    z = codec._to_layout(x[1000:])
    want = codec._faiss_pq().compute_codes(z).reshape(len(z), codec.m)
    got = codec.encode(x[1000:])
    assert codecs._PQ.fn, "the compiled encoder was not used"
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.concatenate([codec.encode(x[1000:1001]), codec.encode(x[1001:])]), got)

    def broken(*a):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(codecs._PQ, "fn", broken)
    with pytest.warns(RuntimeWarning, match="compiled PQ encoder unavailable"):
        np.testing.assert_array_equal(codec.encode(x[1000:]), want)
    assert codecs._PQ.fn is False


def test_query_rotation_is_compiled_and_equals_blas(monkeypatch):
    """Query tokens are rotated by the compiled kernel (no BLAS: OpenBLAS's threads spin after a
    product and took the other search thread's core), to the float32 values of the BLAS
    rotation (float64 sums in another order: a last-bit difference at most, and rarely); its
    rows do not depend on each other; without the kernel BLAS rotates, with one warning."""
    import plaid.codecs as codecs

    x = _residual_like(3000, seed=4)
    codec = PQCodec(64, m=12, rotation=True, train_iters=2)
    codec.train(x[:1000], seed=0)
    q = x[1000:]
    blas = codec._rotate(q)
    got = codec._rotate_queries(q)
    assert codecs._ROT.fn, "the compiled rotation was not used"
    ulps = np.abs(got.view(np.int32).astype(np.int64) - blas.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.999, (ulps.max(), (ulps == 0).mean())
    np.testing.assert_array_equal(np.concatenate([codec._rotate_queries(q[:7]), codec._rotate_queries(q[7:])]), got)
    # the layout (and so the score tables) of queries never reaches BLAS's rotation
    monkeypatch.setattr(codec, "_rotate", lambda *a, **k: pytest.fail("BLAS rotation used for queries"))
    np.testing.assert_array_equal(codec.query_layout(q), codec._to_layout(q, lambda v: got))
    monkeypatch.undo()

    def broken(*a):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(codecs._ROT, "fn", broken)
    with pytest.warns(RuntimeWarning, match="compiled query rotation unavailable"):
        np.testing.assert_array_equal(codec._rotate_queries(q), blas)
    assert codecs._ROT.fn is False
    monkeypatch.undo()
    monkeypatch.setenv("PLAID_NO_NUMBA", "1")  # the search's fallback keeps numba off the query path too
    assert codecs._ROT.get() is None
    np.testing.assert_array_equal(codec._rotate_queries(q), blas)


def test_rotation_with_allocated_widths_beats_equal_widths_at_the_same_bytes():
    x = _residual_like(6000)
    errs = {}
    for name, kw in {"plain": dict(m=16), "rotated": dict(m=16, rotation=True)}.items():
        c = PQCodec(64, train_iters=5, **kw)
        c.train(x[:4000], seed=0)
        errs[name] = float(np.mean(np.sum((c.decode_numpy(c.encode(x[4000:])) - x[4000:]) ** 2, axis=1)))
    assert errs["rotated"] < 0.8 * errs["plain"], errs


def test_allocate_widths_gives_high_variance_axes_narrower_sub_vectors():
    w = allocate_widths(np.geomspace(10.0, 0.01, 128), 34, 128)
    assert len(w) == 34 and sum(w) == 128 and min(w) >= 1
    assert w[0] < w[-1]
    assert allocate_widths(np.ones(128), 32, 128) == (4,) * 32
    w = allocate_widths(np.ones(10), 10, 10)
    assert w == (1,) * 10


@pytest.mark.parametrize("kw, match", [
    (dict(m=0), "between 1 and the dimension"), (dict(m=65), "between 1 and the dimension"),
    (dict(m=4, widths=[16, 16, 16]), "widths must be 4 positive integers"),
    (dict(m=2, widths=[64, 0]), "widths must be 2 positive integers"),
])
def test_pq_parameters_that_do_not_fit_the_dimension(kw, match):
    with pytest.raises(plaid.InvalidInputError, match=match):
        PQCodec(64, **kw)


@pytest.mark.parametrize("params, match", [
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3}, "does not divide the dimension 64 and codec.widths is missing"),
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3, "widths": [30, 30, 4]}, "rotation must be true or false"),
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3, "widths": [30, 30], "rotation": False}, "widths must be a list of 3"),
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3, "widths": [30, 30, 5], "rotation": False}, "summing to 64"),
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3, "widths": [30, 30.0, 4], "rotation": False}, "positive integers"),
    ({"name": "pq", "m": 3, "nbits": 8, "code_bytes": 3, "widths": "30,30,4", "rotation": False}, "widths must be a list"),
    ({"name": "pq", "m": 2, "nbits": 8, "code_bytes": 2, "widths": [32, 32], "rotation": "true"}, "rotation must be"),
    ({"name": "pq", "m": 100, "nbits": 8, "code_bytes": 100}, "between 1 and the dimension"),
])
def test_hostile_codec_parameters_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        check_codec_params(64, params)


def test_scalar_codec_table_scores_still_exact():
    x = _residual_like(3000)
    codec = ScalarCodec(64, nbits=2)
    codec.train(x[:2000])
    codes = codec.encode(x[2000:])
    q = _residual_like(5, seed=3)
    np.testing.assert_allclose(adc_scores(codec.score_table(q), codes), codec.decode_numpy(codes) @ q.T,
                               rtol=1e-5, atol=1e-5)


# -- one-byte norms ---------------------------------------------------------------------------------
def test_norm_quantizer_precision_inside_and_beyond_the_sample():
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.7, 1.1, 100_000)
    nq = NormQuantizer.fit(norms)
    assert nq.values.shape == (NORM_LEVELS,) and nq.values.dtype == np.float32
    assert (np.diff(nq.values) > 0).all()
    codes = nq.encode(norms)
    assert codes.dtype == np.uint8
    rel = np.abs(np.log(nq.decode(codes) / norms))
    assert rel.max() < 1.2e-3  # inside the sample's band: about 0.1%
    # the nearest level in log space, always
    logs = np.log(nq.values.astype(np.float64))
    x = np.geomspace(0.1, 10, 5000)
    best = np.abs(np.log(x)[:, None] - logs[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(nq.encode(x), best)
    # beyond the band (tokens added later): coarser, out to 4x; clipped only past that
    wide = np.geomspace(0.7 / 4, 1.1 * 4, 5000)
    assert np.abs(np.log(nq.decode(nq.encode(wide)) / wide)).max() < 0.1
    near = np.geomspace(0.6, 1.3, 5000)
    assert np.abs(np.log(nq.decode(nq.encode(near)) / near)).max() < 0.015
    assert nq.encode(np.array([1e-9, 0.0, 1e9, np.inf])).tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize("sample", [np.array([1.0]), np.array([0.5, 0.5]), np.array([]), np.array([np.nan, 2.0])])
def test_norm_quantizer_degenerate_samples(sample):
    nq = NormQuantizer.fit(sample)
    assert np.isfinite(nq.values).all() and (np.diff(nq.values) > 0).all()


@pytest.mark.parametrize("values", [np.ones(256), np.linspace(1, 2, 255), np.r_[np.nan, np.linspace(1, 2, 255)],
                                    np.linspace(-1, 2, 256), np.linspace(2, 1, 256)])
def test_norm_values_that_are_not_a_table_are_refused(values):
    with pytest.raises(ValueError, match="norm_values must be 256 finite, positive, increasing"):
        NormQuantizer(values)


# -- int8 centroids ---------------------------------------------------------------------------------
def test_int8_centroids_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(500, 64)).astype(np.float32)
    c[3] = 0.0  # an all-zero row
    c[4] *= 1e6  # a large one: the scale is per row
    q = quantize_centroids(c)
    assert q["centroids"].dtype == np.int8 and q["centroid_scales"].dtype == np.float32
    back = dequantize_centroids(q["centroids"], q["centroid_scales"])
    step = np.abs(c).max(axis=1) / 127
    assert (np.abs(back - c) <= step[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    assert (back[3] == 0).all()


def test_presets_scale_their_bytes_with_the_dimension(tmp_path):
    from plaid.indexing.indexer import preset_pq_m

    assert [preset_pq_m("balanced", d) for d in (128, 32, 96, 768, 1)] == [34, 9, 26, 204, 1]
    assert [preset_pq_m(p, 128) for p in ("compact", "balanced", "accurate")] == [16, 34, 64]
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(int(rng.integers(3, 9)), 32)).astype(np.float32) for _ in range(150)]
    index = plaid.Indexer(show_progress=False).build(tmp_path / "i", docs)
    assert index.codec["m"] == 9 and index.codec["rotation"] is True
    assert plaid.Indexer(show_progress=False, pq_m=32, pq_rotation=False).build(tmp_path / "j", docs).codec == \
        {"name": "pq", "m": 32, "nbits": 8, "code_bytes": 32}

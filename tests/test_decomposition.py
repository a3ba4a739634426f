import numpy as np
import pytest

from micik_tf.compression import decomposition as dec


def _decaying(m, n, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = 0.9 ** np.arange(min(m, n))
    return ((u * s) @ v.T).astype("float32")


def test_randomized_svd_matches_exact_on_the_leading_spectrum(monkeypatch):
    # The subspace iteration's path (a side above the exact Gram's limit, k
    # small) at a size that takes a second rather than a minute.
    monkeypatch.setattr(dec, "_EXACT_GRAM_MAX_SIDE", 256)
    matrix = _decaying(700, 400)
    u, s_fast, vt = dec.top_svd(matrix, 20)
    exact_u, s_exact, exact_vt = np.linalg.svd(matrix, full_matrices=False)
    np.testing.assert_allclose(s_fast, s_exact[:20], rtol=1e-3)
    # The same leading singular vectors (up to sign), on both sides.
    np.testing.assert_allclose(np.abs(np.sum(u * exact_u[:, :20], axis=0)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(vt * exact_vt[:20], axis=1)), 1.0, atol=1e-3)
    found = dec.spectrum(matrix, 20)
    assert found.total == pytest.approx(float(np.sum(np.square(matrix.astype(np.float64)))))


@pytest.mark.parametrize("side", ["input", "output"])
def test_common_rank_errors_match_the_factorization_under_a_metric(side):
    """The common part alone, for every rank, from one projection, when the
    layer's metric differs from the one its group's basis was computed in."""
    rng = np.random.default_rng(1)
    w = _decaying(24, 18)
    x = rng.standard_normal((400, 24)) * np.linspace(0.2, 3.0, 24)
    metric = dec.InputMetric.from_covariance(x.T @ x / 400)
    pooled = dec.InputMetric.from_covariance(np.eye(24) * 5.0)
    basis = dec.shared_basis([w, _decaying(24, 18, 4)], 6, side,
                             pooled if side == "input" else [metric, metric])
    errors, reference = dec.common_rank_errors(w, basis, side, metric)
    for rank in (1, 3, 6):
        part = basis[:, :rank] if side == "input" else basis[:rank]
        diff = w - dec.factorize(w, 0, part, side, metric).approximation
        np.testing.assert_allclose(errors[rank], np.sum(np.square(metric.apply(diff))), rtol=1e-4)
    assert reference == pytest.approx(float(np.sum(np.square(metric.apply(w)))), rel=1e-5)


def test_shared_basis_is_orthonormal_and_scale_invariant_per_layer():
    a, b = _decaying(40, 12, 1), _decaying(40, 30, 2)
    basis = dec.shared_basis([a, b], 6)
    np.testing.assert_allclose(basis.T @ basis, np.eye(6), atol=1e-5)
    # Normalising each layer: scaling one member does not change the basis.
    scaled = dec.shared_basis([100 * a, b], 6)
    np.testing.assert_allclose(np.abs(scaled.T @ basis), np.eye(6), atol=1e-3)


@pytest.mark.parametrize("side", ["input", "output"])
def test_full_rank_factorization_is_exact(side):
    w = _decaying(20, 8)
    basis = dec.shared_basis([w, _decaying(20, 8, 3)], 8 if side == "input" else 8, side)
    factors = dec.factorize(w, 8, basis[:, :3] if side == "input" else basis[:3], side)
    np.testing.assert_allclose(factors.approximation, w, atol=1e-5)


@pytest.mark.parametrize("with_metric", [False, True])
def test_spectrum_predicts_the_factorization_error(with_metric):
    rng = np.random.default_rng(0)
    w = _decaying(30, 20)
    metric = None
    if with_metric:
        x = rng.standard_normal((500, 30)) @ rng.standard_normal((30, 30))
        metric = dec.InputMetric.from_covariance(x.T @ x / 500)
    basis = dec.shared_basis([w, _decaying(30, 20, 5)], 4, "input", metric)
    errors, reference, _ = dec.residual_spectrum(w, basis, 10, "input", metric)
    for rank in (0, 3, 10):
        approx = dec.factorize(w, rank, basis, "input", metric).approximation
        diff = w - approx
        measured = np.sum(np.square(diff if metric is None else metric.apply(diff)))
        np.testing.assert_allclose(errors[rank], measured, rtol=1e-3, atol=1e-6)
    assert np.all(np.diff(errors) <= 1e-9)  # more rank never hurts


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])  # the Gram on either side
@pytest.mark.parametrize("with_metric", [False, True])
def test_residual_gram_update_matches_the_explicit_residual(side, shape, with_metric):
    """The low-rank update of the kernel's Gram is the Gram of the residual
    that `factorize` leaves, whatever the side, shape and metric."""
    m, n = shape
    rng = np.random.default_rng(2)
    w = _decaying(m, n)
    metric = None
    if with_metric:
        x = rng.standard_normal((500, m)) @ rng.standard_normal((m, m))
        metric = dec.InputMetric.from_covariance(x.T @ x / 500)
    basis = dec.shared_basis([w, _decaying(m, n, 5)], 5, side,
                             metric if side == "input" or metric is None else [metric] * 2)
    grams = dec.ResidualGrams(w, side, metric)
    residual = w - dec.factorize(w, 0, basis, side, metric).approximation
    residual = residual if metric is None else metric.apply(residual)
    expected = residual.T @ residual if m >= n else residual @ residual.T
    scale = float(np.max(np.abs(grams.gram)))
    np.testing.assert_allclose(grams.residual_gram(basis), expected, atol=1e-5 * scale)
    np.testing.assert_allclose(grams.residual_gram(None), grams.gram)


@pytest.mark.parametrize("condition", [1e2, 1e12])
def test_orthonormal_spans_nested_prefixes_even_when_ill_conditioned(condition):
    """CholeskyQR2, or Householder QR where the block is too ill-conditioned
    for it: orthonormal columns whose first r span the block's first r."""
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((200, 30)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    block = (u * np.logspace(0, -np.log10(condition), 30)) @ v.T
    q = dec.orthonormal(block)
    np.testing.assert_allclose(q.T @ q, np.eye(30), atol=1e-10)
    for r in (1, 7, 30):
        reference, _ = np.linalg.qr(block[:, :r])
        np.testing.assert_allclose(np.abs(q[:, :r].T @ reference).sum(axis=0), 1.0, atol=1e-6)


def test_metric_whitening_equals_output_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 10)) * np.arange(1, 11)
    metric = dec.InputMetric.from_covariance(x.T @ x / 400, damping=0.0)
    d = rng.standard_normal((10, 4))
    np.testing.assert_allclose(
        np.sum(np.square(x @ d)) / 400, np.sum(np.square(metric.apply(d))), rtol=1e-4
    )

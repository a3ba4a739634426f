"""The linear algebra of MICIK: shared bases, coefficients and unique parts.

Every function works on kernel *matrices* `W_l` (`m x n_l`): a Conv2D kernel
`k x k x C_in x C_out` is reshaped to `(k*k*C_in, C_out)`, a Dense kernel is
used as it is. An optional `InputMetric` per layer turns the weight error
`||W - W_hat||` into the output error `||X W - X W_hat||` on calibration inputs
`X` (the data-aware initialisation of MICIK.md section 2).
"""

import dataclasses

import numpy as np

# Below this size (smaller side) an exact SVD is cheap; above it, and when few
# singular vectors are needed, a randomized SVD saves most of the time.
_EXACT_SVD_MAX_SIDE = 1024


def kernel_matrix(kernel):
    """Reshapes a Dense or Conv2D kernel to its `m x n` matrix."""
    kernel = np.asarray(kernel)
    return kernel.reshape(-1, kernel.shape[-1])


def top_svd(matrix, k, seed=0):
    """The `k` leading singular triplets of `matrix`.

    Exact for small matrices or large `k`; otherwise a randomized SVD
    (Halko et al. 2011) with oversampling and two power iterations, which is
    accurate for the leading part of a spectrum and many times faster on the
    large fully-connected kernels of VGG-style networks.

    Returns:
        `(u, s, vt)` with shapes `(m, k)`, `(k,)`, `(k, n)`.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    p = min(matrix.shape)
    k = int(min(k, p))
    if k == 0:
        m, n = matrix.shape
        return np.zeros((m, 0), np.float32), np.zeros(0, np.float32), np.zeros((0, n), np.float32)
    if p <= _EXACT_SVD_MAX_SIDE or k > p // 3:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    return _randomized_svd(matrix, k, seed=seed)


def singular_values(matrix, k, seed=0):
    """The `k` largest singular values of `matrix`, in decreasing order.

    Values alone are much cheaper than vectors: for a small side up to 2048
    they come from the eigenvalues of the Gram matrix (in float64, so the
    squaring loses nothing that matters for error sums).
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    p = min(matrix.shape)
    k = int(min(k, p))
    if k == 0:
        return np.zeros(0, np.float32)
    if p <= 2 * _EXACT_SVD_MAX_SIDE or k > p // 3:
        small = matrix.T if matrix.shape[0] >= matrix.shape[1] else matrix
        small = small.astype(np.float64)
        gram = small @ small.T
        values = np.linalg.eigvalsh(gram)[::-1][:k]
        return np.sqrt(np.maximum(values, 0.0)).astype(np.float32)
    return _randomized_svd(matrix, k, seed=seed)[1]


def _randomized_svd(matrix, k, oversample=10, n_iter=2, seed=0):
    transpose = matrix.shape[0] < matrix.shape[1]
    if transpose:
        matrix = matrix.T
    n = matrix.shape[1]
    width = min(k + oversample, n)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(matrix @ rng.standard_normal((n, width)).astype(np.float32))
    for _ in range(n_iter):
        z, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ z)
    ub, s, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    u = q @ ub
    u, s, vt = u[:, :k], s[:k], vt[:k]
    if transpose:
        return vt.T, s, u.T
    return u, s, vt


@dataclasses.dataclass
class InputMetric:
    """Whitening by the input covariance: `||X D||_F^2 = N ||P D||_F^2`.

    `P = C^{1/2}` with `C = X^T X / N`, damped so that `P` is invertible.
    """

    sqrt: np.ndarray
    inv_sqrt: np.ndarray
    covariance: np.ndarray

    @classmethod
    def from_covariance(cls, covariance, damping=1e-2):
        covariance = np.asarray(covariance, dtype=np.float64)
        covariance = (covariance + covariance.T) / 2
        # float32 halves the O(m^3) cost (seconds at m = 4608); the damping
        # below keeps the conditioning far from float32's limits.
        values, vectors = np.linalg.eigh(covariance.astype(np.float32))
        values, vectors = values.astype(np.float64), vectors.astype(np.float64)
        floor = damping * max(float(np.mean(np.abs(values))), 1e-12)
        values = np.maximum(values, 0) + floor
        root = np.sqrt(values)
        sqrt = (vectors * root) @ vectors.T
        inv_sqrt = (vectors / root) @ vectors.T
        return cls(sqrt.astype(np.float32), inv_sqrt.astype(np.float32), covariance)

    @classmethod
    def pooled(cls, covariances, damping=1e-2):
        """One metric for a group: the trace-normalised mean covariance."""
        total = sum(c / max(np.trace(c), 1e-12) for c in covariances)
        return cls.from_covariance(total / len(covariances), damping)

    def apply(self, matrix):
        return self.sqrt @ matrix

    def unapply(self, matrix):
        return self.inv_sqrt @ matrix


def _apply(metric, matrix):
    return matrix if metric is None else metric.apply(matrix)


def _unapply(metric, matrix):
    return matrix if metric is None else metric.unapply(matrix)


def shared_basis(matrices, rank, side="input", metric=None, seed=0):
    """The group's shared basis (MICIK.md section 2).

    Input side: the top-`rank` left singular vectors of
    `[W_1/||W_1|| ... W_n/||W_n||]` (`m x rank`); the normalisation stops wide
    layers from owning the basis. Output side: the top-`rank` right singular
    vectors of the row-stacked matrices (`rank x n`).

    Args:
        matrices: the group's kernel matrices.
        rank: the common rank `r_c`.
        side: `"input"` or `"output"`.
        metric: input side only, a pooled `InputMetric` for the group, or a
            list of per-layer metrics on the output side.
    """
    if side == "input":
        scaled = [_apply(metric, w) for w in matrices]
        stacked = np.concatenate(
            [w / max(np.linalg.norm(w), 1e-12) for w in scaled], axis=1
        )
        u, _, _ = top_svd(stacked, rank, seed=seed)
        return _unapply(metric, u)
    metrics = metric if metric is not None else [None] * len(matrices)
    scaled = [_apply(p, w) for p, w in zip(metrics, matrices)]
    stacked = np.concatenate(
        [w / max(np.linalg.norm(w), 1e-12) for w in scaled], axis=0
    )
    _, _, vt = top_svd(stacked, rank, seed=seed)
    return vt


def coefficients(matrix, basis, side="input", metric=None):
    """Least-squares coefficients of `matrix` on a shared basis.

    Input side, `A = argmin ||P (W - B A)||` (`B^T W` when `B` is orthonormal
    and there is no metric). Output side, `A = W B^T` (the basis rows are
    orthonormal, so this is optimal under any input metric).
    """
    if side == "output":
        return matrix @ basis.T
    if metric is None:
        # The basis from `shared_basis` is orthonormal without a metric.
        return basis.T @ matrix
    a, *_ = np.linalg.lstsq(metric.apply(basis), metric.apply(matrix), rcond=None)
    return a.astype(np.float32)


def common_part(basis, coeffs, side="input"):
    return basis @ coeffs if side == "input" else coeffs @ basis


@dataclasses.dataclass
class Factors:
    """One layer's factors: `W_hat = common + unique_left @ unique_right`."""

    coefficients: np.ndarray | None
    unique_left: np.ndarray | None
    unique_right: np.ndarray | None
    approximation: np.ndarray


def factorize(matrix, rank_unique, basis=None, side="input", metric=None, seed=0):
    """Coefficients on `basis` (if any), then a truncated SVD of the residual.

    With a metric, the residual's SVD is taken in whitened space, so the unique
    part minimises the output error; the factors are balanced (`sqrt(S)` on
    each side), which trains better than putting all the scale on one side.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    coeffs = None
    approximation = np.zeros_like(matrix)
    if basis is not None and basis.size:
        coeffs = coefficients(matrix, basis, side, metric)
        approximation = common_part(basis, coeffs, side)
    left = right = None
    if rank_unique:
        u, s, vt = top_svd(_apply(metric, matrix - approximation), rank_unique, seed)
        root = np.sqrt(s)
        left = _unapply(metric, u * root)
        right = root[:, None] * vt
        if left.shape[1] < rank_unique:
            # The residual has lower rank than asked: pad with zeros so the
            # layer keeps the requested (and counted) shapes.
            pad = rank_unique - left.shape[1]
            left = np.pad(left, ((0, 0), (0, pad)))
            right = np.pad(right, ((0, pad), (0, 0)))
        approximation = approximation + left @ right
    return Factors(coeffs, left, right, approximation)


def residual_spectrum(matrix, basis, max_rank, side="input", metric=None, seed=0):
    """Squared error left after the common part and `r_u = 0..max_rank` ranks.

    Returns:
        `(errors, reference)`: `errors[r]` is `||P (W - W_hat_r)||^2` for the
        best unique part of rank `r` on top of the common part, and
        `reference` is `||P W||^2`, so `errors / reference` is the relative
        (output) error that the allocator balances.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    reference = float(np.sum(np.square(_apply(metric, matrix).astype(np.float64))))
    residual = matrix
    if basis is not None and basis.size:
        residual = matrix - common_part(
            basis, coefficients(matrix, basis, side, metric), side
        )
    whitened = _apply(metric, residual)
    total = float(np.sum(np.square(whitened.astype(np.float64))))
    s = singular_values(whitened, max_rank, seed)
    captured = np.concatenate([[0.0], np.cumsum(np.square(s.astype(np.float64)))])
    errors = np.maximum(total - captured, 0.0)
    if len(errors) < max_rank + 1:
        # The residual's rank was reached: further ranks add nothing.
        errors = np.pad(errors, (0, max_rank + 1 - len(errors)), mode="edge")
    return errors, reference


def common_rank_errors(matrix, basis, side="input", metric=None):
    """Squared error left by the common part alone, for every common rank.

    The basis from `shared_basis` is orthonormal in the (whitened) space the
    error is measured in: its columns (input side, `P B`) or its rows (output
    side). So the energy each basis vector captures adds up, and one
    projection gives the error at every rank `r_c = 0 .. basis rank`.

    Returns:
        `(errors, reference)`: `errors[r]` is `||P (W - W_hat_r)||^2` with a
        common part of rank `r`, and `reference` is `||P W||^2`.
    """
    whitened = _apply(metric, np.asarray(matrix, dtype=np.float32)).astype(np.float64)
    reference = float(np.sum(np.square(whitened)))
    if side == "input":
        projected = _apply(metric, basis).T.astype(np.float64) @ whitened  # (r, n)
        captured = np.sum(np.square(projected), axis=1)
    else:
        projected = whitened @ np.asarray(basis, dtype=np.float64).T  # (m, r)
        captured = np.sum(np.square(projected), axis=0)
    energy = np.concatenate([[0.0], np.cumsum(captured)])
    return np.maximum(reference - energy, 0.0), reference


def relative_error(matrix, approximation):
    matrix = np.asarray(matrix, dtype=np.float64)
    return float(
        np.linalg.norm(matrix - approximation) / max(np.linalg.norm(matrix), 1e-12)
    )

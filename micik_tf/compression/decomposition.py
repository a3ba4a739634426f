"""The linear algebra of MICIK: shared bases, coefficients and unique parts.

Every function works on kernel *matrices* `W_l` (`m x n_l`): a Conv2D kernel
`k x k x C_in x C_out` is reshaped to `(k*k*C_in, C_out)`, a Dense kernel is
used as it is. An optional `InputMetric` per layer turns the weight error
`||W - W_hat||` into the output error `||X W - X W_hat||` on calibration inputs
`X` (the data-aware initialisation of MICIK.md section 2).
"""

import dataclasses

import numpy as np

# Up to this size of the smaller side, the Gram matrix's full eigendecomposition
# is cheap (in float64); beyond it, the leading eigenpairs come from a
# randomized subspace iteration on the Gram matrix.
_EXACT_GRAM_MAX_SIDE = 1536
_OVERSAMPLE = 16
_POWER_ITERATIONS = 2


@dataclasses.dataclass
class Spectrum:
    """The leading singular values of a matrix `A` (`m x n`) and the singular
    vectors of its smaller side, with its total energy `||A||_F^2`.

    Attributes:
        values: the `k` largest singular values, in decreasing order.
        vectors: `n x k` right singular vectors when `m >= n`, else `m x k`
            left ones (the side of the Gram matrix that was decomposed).
        right: whether `vectors` are the right singular vectors.
        total: `||A||_F^2`, so `total - sum(values[:r]**2)` is the error of
            the best rank-`r` approximation for every `r`.
    """

    values: np.ndarray
    vectors: np.ndarray
    right: bool
    total: float

    @property
    def rank(self):
        return len(self.values)


def spectrum(matrix, k, seed=0):
    """The `k` leading singular triplets of `matrix` through its Gram matrix.

    `G = A^T A` (or `A A^T`, whichever is smaller) costs one matrix product;
    its eigenvectors are `A`'s singular vectors on that side and its
    eigenvalues the squared singular values. For a small `G`, or most of its
    spectrum, `G` is decomposed exactly (float64); otherwise a randomized
    subspace iteration (Halko et al. 2011) with two power steps finds the
    leading `k`, the power steps on `G` acting as four on `A`. On VGG-16's fc6
    (25088 x 4096) this replaces an SVD of minutes with seconds. The squaring
    loses what lies below about 1e-7 of the largest squared singular value,
    which no allocation or truncation here can tell from zero.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    m, n = matrix.shape
    right = m >= n
    gram = matrix.T @ matrix if right else matrix @ matrix.T
    return gram_spectrum(gram, right, k, seed)


def gram_spectrum(gram, right, k, seed=0, start=None):
    """`spectrum()` of a matrix from its Gram matrix on the smaller side
    (`right`: `A^T A`, else `A A^T`).

    `start`: leading eigenvectors of a nearby Gram matrix (the same layer's
    residual on another common rank), from which the subspace iteration
    starts with one power step instead of a random block with two."""
    p = gram.shape[0]
    k = int(min(k, p))
    total = float(np.trace(gram, dtype=np.float64))
    if k == 0:
        return Spectrum(np.zeros(0, np.float32), np.zeros((p, 0), np.float32), right, total)
    if p <= _EXACT_GRAM_MAX_SIDE or k + _OVERSAMPLE >= p // 2:
        values, vectors = np.linalg.eigh(gram.astype(np.float64))
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    else:
        values, vectors = _leading_eigenpairs(gram, k, seed, start)
    values = np.sqrt(np.maximum(values, 0.0)).astype(np.float32)
    return Spectrum(values, vectors.astype(np.float32), right, total)


def _leading_eigenpairs(gram, k, seed, start=None):
    """The `k` leading eigenpairs of a symmetric PSD matrix, by subspace
    iteration: LU-normalized power steps (Halko et al. 2011, as scikit-learn's
    randomized SVD does), then one orthonormalization and Rayleigh-Ritz.

    Householder QR of a tall block was the cost here (on a 4096 x 2048 block,
    6-18 s against under 1 s for LU and 3 s for CholeskyQR2)."""
    import scipy.linalg

    rng = np.random.default_rng(seed)
    width = min(k + _OVERSAMPLE, gram.shape[0])
    steps = _POWER_ITERATIONS
    if start is not None and start.size:
        # The nearby vectors first, random columns for the rest.
        start = np.asarray(start[:, :width], dtype=gram.dtype)
        extra = rng.standard_normal((gram.shape[0], width - start.shape[1])).astype(gram.dtype)
        block = gram @ np.concatenate([start, extra], axis=1)
        if start.shape[1] >= k:
            # Measured on 4096 x 4096 residual Grams: one step from the
            # vectors of the neighbouring common rank leaves 5-10x less
            # error in the captured energy than two from a random block.
            steps -= 1
    else:
        block = gram @ rng.standard_normal((gram.shape[0], width)).astype(gram.dtype)
    for _ in range(steps):
        # P L spans what the block spans, and is well conditioned.
        block = gram @ scipy.linalg.lu(block, permute_l=True, check_finite=False)[0]
    # In the Gram's own precision: a float64 `q` would copy a float32 Gram
    # to float64 and double the cost of the product.
    q = orthonormal(block).astype(gram.dtype)
    small = (q.T @ (gram @ q)).astype(np.float64)
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    return values, q @ vectors.astype(gram.dtype)


def orthonormal(block):
    """Orthonormal columns (float64) whose first `r` span the block's first
    `r` for every `r`, as a QR factorization's `Q`.

    CholeskyQR2 (two passes of `Y R^-1` with `R^T R = Y^T Y`): matrix
    products and a triangular solve, several times faster than Householder
    QR on tall blocks, and as accurate unless the block is nearly rank
    deficient, where Householder QR takes over.
    """
    import scipy.linalg

    q = np.asarray(block, dtype=np.float64)
    for step in range(2):
        try:
            r = scipy.linalg.cholesky(q.T @ q, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            return np.linalg.qr(np.asarray(block, dtype=np.float64))[0]
        diagonal = np.abs(np.diag(r))
        # CholeskyQR2 is accurate for a condition number up to about 1e8 in
        # float64; the first R's diagonal bounds it from below.
        if step == 0 and diagonal.min() <= 1e-7 * diagonal.max():
            return np.linalg.qr(q)[0]
        q = scipy.linalg.solve_triangular(r, q.T, trans="T", lower=False,
                                          check_finite=False).T
    return q


def kernel_matrix(kernel):
    """Reshapes a Dense or Conv2D kernel to its `m x n` matrix."""
    kernel = np.asarray(kernel)
    return kernel.reshape(-1, kernel.shape[-1])


def top_svd(matrix, k, seed=0, known=None):
    """The `k` leading singular triplets of `matrix`, `(u, s, vt)` with shapes
    `(m, k)`, `(k,)`, `(k, n)`.

    Args:
        known: a `Spectrum` of this very matrix with at least `k` values, to
            reuse (the planner computes one per layer).
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    found = known if known is not None and known.rank >= min(k, min(matrix.shape)) else (
        spectrum(matrix, k, seed))
    s = found.values[:k]
    vectors = found.vectors[:, :k]
    # The other side's vectors: A v / s (or A^T u / s); a zero singular
    # value gets a zero vector, which the factors then multiply by zero.
    safe = np.where(s > 0, s, 1.0)
    if found.right:
        u = (matrix @ vectors) / safe
        return u.astype(np.float32), s, vectors.T.copy()
    vt = (vectors.T @ matrix) / safe[:, None]
    return vectors.copy(), s, vt.astype(np.float32)


@dataclasses.dataclass
class InputMetric:
    """Whitening by the input covariance: `||X D||_F^2 = N ||P D||_F^2`.

    `C = X^T X / N` (damped, so that `P` is invertible) is factored as
    `C = P^T P`: `P` is the upper Cholesky factor of a full covariance, whose
    cost is a third of an eigendecomposition's and whose inverse is a
    triangular solve, or the square roots of a diagonal one (wide layers,
    whose `m x m` covariance would be too large, keep only the variance of
    each input feature).

    Attributes:
        factor: `P`, upper triangular (`m x m`), or the `m` square roots of
            the diagonal.
        covariance: the covariance it was made from (`m x m`, or its
            diagonal), undamped, in float32, for pooling a group's metrics
            (None for a pooled metric).
    """

    factor: np.ndarray
    covariance: np.ndarray | None
    # What was added to the covariance's diagonal before factoring (so that
    # `P` is invertible); `sparse_scores` takes it back out.
    floor: float = 0.0

    @property
    def diagonal(self):
        return self.factor.ndim == 1

    @classmethod
    def from_covariance(cls, covariance, damping=1e-2, keep=True):
        """From a full `m x m` covariance, or the `m` variances of a diagonal one.

        `keep`: hold on to the covariance for pooling (the caller's float32
        array itself, not a copy: on VGG-16 copies of every layer's
        covariance were 0.6 GB).
        """
        import scipy.linalg

        kept = np.asarray(covariance, dtype=np.float32) if keep else None
        covariance = np.asarray(covariance, dtype=np.float64)
        if covariance.ndim == 1:
            floor = damping * max(float(np.mean(np.abs(covariance))), 1e-12)
            damped = np.maximum(covariance, 0) + floor
            return cls(np.sqrt(damped).astype(np.float32), kept, floor)
        # Symmetrized and damped in float64, relative to the mean eigenvalue
        # (the trace over m), in place on the one float64 copy.
        damped = covariance + covariance.T
        damped *= 0.5
        floor = damping * max(float(np.trace(damped)) / len(damped), 1e-12)
        damped[np.diag_indices_from(damped)] += floor
        del covariance
        try:
            factor = scipy.linalg.cholesky(damped, lower=False, check_finite=False,
                                           overwrite_a=True)
        except np.linalg.LinAlgError:
            # Undamped and singular: a jitter of the same relative size.
            damped = kept.astype(np.float64)
            damped = (damped + damped.T) / 2
            damped[np.diag_indices_from(damped)] += floor + 1e-6 * np.mean(np.diag(damped) + floor)
            factor = scipy.linalg.cholesky(damped, lower=False)
        return cls(factor.astype(np.float32), kept, floor)

    @classmethod
    def pooled(cls, covariances, damping=1e-2):
        """One metric for a group: the trace-normalised mean covariance (not
        kept: a pooled metric is never pooled again)."""
        total = sum(c / max(float(np.sum(c) if c.ndim == 1 else np.trace(c)), 1e-12)
                    for c in covariances)
        return cls.from_covariance(total / len(covariances), damping, keep=False)

    def apply(self, matrix):
        if self.diagonal:
            return self.factor[:, None] * matrix
        return self.factor @ matrix

    def unapply(self, matrix):
        if self.diagonal:
            return matrix / self.factor[:, None]
        import scipy.linalg

        return scipy.linalg.solve_triangular(self.factor, matrix, lower=False,
                                             check_finite=False).astype(np.float32)


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
        u, _, _ = top_svd(_normalized_stack(matrices, [metric] * len(matrices), 1), rank, seed=seed)
        return _unapply(metric, u)
    metrics = metric if metric is not None else [None] * len(matrices)
    _, _, vt = top_svd(_normalized_stack(matrices, metrics, 0), rank, seed=seed)
    return vt


def _normalized_stack(matrices, metrics, axis):
    """`[P_1 W_1/||P_1 W_1|| ...]` stacked along `axis`, with one whitened copy
    of each kernel at a time (fc6's is 0.4 GB) rather than three."""
    parts = []
    for w, metric in zip(matrices, metrics):
        x = _apply(metric, w)
        scale = 1.0 / max(float(np.linalg.norm(x)), 1e-12)
        # In place on a whitened copy; never on the caller's kernel.
        parts.append(x * scale if x is w else np.multiply(x, scale, out=x, casting="unsafe"))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


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


# Rows per block where a kernel-sized float64 array would otherwise be built.
_BLOCK = 2048


@dataclasses.dataclass
class Factors:
    """One layer's factors: `W_hat = common + unique_left @ unique_right`,
    with `common = basis @ coefficients` (input side) or `coefficients @
    basis` (output side).

    They are small; `W_hat` itself (as large as the kernel: 0.4 GB for
    VGG-16's fc6) is built only on request, a block of rows at a time.
    """

    coefficients: np.ndarray | None
    unique_left: np.ndarray | None
    unique_right: np.ndarray | None
    basis: np.ndarray | None
    side: str
    shape: tuple
    relative_error: float = float("nan")
    # The sparse unique part (`m x n`, zeros where it is pruned), or None.
    sparse: np.ndarray | None = None

    def rows(self, start, stop):
        """Rows `start:stop` of `W_hat`, in float32."""
        block = np.zeros((min(stop, self.shape[0]) - start, self.shape[1]), np.float32)
        if self.coefficients is not None:
            if self.side == "input":
                block += self.basis[start:stop] @ self.coefficients
            else:
                block += self.coefficients[start:stop] @ self.basis
        if self.unique_left is not None:
            block += self.unique_left[start:stop] @ self.unique_right
        if self.sparse is not None:
            block += self.sparse[start:stop]
        return block

    @property
    def approximation(self):
        return self.rows(0, self.shape[0])


def factorize(matrix, rank_unique, basis=None, side="input", metric=None, seed=0, known=None):
    """Coefficients on `basis` (if any), then a truncated SVD of the residual.

    With a metric, the residual's SVD is taken in whitened space, so the unique
    part minimises the output error; the factors are balanced (`sqrt(S)` on
    each side), which trains better than putting all the scale on one side.
    `known`: the `Spectrum` of the whitened residual, if already computed.
    The returned factors carry `||W - W_hat|| / ||W||`.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    has_basis = basis is not None and basis.size
    coeffs = coefficients(matrix, basis, side, metric) if has_basis else None
    factors = Factors(coeffs, None, None, basis if has_basis else None, side, matrix.shape)
    if rank_unique:
        residual = matrix
        if has_basis:
            residual = matrix.copy()
            for start in range(0, len(matrix), _BLOCK):
                residual[start:start + _BLOCK] -= factors.rows(start, start + _BLOCK)
        u, s, vt = top_svd(_apply(metric, residual), rank_unique, seed, known)
        del residual
        root = np.sqrt(s)
        left = _unapply(metric, u * root)
        right = root[:, None] * vt
        if left.shape[1] < rank_unique:
            # The residual has lower rank than asked: pad with zeros so the
            # layer keeps the requested (and counted) shapes.
            pad = rank_unique - left.shape[1]
            left = np.pad(left, ((0, 0), (0, pad)))
            right = np.pad(right, ((0, pad), (0, 0)))
        factors.unique_left, factors.unique_right = left, right
    factors.relative_error = relative_error(matrix, factors)
    return factors


# An input whose energy is below this share of the metric's damping counts as
# always zero in `sparse_scores`.
DEAD_INPUT = 1e-4


def sparse_scores(residual, metric=None):
    """What keeping each entry of a residual `R` alone gains in the metric,
    flat, float64: `||P R||^2 - min_s ||P (R - s e_ij)||^2 = (C R)_ij^2 / C_ii`
    with `C = P^T P` (the optimal brain surgeon's single-weight step).

    Without a metric that is `R_ij^2` (magnitude pruning); with a diagonal one
    `C_ii R_ij^2`, input `i`'s variance times the squared entry (Wanda's
    score, Sun et al. 2023). With a full one the cross terms count: an entry
    of a residual that the metric cannot see gains nothing.

    `C` is the covariance itself, without the metric's damping (`floor`):
    damped, an input that is always zero (a kernel tap that sees only
    padding, a dead channel) would score `floor * R_ij^2`, and win nonzeros
    where the low-rank part, fit in the metric, left its whole weight, though
    they change no output.
    """
    r = np.asarray(residual, dtype=np.float64)
    if metric is None:
        return np.square(r).ravel()
    floor = float(metric.floor)
    if metric.diagonal:
        energy = np.maximum(np.square(metric.factor.astype(np.float64)) - floor, 0.0)
        return (energy[:, None] * np.square(r)).ravel()
    p = metric.factor.astype(np.float64)
    gradient = p.T @ (p @ r) - floor * r  # C R
    energy = (np.sum(np.square(p), axis=0) - floor)[:, None]  # C_ii
    # Below this an input's energy is the float32 factor's rounding: none.
    seen = energy > DEAD_INPUT * max(floor, 1e-30)
    return np.divide(np.square(gradient), energy, out=np.zeros_like(gradient),
                     where=seen).ravel()


def sparse_part(residual, nonzeros, metric=None):
    """A sparse `S` (`m x n`, float32) with `nonzeros` entries fitting the
    residual: its support the entries of largest `sparse_scores`, its values
    the residual's own (no metric, or a diagonal one: then optimal) or, for a
    full metric, per column the least-squares fit `argmin ||P (r - s)||`
    on that support, which never does worse than `S = 0`."""
    residual = np.asarray(residual, dtype=np.float32)
    kept = np.zeros(residual.size, np.float32)
    nonzeros = int(min(max(nonzeros, 0), residual.size))
    if not nonzeros:
        return kept.reshape(residual.shape)
    scores = sparse_scores(residual, metric)
    # The lowest scores go first, earlier positions first among equals (as
    # `deploy.pruning` breaks ties).
    order = np.argsort(scores, kind="stable")[residual.size - nonzeros:]
    if metric is None or metric.diagonal:
        kept[order] = residual.ravel()[order]
        return kept.reshape(residual.shape)
    mask = np.zeros(residual.size, bool)
    mask[order] = True
    mask = mask.reshape(residual.shape)
    p = metric.factor.astype(np.float64)
    c = p.T @ p
    target = c @ residual.astype(np.float64)  # C r, per column
    out = np.zeros(residual.shape, np.float32)
    for j in np.flatnonzero(mask.any(axis=0)):
        rows = np.flatnonzero(mask[:, j])
        out[rows, j] = np.linalg.solve(c[np.ix_(rows, rows)], target[rows, j])
    return out


def energy(matrix, metric=None):
    """`||P M||^2` (float64)."""
    whitened = _apply(metric, np.asarray(matrix, dtype=np.float32))
    return float(np.sum(np.square(whitened, dtype=np.float64)))


def output_error(matrix, factors, metric=None):
    """`||P (W - W_hat)||^2 / ||P W||^2`: the relative squared (output) error
    of `factors` (weight error without a metric)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    squared = total = 0.0
    for start in range(0, matrix.shape[0], _BLOCK) if metric is None or metric.diagonal else [0]:
        stop = start + _BLOCK if metric is None or metric.diagonal else matrix.shape[0]
        rows = matrix[start:stop]
        difference = rows - factors.rows(start, stop)
        if metric is not None:
            if metric.diagonal:
                scale = metric.factor[start:stop, None]
                rows, difference = rows * scale, difference * scale
            else:
                rows, difference = metric.apply(rows), metric.apply(difference)
        squared += float(np.sum(np.square(difference), dtype=np.float64))
        total += float(np.sum(np.square(rows), dtype=np.float64))
    return squared / max(total, 1e-30)


class ResidualGrams:
    """One layer's whitened kernel `P W` and its Gram matrix, computed once,
    from which the residual's Gram after any basis follows by a low-rank
    update instead of a pass over the kernel.

    Input side, the best coefficients leave `R = (I - Q Q^T) P W`, with `Q` an
    orthonormal basis of `P B`; output side, `R = P W (I - B^T B)` (orthonormal
    basis rows). On the smaller side that is `G - C^T C` with `C = Q^T P W`
    (or `G - D D^T`, `D = P W B^T`), or the projection `L G L` of `G`: an
    `r x n` product per candidate basis, against the `m x n^2` Gram product of
    the residual itself (on VGG-16's fc6, seconds per candidate saved).
    """

    def __init__(self, matrix, side="input", metric=None):
        self.side, self.metric = side, metric
        w = _apply(metric, np.asarray(matrix, dtype=np.float32))
        m, n = w.shape
        self.right = m >= n
        # float32 like `spectrum()`'s Gram: G - C^T C is exact to about 1e-7
        # of ||W||^2 (rather than of the residual's energy), far below any
        # error the allocator weighs; float64 products here took 5x longer.
        self.gram = w.T @ w if self.right else w @ w.T
        self.reference = float(np.trace(self.gram, dtype=np.float64))
        # Only the `G - C^T C` forms read `P W` again, and only for a basis
        # (never for a layer alone in its group): it is recomputed then
        # rather than kept (fc6's is 0.4 GB).
        self._matrix, self._whitened = matrix, None
        self._basis = self._q = None  # the last basis and its orthonormal P B

    @property
    def whitened(self):
        """`P W`, computed on first use and then kept."""
        if self._whitened is None:
            self._whitened = _apply(self.metric, np.asarray(self._matrix, dtype=np.float32))
        return self._whitened

    def residual_gram(self, basis, rank=None):
        """The Gram matrix (on the smaller side) of the whitened residual
        after the best common part on `basis` (None: the kernel's own), or on
        its first `rank` vectors. Asked for several ranks of one basis, the
        input side orthonormalizes `P B` once and slices it."""
        if basis is None or not basis.size or rank == 0:
            return self.gram
        if self.side == "input":
            if basis is not self._basis:
                self._basis, self._q = basis, orthonormal(_apply(self.metric, basis)).astype(
                    np.float32)
            q = self._q[:, :rank]
            if self.right:  # R^T R = G - (Q^T W)^T (Q^T W)
                c = q.T @ self.whitened
                return self.gram - c.T @ c
            return _project_out(self.gram, q)  # R R^T = L G L
        b = np.asarray(basis[:rank], dtype=np.float32)  # rows orthonormal
        if self.right:  # R^T R = M G M, M = I - B^T B
            return _project_out(self.gram, b.T)
        d = self.whitened @ b.T  # R R^T = G - (W B^T)(W B^T)^T
        return self.gram - d @ d.T


def _project_out(gram, q):
    """`(I - Q Q^T) G (I - Q Q^T)` for orthonormal columns `Q`, in
    `O(p^2 r)`."""
    gq = gram @ q
    qgq = q.T @ gq
    return gram - q @ gq.T - gq @ q.T + q @ qgq @ q.T


def residual_spectrum(matrix, basis, max_rank, side="input", metric=None, seed=0,
                      grams=None, rank_common=None, start=None):
    """Squared error left after the common part and `r_u = 0..max_rank` ranks.

    Returns:
        `(errors, reference, spectrum)`: `errors[r]` is `||P (W - W_hat_r)||^2`
        for the best unique part of rank `r` on top of the common part,
        `reference` is `||P W||^2`, so `errors / reference` is the relative
        (output) error that the allocator balances, and `spectrum` is the
        whitened residual's `Spectrum` (which `factorize` may reuse).

    `grams`: this layer's `ResidualGrams` (with the same side and metric), to
    reuse across bases; `rank_common`: use the basis's first that many vectors;
    `start`: see `gram_spectrum`.
    """
    grams = grams if grams is not None else ResidualGrams(matrix, side, metric)
    reference = grams.reference
    found = gram_spectrum(grams.residual_gram(basis, rank_common), grams.right, max_rank, seed,
                          start)
    captured = np.concatenate([[0.0], np.cumsum(np.square(found.values.astype(np.float64)))])
    errors = np.maximum(found.total - captured, 0.0)
    if len(errors) < max_rank + 1:
        # The residual's rank was reached: further ranks add nothing.
        errors = np.pad(errors, (0, max_rank + 1 - len(errors)), mode="edge")
    return errors, reference, found


def common_rank_errors(matrix, basis, side="input", metric=None):
    """Squared error left by the common part alone, for every common rank.

    Input side: the best coefficients on the first `r` basis columns leave
    `||P W||^2 - ||Q_r^T P W||^2`, with `Q` an orthonormal basis of `P B`
    whose first `r` columns span the first `r` of `P B` (a QR factorization
    keeps that nesting), so one projection gives the error at every rank,
    whatever metric the basis itself was computed in. Output side: the basis
    rows are orthonormal and the coefficients `W B^T` do not depend on the
    metric, so the error is `||P W||^2 - ||P W B_r^T||^2`.

    Returns:
        `(errors, reference)`: `errors[r]` is `||P (W - W_hat_r)||^2` with a
        common part of rank `r`, and `reference` is `||P W||^2`.
    """
    whitened = _apply(metric, np.asarray(matrix, dtype=np.float32)).astype(np.float64)
    reference = float(np.sum(np.square(whitened)))
    if side == "input":
        q = orthonormal(_apply(metric, basis))
        captured = np.sum(np.square(q.T @ whitened), axis=1)
    else:
        projected = whitened @ np.asarray(basis, dtype=np.float64).T  # (m, r)
        captured = np.sum(np.square(projected), axis=0)
    energy = np.concatenate([[0.0], np.cumsum(captured)])
    return np.maximum(reference - energy, 0.0), reference


def relative_error(matrix, approximation, block=None):
    """`||W - W_hat|| / ||W||` for `W_hat` an array or `Factors`, a block of
    rows at a time (no full-size copy of either)."""
    squared = total = 0.0
    block = block or _BLOCK
    for start in range(0, matrix.shape[0], block):
        rows = np.asarray(matrix[start:start + block], dtype=np.float32)
        if isinstance(approximation, Factors):
            estimate = approximation.rows(start, start + block)
        else:
            estimate = approximation[start:start + block]
        # float32 differences, float64 sums: the error to 1e-6 at a third
        # of float64's cost on fc6.
        squared += float(np.sum(np.square(rows - estimate), dtype=np.float64))
        total += float(np.sum(np.square(rows), dtype=np.float64))
    return float(np.sqrt(squared) / max(np.sqrt(total), 1e-12))

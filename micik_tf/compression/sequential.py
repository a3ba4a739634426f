"""Sequential calibration: each layer fit to the original layer's outputs from
the inputs that the already-compressed layers before it produce.

Fit one layer at a time, in the graph's order, and a layer's input `X_hat`
is no longer the original `X`: the layers before it are compressed. Fitting
`W_hat` to `X W` from `X_hat` (Zhang et al. 2015's "asymmetric"
reconstruction; the order GPTQ, SparseGPT and SVD-LLM calibrate in) lets
each layer correct the errors that reach it instead of adding its own:

    ||X_hat W_hat - X W||^2 = ||X_hat (W_hat - W*)||^2 + const,
    W* = W + C_hat^-1 (C_x - C_hat) W,   C_hat = X_hat^T X_hat / N,
                                          C_x = X_hat^T X / N,

so the rank-constrained fit is the ordinary one (`decomposition.factorize`,
`sparse_part`) of the target `W*` in the metric of `C_hat` (damped as every
metric is). Written as a correction of `W`, `W* = W` exactly where nothing
before the layer changed. The plain fit to the layer's own inputs is kept
beside it (`BLEND`): the metric becomes `C_hat + BLEND C` (`C = X^T X / N`)
and the target `W + (C_hat + BLEND C)^-1 (C_x - C_hat) W`, which stops a
layer from growing large weights to undo everything the layers before it
lost.

Both covariances are streamed over the calibration batches as
`calibration.collect_covariances` streams its own, from the same sampled
rows of `X` and `X_hat` (the same positions, drawn from one seed per chunk),
in bounded memory. The ranks, the nonzero counts and the shared bases stay
as the allocator planned them; each layer's coefficients, unique factors and
sparse values are refit. Layers wider than `calibration.FULL_COVARIANCE_MAX`
inputs keep their first fit.
"""

import gc

import numpy as np

from micik_tf.compression import calibration, decomposition

# The weight of the plain fit beside the sequential one: each layer minimises
# `||X_hat W_hat - X W||^2 + BLEND ||X W_hat - X W||^2`, whose optimum is
# `W* = W + M^-1 (C_x - C_hat) W` in the metric `M = C_hat + BLEND C`. With
# BLEND = 0 (the pure asymmetric fit) the last layers of vgg_compact at 32x
# grew to 4-11x their kernels' norm in error to undo what the compressed
# layers before them lost, and trained badly: after 2 epochs of distillation
# on 6,000 images 0.33 test accuracy from a start of 0.24, against 0.54 from
# 0.09 without sequential calibration; BLEND = 1 reached 0.54 (from 0.17), 3
# 0.52 and 10 0.46 (one run each).
BLEND = 1.0


def refit(model, sites, factors, kernels, data, max_batches, seed=0,
          rows_per_image=calibration.ROWS_PER_IMAGE):
    """Refits `factors` (`{site name: Factors}`, replaced in the dict) site
    by site, in the order of `sites` (the graph's).

    Two copies of `model` run the calibration data: the original, and one
    whose site kernels become their compressed approximations as the pass
    goes on (layers kept dense keep their kernel), its BatchNorm statistics
    re-estimated after each change, as `compress()` re-estimates the
    compressed model's: otherwise a layer would be fit to undo a shift that
    the re-estimation removes anyway (measured on vgg_compact at 32x: weights
    40x the original's, and recovery stuck at 0.20 accuracy). Layers inside
    composite layers are reached as `calibration.InputTap` reaches them.
    """
    original = calibration.InputTap(model, sites)
    working = calibration.InputTap(model, sites)
    for site in sites:
        current = factors.get(site.name)
        if current is None:
            continue  # kept dense
        if site.m <= calibration.FULL_COVARIANCE_MAX:
            c_hat, cross, c = _statistics(model, site, original, working, data, max_batches,
                                          seed, rows_per_image)
            current = factors[site.name] = refit_layer(kernels[site.name], current, c_hat,
                                                       cross, c, seed=seed)
        working.layers[site.name].kernel.assign(
            site.kernel_from_matrix(current.approximation))
        calibration.recalibrate_batchnorm(working.model, data, max_batches)
        working.captured.clear()  # what held layers' recorders saw meanwhile
    del original, working
    gc.collect()  # the copies sit in reference cycles


def _statistics(model, site, original, working, data, max_batches, seed, rows_per_image):
    """`(C_hat, C_x, C)` of one site over the calibration data."""
    c_hat = cross = c = None
    count = 0
    size = calibration.chunk_size(model)
    for index, chunk in enumerate(calibration.chunks(data, max_batches, model, size)):
        xs = [v for k, v in original(chunk) if k == site.name]
        hats = [v for k, v in working(chunk) if k == site.name]
        for call, (x, x_hat) in enumerate(zip(xs, hats)):
            # The same positions in both: one generator state per chunk and call.
            state = [seed, index, call]
            rows = calibration.sampled_rows(site, x, rows_per_image,
                                            np.random.default_rng(state)).astype(np.float32)
            rows_hat = calibration.sampled_rows(site, x_hat, rows_per_image,
                                                np.random.default_rng(state)).astype(np.float32)
            if c_hat is None:
                c_hat, cross, c = rows_hat.T @ rows_hat, rows_hat.T @ rows, rows.T @ rows
            else:
                c_hat += rows_hat.T @ rows_hat
                cross += rows_hat.T @ rows
                c += rows.T @ rows
            count += len(rows)
    return c_hat / count, cross / count, c / count


def refit_layer(matrix, factors, c_hat, cross, c=None, blend=BLEND, seed=0):
    """The factors of one layer refit to the target `W*` in the metric
    `M = C_hat + blend C` (see `BLEND`), with the same basis, unique rank and
    nonzero count."""
    import scipy.linalg

    matrix = np.asarray(matrix, dtype=np.float32)
    combined = c_hat if c is None or not blend else c_hat + blend * c
    metric = decomposition.InputMetric.from_covariance(combined, keep=False)
    # (M + damping) = P^T P, the metric's own factor.
    correction = scipy.linalg.cho_solve(
        (metric.factor.astype(np.float64), False),
        (cross.astype(np.float64) - c_hat.astype(np.float64)) @ matrix.astype(np.float64),
        check_finite=False)
    target = (matrix + correction).astype(np.float32)
    rank_unique = 0 if factors.unique_left is None else factors.unique_left.shape[1]
    refit = decomposition.factorize(target, rank_unique, factors.basis, factors.side, metric,
                                    seed)
    if factors.sparse is not None:
        refit.sparse = decomposition.sparse_part(
            target - refit.approximation, np.count_nonzero(factors.sparse), metric)
    refit.relative_error = decomposition.relative_error(matrix, refit)
    return refit

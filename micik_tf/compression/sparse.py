"""Sparse unique parts: `W_l ~= B_g A_l + U_l V_l + S_l`, with `S_l` sparse.

`compress(unique="sparse")` spends one parameter budget on the low-rank
parts (the shared bases, coefficients and unique factors that the rank
allocator chooses) and on nonzeros of each layer's residual `R_l = W_l -
B_g A_l - U_l V_l`. Every nonzero, basis entry and coefficient counts one
parameter.

Nonzeros are spent across all layers by one global rule: each layer's
residual entries, the one whose keeping lowers the output error most first
(`decomposition.sparse_scores`: the squared entry without calibration data),
bring the allocator's objective down by a marginal gain (`marginal_gains`),
and the budget goes to the largest gains of the whole model. The gains fall
along each layer's entries, so without calibration data (or with a diagonal
metric) this is the exact optimum of the allocator's objective for the given
low-rank parts; with a full metric the entries' gains interact, the values
on the chosen support are refit by least squares (`decomposition.
sparse_part`), and the objective is measured exactly afterwards. With the
`"log_energy"` objective and no low-rank part, a gain is `-log(1 - x)` of
the entry's LAMP score `x` (Lee et al. 2021), so the rule is global LAMP
magnitude pruning, the `deploy.pruning` baseline.

The split of the budget between low rank and nonzeros is searched over
`SHARES` (the nonzeros' share): share 0 is plain MICIK, share 1 plain
pruning, and the share whose allocation has the lowest objective wins, so by
the allocator's own measure the sparse mode starts no worse than either.

Recovery may keep the masks compress() chose, or start from the whole
residuals (`fill_residuals`: the compressed model computes the original's
function again) and prune them back to the budget gradually, as the pruning
baseline prunes the original (`deploy.pruning.from_residuals`).
"""

import keras
import numpy as np

from micik_tf.compression import allocation as alloc
from micik_tf.compression import decomposition
from micik_tf.compression.grouping import basis_layer, graph_bases, owner_of, walk_deep
from micik_tf.layers import FACTORIZED

# The nonzeros' shares of the budget that the split search tries. MICIK.md
# section 6 measured the best fixed share on VGG-16 between 25% and 50% at 8x
# and 25% at 4x, with 75% worse than pruning alone: the grid is finer there.
SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def marginal_gains(scores, reference, retained, objective):
    """The objective's decrease from each next nonzero of one layer.

    Args:
        scores: the residual's `sparse_scores`, sorted in decreasing order.
        reference: `||P W||^2`, the layer's energy.
        retained: the energy the low-rank parts already retain,
            `||P W||^2 - ||P R||^2` (0 without them).
        objective: one of `allocation.OBJECTIVES`.

    Returns:
        A non-increasing float64 array: entry `k` is what keeping the
        `k+1`-th largest entry gains (`inf` for a layer's first entry when
        nothing else retains any of its energy: LAMP's score 1).
    """
    if objective == "sum_error":
        return scores / max(reference, 1e-30)
    # cost = -log(retained fraction); a kept entry adds its energy.
    kept = retained + np.cumsum(scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(kept > 0, scores / kept, 0.0)
        return -np.log1p(-np.minimum(fraction, 1.0))


def allocate_nonzeros(gains, budget):
    """`{layer: nonzeros}` spending `budget` nonzeros on the largest gains.

    Args:
        gains: `{layer name: marginal_gains array}`.
        budget: the number of nonzeros to spend (clipped to what exists).
    """
    names = list(gains)
    sizes = [len(gains[name]) for name in names]
    budget = int(min(max(budget, 0), sum(sizes)))
    if not budget:
        return {name: 0 for name in names}
    flat = np.concatenate([gains[name] for name in names])
    # The `budget` largest gains (their order among themselves is irrelevant).
    chosen = np.argpartition(-flat, budget - 1)[:budget]
    owner = np.repeat(np.arange(len(names)), sizes)
    counts = np.bincount(owner[chosen], minlength=len(names))
    return {name: int(count) for name, count in zip(names, counts)}


def spend(factors, kernels, metrics, budget, objective):
    """Adds sparse parts to `factors` (`{site name: Factors}`, the low-rank
    parts; layers kept dense are not in it), spending `budget` nonzeros.

    Returns:
        `(objective, {site name: nonzeros})`: the allocator's objective of the
        result (the sum of the layers' costs of their output errors, exact in
        the metric) and the nonzeros of each layer.
    """
    gains, residuals = {}, {}
    for name, f in factors.items():
        residuals[name] = np.asarray(kernels[name], np.float32) - f.approximation
        scores = np.sort(decomposition.sparse_scores(residuals[name], metrics[name]))[::-1]
        reference = decomposition.energy(kernels[name], metrics[name])
        retained = reference - decomposition.energy(residuals[name], metrics[name])
        gains[name] = marginal_gains(scores, reference, max(retained, 0.0), objective)
    counts = allocate_nonzeros(gains, budget)
    total = 0.0
    for name, f in factors.items():
        f.sparse = decomposition.sparse_part(residuals[name], counts[name], metrics[name])
        error = decomposition.output_error(kernels[name], f, metrics[name])
        total += float(alloc.layer_cost(np.array([error]), objective)[0])
    return total, counts


def fill_residuals(model, original):
    """Gives every sparse unique part of `model` (in place) the whole
    residual of its layer in `original`: `S_l = W_l - B_g A_l - U_l V_l`,
    dense, so that each factorized layer computes the original layer again.

    Args:
        model: a model `compress(original, unique="sparse")` made (or a
            copy of one, loaded from `.keras`); layers matched by path.
        original: the model it was compressed from.

    Returns:
        The number of sparse parts filled.

    Raises:
        ValueError: if `model` has no sparse unique part, or one of its
            layers has no kernel of the same shape at its path in `original`.
    """
    kernels = {"/".join(path): layer for layer, path, _, _ in walk_deep(original)
               if getattr(layer, "kernel", None) is not None}
    bases = graph_bases(model)
    filled = 0
    for layer, path, block, _ in walk_deep(model):
        if not (isinstance(layer, FACTORIZED) and layer.sparse):
            continue
        name = "/".join(path)
        source = kernels.get(name)
        if source is None or tuple(source.kernel.shape) != tuple(layer.kernel_shape()):
            raise ValueError(
                f"Layer '{name}' has no kernel of shape {tuple(layer.kernel_shape())} "
                "at the same path in the original model: pass the model it was "
                "compressed from.")
        basis = None
        if layer.rank_common:
            held = basis_layer(layer, owner_of(path, block), bases)
            basis = keras.ops.convert_to_numpy(held.basis)
        gap = keras.ops.convert_to_numpy(source.kernel) - layer.reconstruct_kernel(basis)
        layer.sparse_kernel.assign(
            keras.ops.convert_to_numpy(layer.sparse_kernel) + layer.matrix_from_kernel(gap))
        filled += 1
    if not filled:
        raise ValueError(
            f"Model '{model.name}' has no sparse unique part to fill: compress it "
            "with unique='sparse' (and a share of nonzeros above 0).")
    return filled

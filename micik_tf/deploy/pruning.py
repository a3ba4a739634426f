"""Magnitude pruning of MICIK factors, native to Keras 3.

MICIK.md section 1.3: pruning applies on top of the compressed factors. This
module prunes the factor variables themselves (each `SharedBasis.basis` and
the wrappers' `coefficients`, `unique_left`, `unique_right`; optionally the
kernels of Dense/Conv2D layers left untouched by `compress()`), with the
schedule semantics of tensorflow-model-optimization (tfmot), but without its
wrapper layers: tfmot works on tf_keras only, and its wrappers override
private Keras internals (see STYLE.md).

Inside a custom loop's compiled step (as `RecoveryTrainer` does), so that
pruning costs no round trip to the host:

    pruner = MagnitudePruner(student, PolynomialDecay(0.0, 0.8, 0, 1000))

    @tf.function
    def train_step(x, y, step):
        strategy.run(replica_step, args=(x, y))  # forward, backward, apply
        pruner.step(step)  # new masks on the schedule's steps; zeros kept

The masks are variables beside the model (not Keras weights of it); the
schedule, the ranking and the masking are TensorFlow ops, so `step()` traces
into the step. Outside a compiled step, `update(step)`, `prune_to(sparsity)`
and `apply()` do the same eagerly. All of them run in the cross-replica
context (outside `strategy.run`): assigning to a mirrored variable there
updates every replica.
"""

import numbers

import numpy as np

import keras
import tensorflow as tf
from keras import ops

from micik_tf.compression.grouping import walk_deep
from micik_tf.layers import FACTORIZED, SharedBasis
from micik_tf.recovery.strategies import in_replica_context
from micik_tf.validation import fraction, int_at_least, one_of, positive_float

FACTOR_NAMES = ("coefficients", "unique_left", "unique_right", "sparse_kernel")
# The sparse unique parts (`compress(unique="sparse")`), whose zeros are their masks.
SPARSE_NAMES = ("sparse_kernel",)


class _Schedule:
    """Step gating shared by the schedules (tfmot's `_should_prune_in_step`)."""

    def __init__(self, begin_step, end_step, frequency, allow_forever):
        self.begin_step = int_at_least("begin_step", begin_step, 0)
        if allow_forever and end_step == -1:
            self.end_step = -1
        else:
            if (
                isinstance(end_step, bool)
                or not isinstance(end_step, numbers.Integral)
                or end_step <= self.begin_step
            ):
                expected = "-1 or an integer" if allow_forever else "an integer"
                raise ValueError(
                    f"Received an invalid value for `end_step`, expected "
                    f"{expected} > begin_step={self.begin_step}. "
                    f"Received: end_step={end_step!r}"
                )
            self.end_step = int(end_step)
        self.frequency = int_at_least("frequency", frequency, 1)

    def should_prune(self, step):
        """True when `begin <= step <= end` (no end when `end_step == -1`)
        and `(step - begin) % frequency == 0`."""
        step = int(step)
        in_range = step >= self.begin_step and (
            self.end_step == -1 or step <= self.end_step
        )
        return in_range and (step - self.begin_step) % self.frequency == 0

    def __call__(self, step):
        """Returns `(should_prune, sparsity)` for a global step."""
        return self.should_prune(step), self.sparsity(int(step))

    def tensors(self, step):
        """`(should_prune, sparsity)` as TensorFlow tensors of a step tensor,
        with the same values as `__call__`, for use inside a compiled step."""
        step = tf.cast(step, tf.int64)
        in_range = step >= self.begin_step
        if self.end_step != -1:
            in_range = tf.logical_and(in_range, step <= self.end_step)
        due = tf.equal(tf.math.floormod(step - self.begin_step, self.frequency), 0)
        return tf.logical_and(in_range, due), self.sparsity_tensor(step)


class PolynomialDecay(_Schedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` (tfmot's).

        p = clip((step - begin_step) / (end_step - begin_step), 0, 1)
        sparsity = final + (initial - final) * (1 - p) ** power

    Pruning happens only when `begin_step <= step <= end_step` and
    `(step - begin_step) % frequency == 0`.

    Args:
        initial_sparsity: sparsity at `begin_step`, in [0, 1).
        final_sparsity: sparsity from `end_step` on, in [0, 1).
        begin_step: first step that prunes (>= 0).
        end_step: last step that prunes (> `begin_step`).
        power: exponent of the decay (3: fast early, slow late).
        frequency: prune every `frequency` steps (>= 1).
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step,
                 power=3, frequency=100):
        self.initial_sparsity = fraction("initial_sparsity", initial_sparsity)
        self.final_sparsity = fraction("final_sparsity", final_sparsity)
        self.power = positive_float("power", power)
        super().__init__(begin_step, end_step, frequency, allow_forever=False)

    def sparsity(self, step):
        p = (step - self.begin_step) / (self.end_step - self.begin_step)
        p = min(1.0, max(0.0, p))
        return float(
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power
        )

    def sparsity_tensor(self, step):
        p = tf.cast(step - self.begin_step, tf.float64) / (self.end_step - self.begin_step)
        p = tf.clip_by_value(p, 0.0, 1.0)
        return self.final_sparsity + (
            self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power


class KeepMasks:
    """A schedule that never prunes: the masks stay as they were set (by
    `masks_from_weights()`), and `step()`/`apply()` only keep their zeros."""

    final_sparsity = 0.0
    end_step = 0

    def __call__(self, step):
        return False, 0.0

    def tensors(self, step):
        return tf.constant(False), tf.constant(0.0, tf.float64)


class ConstantSparsity(_Schedule):
    """One sparsity, re-applied every `frequency` steps (tfmot's).

    Args:
        target_sparsity: the sparsity, in [0, 1).
        begin_step: first step that prunes (>= 0).
        end_step: last step that prunes (> `begin_step`), or -1: no end.
        frequency: prune every `frequency` steps (>= 1).
    """

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        self.target_sparsity = fraction("target_sparsity", target_sparsity)
        super().__init__(begin_step, end_step, frequency, allow_forever=True)

    def sparsity(self, step):
        return self.target_sparsity

    def sparsity_tensor(self, step):
        return tf.constant(self.target_sparsity, tf.float64)


# Gradual pruning during recovery (`gradual_schedule`): the sparsity rises over
# this share of the steps, in PRUNING_INCREMENTS steps; the rest of recovery
# heals the network at the final sparsity.
PRUNING_SHARE = 0.7
PRUNING_INCREMENTS = 10


def gradual_schedule(target, total_steps):
    """tfmot's usual recipe: a `PolynomialDecay` from 0 to `target` over the
    first `PRUNING_SHARE` of `total_steps`, pruning `PRUNING_INCREMENTS` times."""
    end = max(1, int(PRUNING_SHARE * total_steps))
    frequency = max(1, end // PRUNING_INCREMENTS)
    return PolynomialDecay(0.0, target, begin_step=0,
                           end_step=frequency * max(1, end // frequency), frequency=frequency)


def from_residuals(model, total_steps):
    """The pruner of `--sparse_masks=gradual`: takes a model's sparse unique
    parts from dense back to the nonzeros they hold now, on
    `gradual_schedule` with one global threshold on LAMP scores, as the
    pruning baseline prunes the original model. Create it while the parts
    hold their budget (before `compression.sparse.fill_residuals`), under
    the model's `strategy.scope()`. None if the model has no sparse part."""
    variables = prunable_variables(model, factors=SPARSE_NAMES)
    if not variables:
        return None
    values = [ops.convert_to_numpy(v) for _, v in variables]
    zeros = sum(int(np.count_nonzero(v == 0)) for v in values)
    target = zeros / sum(v.size for v in values)
    return MagnitudePruner(model, gradual_schedule(target, total_steps),
                           scope="lamp", factors=SPARSE_NAMES)


def prunable_variables(model, include_dense_kernels=False, factors=FACTOR_NAMES):
    """The variables magnitude pruning acts on, as `(name, variable)` pairs.

    These are the factors of every `SharedBasis` (its `basis`) and of every
    factorized wrapper (`coefficients`, `unique_left`, `unique_right`),
    found recursively through nested models. A variable appears once even
    when reached twice (a shared basis is one variable). Biases are never
    pruned. The name is the variable's Keras `path`.

    Args:
        model: a built Keras model, typically one `micik_tf.compress()` made.
        include_dense_kernels: also list the `kernel` of plain `Dense` and
            `Conv2D` layers (those `compress()` left untouched).
        factors: which of the wrappers' factor variables (`FACTOR_NAMES`)
            to list; a SharedBasis's basis only when "coefficients" is
            among them.
    """
    found, seen_vars = [], set()

    def add(variable):
        if variable is not None and id(variable) not in seen_vars:
            seen_vars.add(id(variable))
            found.append((variable.path, variable))

    # Layers held inside composite layers (CompressedBlock) included.
    for layer, _, _, _ in walk_deep(model):
        if not layer.built:
            continue
        with_bases = "coefficients" in factors
        if isinstance(layer, SharedBasis):
            if with_bases:
                add(layer.basis)
        elif isinstance(layer, FACTORIZED):
            if layer.holds_basis and with_bases:
                add(layer.shared_basis.basis)
            for name in factors:
                add(getattr(layer, name, None))
        elif include_dense_kernels and isinstance(
            layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
                    keras.layers.Conv2D)
        ):
            add(layer.kernel)
    return found


SCOPES = ("layer", "lamp")


def lamp_scores(weights):
    """LAMP scores of one variable (Lee et al. 2021, "Layer-adaptive Sparsity
    for the Magnitude-based Pruning"): each entry's squared magnitude divided
    by the sum of the squared magnitudes of the entries at least as large,
    as a flat float64 tensor.

    The largest entry of every variable scores 1, so pruning by one global
    threshold on these scores never removes a whole layer, and each layer's
    sparsity follows how much of its energy the pruned entries hold.
    """
    squared = tf.reshape(tf.square(tf.cast(weights, tf.float64)), [-1])
    order = tf.argsort(squared, stable=True)
    ascending = tf.gather(squared, order)
    at_least = tf.reverse(tf.cumsum(tf.reverse(ascending, [0])), [0])
    return tf.scatter_nd(order[:, None], ascending / tf.maximum(at_least, 1e-30),
                         tf.shape(squared, out_type=order.dtype))


class MagnitudePruner:
    """Zeroes the smallest-magnitude entries of the prunable variables.

    With `scope="layer"` (tfmot's way) each prunable variable (see
    `prunable_variables`) is pruned to the schedule's sparsity on its own:
    at a pruning step, the `round(sparsity * size)` entries of smallest `|w|`
    are zeroed. With `scope="lamp"` one global threshold on the LAMP scores
    (`lamp_scores`) zeroes `round(sparsity * total)` entries across all the
    variables, so each layer gets the sparsity its weights call for. Ties are
    broken by position, so the result is deterministic and the count exact.
    Entries zeroed before score 0 and so stay pruned as the sparsity rises.

    Unlike tfmot there is nothing to strip: the model holds no wrappers, and
    the zeros live in its ordinary variables, so `.keras` files, exports and
    gzip pick them up directly. The masks are variables of this object, never
    Keras weights of the model; after a restart, `masks_from_weights()`
    rebuilds them from the zeros in a restored checkpoint. Create the pruner
    under the model's `strategy.scope()`.

    Args:
        model: a built model (e.g. from `micik_tf.compress()`).
        schedule: a `PolynomialDecay` or a `ConstantSparsity` (for `step()`
            inside a compiled step), or any callable
            `step -> (should_prune, sparsity)` (for `update()` only).
        include_dense_kernels: also prune kernels of plain Dense/Conv2D.
        factors: which factor variables to prune (see `prunable_variables`).
        scope: `"layer"` (every variable to the same sparsity) or `"lamp"`
            (one global threshold on LAMP scores).
    """

    def __init__(self, model, schedule, include_dense_kernels=False, scope="layer",
                 factors=FACTOR_NAMES):
        if not callable(schedule):
            raise ValueError(
                "Received an invalid value for `schedule`, expected a callable "
                f"`step -> (should_prune, sparsity)`. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.scope = one_of("scope", scope, SCOPES)
        self.variables = prunable_variables(model, include_dense_kernels, factors)
        if not self.variables:
            raise ValueError(
                f"Model '{model.name}' has no prunable variables: it holds no "
                "SharedBasis or factorized layer (compress it first, or pass "
                "include_dense_kernels=True)."
            )
        # 1 keeps an entry, 0 prunes it; `_pruned` says whether any mask is set.
        self._masks = [tf.Variable(tf.ones(v.shape, v.dtype), trainable=False,
                                   name=f"mask_{i}") for i, (_, v) in enumerate(self.variables)]
        self._pruned = tf.Variable(False, trainable=False, name="pruned")

    @classmethod
    def fixed_masks(cls, model):
        """A pruner that keeps the zeros of `model`'s sparse unique parts
        (`compress(unique="sparse")`) through training: the masks are the
        zeros as they are now, and are never recomputed. None if the model
        has no sparse part. Create it under the model's `strategy.scope()`."""
        if not prunable_variables(model, factors=SPARSE_NAMES):
            return None
        pruner = cls(model, KeepMasks(), factors=SPARSE_NAMES)
        pruner.masks_from_weights()
        return pruner

    @property
    def masks(self):
        """`{variable name: boolean numpy mask}` (True keeps), once pruning has
        begun; empty before."""
        if not bool(self._pruned.numpy()):
            return {}
        return {name: mask.numpy() != 0 for (name, _), mask in zip(self.variables, self._masks)}

    @property
    def final_sparsity(self):
        """The sparsity the schedule ends at."""
        return getattr(self.schedule, "final_sparsity", None) or getattr(
            self.schedule, "target_sparsity", 0.0)

    @property
    def final_step(self):
        """The step from which the schedule's final sparsity holds (0 if unknown)."""
        return max(getattr(self.schedule, "end_step", 0), 0)

    def step(self, step):
        """Inside a compiled step: new masks if the schedule prunes at `step`
        (a tensor), then the masks applied. Returns whether it pruned."""
        if not hasattr(self.schedule, "tensors"):
            raise TypeError("step() needs a PolynomialDecay or ConstantSparsity schedule; "
                            "call update() eagerly with other schedules.")
        should_prune, sparsity = self.schedule.tensors(step)
        tf.cond(should_prune, lambda: self._set_masks(sparsity), lambda: tf.constant(False))
        self._apply()
        return should_prune

    def update(self, step):
        """Eagerly: recomputes and applies the masks if the schedule prunes at
        `step`. Returns whether it pruned."""
        should_prune, sparsity = self.schedule(int(step))
        if not should_prune:
            return False
        self.prune_to(sparsity)
        return True

    def prune_to(self, sparsity):
        """Applies `sparsity` at once, whatever the schedule says."""
        self._check_context()
        self._set_masks(tf.constant(sparsity, tf.float64))
        self._apply()

    def masks_from_weights(self):
        """Sets each mask to the nonzero pattern of its variable (to resume
        pruning after restoring a checkpoint)."""
        for (_, variable), mask in zip(self.variables, self._masks):
            mask.assign(tf.cast(tf.not_equal(variable, 0), mask.dtype))
        self._pruned.assign(True)

    def reset(self):
        """Forgets the masks (every entry kept until the next pruning step)."""
        for mask in self._masks:
            mask.assign(tf.ones_like(mask))
        self._pruned.assign(False)

    def apply(self):
        """Multiplies each variable by its mask; call after every optimizer
        step so that pruned weights stay zero."""
        self._check_context()
        self._apply()

    def sparsity(self):
        """Fraction of exact zeros, read from the variables themselves.

        Returns:
            `{"overall": float, "variables": {name: float}}`; `overall`
            weighs each variable by its size.
        """
        per_variable, zeros, total = {}, 0, 0
        for name, variable in self.variables:
            value = ops.convert_to_numpy(variable)
            z = int(np.count_nonzero(value == 0))
            per_variable[name] = z / value.size
            zeros, total = zeros + z, total + value.size
        return {"overall": zeros / total, "variables": per_variable}

    def _set_masks(self, sparsity):
        if self.scope == "layer":
            for (_, variable), mask in zip(self.variables, self._masks):
                keep = _keep_largest(tf.reshape(tf.abs(variable), [-1]), sparsity)
                mask.assign(tf.reshape(tf.cast(keep, mask.dtype), tf.shape(mask)))
        else:
            scores = [lamp_scores(variable) for _, variable in self.variables]
            keep = _keep_largest(tf.concat(scores, axis=0), sparsity)
            for mask, part in zip(self._masks, tf.split(keep, [int(np.prod(m.shape))
                                                               for m in self._masks])):
                mask.assign(tf.reshape(tf.cast(part, mask.dtype), tf.shape(mask)))
        self._pruned.assign(True)
        return tf.constant(True)

    def _apply(self):
        for (_, variable), mask in zip(self.variables, self._masks):
            variable.assign(variable * mask)

    def _check_context(self):
        if in_replica_context():
            raise RuntimeError(
                "MagnitudePruner runs in the cross-replica context: call "
                "update()/apply() after `strategy.run(...)`, not inside it."
            )


class KeepSparseMasks(keras.callbacks.Callback):
    """Keeps the zeros of a model's sparse unique parts through `fit`: a
    `MagnitudePruner.fixed_masks` of `model` (default: the model being fit),
    applied after every training batch (in the cross-replica context, where
    `fit` runs callbacks). `micik_tf.Distiller.fit` adds one by itself."""

    def __init__(self, model=None):
        super().__init__()
        self.target = model
        self.pruner = None

    def on_train_begin(self, logs=None):
        target = self.target if self.target is not None else self.model
        with self.model.distribute_strategy.scope():
            self.pruner = MagnitudePruner.fixed_masks(target)

    def on_train_batch_end(self, batch, logs=None):
        if self.pruner is not None:
            self.pruner.apply()


def _keep_largest(scores, sparsity):
    """A boolean tensor keeping all but the `round(sparsity * size)` lowest
    scores (the earlier position goes first among equal scores)."""
    size = tf.size(scores)
    count = tf.cast(tf.round(tf.cast(sparsity, tf.float64) * tf.cast(size, tf.float64)), tf.int32)
    dropped = tf.argsort(scores, stable=True)[:count]
    return tf.tensor_scatter_nd_update(tf.ones([size], tf.bool), dropped[:, None],
                                       tf.zeros([count], tf.bool))


def sparsity_for_ratio(model, ratio):
    """The kernel sparsity at which `model`'s nonzero parameters are
    `count_params() / ratio`: the same number of stored parameters as a
    compressed model at `ratio`. Biases, BatchNorm and every other variable
    stay dense and count in full.

    Raises:
        ValueError: if even pruning every kernel entry cannot reach `ratio`.
    """
    kernels = sum(int(np.prod(v.shape)) for _, v in prunable_variables(model, True))
    total = model.count_params()
    sparsity = (total - total / ratio) / max(kernels, 1)
    if sparsity >= 1:
        raise ValueError(
            f"ratio={ratio:g} cannot be reached by pruning: {total - kernels:,} of "
            f"{total:,} parameters are not kernels. The largest reachable ratio is "
            f"{total / max(total - kernels, 1):.2f}."
        )
    return sparsity


def stored_parameters(model):
    """Parameters a pruned model stores: all but the zeros of its prunable
    kernels and factors (every other variable counts in full)."""
    zeros = sum(int(np.sum(ops.convert_to_numpy(v) == 0))
                for _, v in prunable_variables(model, True))
    return int(model.count_params()) - zeros

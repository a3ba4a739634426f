"""Quantization-aware training (QAT) of the weights, native to Keras 3.

MICIK.md section 1.3: quantization applies on top of the compressed factors.
Post-training int8 (`micik_tf.export`, format `tflite_int8`) rounds each
weight once, after training. QAT lets recovery training see that rounding:
every step runs forward and backward on int8-rounded weights, and the update
goes to float master weights (the straight-through estimator), so the weights
settle where rounding costs the least.

Like `micik_tf.deploy.pruning` this works on the model's own variables, without
wrapper layers: tfmot's QAT (`quantize_model`) exists for tf_keras (Keras 2)
models only, and Keras 3's `model.quantize("int8")` covers Dense, EinsumDense
and Embedding, not our factorized layers, and exports nothing TFLite can run
as int8. Inside a custom loop's compiled step (as `RecoveryTrainer` does):

    qat = WeightQuantizer(student, begin_step=700)

    @tf.function
    def train_step(x, y, step):
        rounded = qat.round_weights(step)  # variables <- round(master) from begin_step on
        strategy.run(replica_step, args=(x, y))  # gradients at the rounded weights
        qat.restore(rounded)  # master += the update; variables <- master

`before_step(step)` and `after_step()` do the same eagerly.

The rounding is TFLite's for int8 weights: symmetric, per output channel (the
last axis of a Keras kernel or factor), to the 255 levels -127..127 scaled by
the channel's largest magnitude; zero stays zero, so pruned weights stay
pruned. Activations are not fake-quantized: their int8 ranges are calibrated
at conversion (`representative_data`). Every call runs in the cross-replica
context, as the pruner's do; the float weights are kept in variables of this
object, so nothing leaves the device.
"""

import numpy as np
import tensorflow as tf

from micik_tf.deploy.pruning import prunable_variables
from micik_tf.recovery.strategies import in_replica_context
from micik_tf.validation import int_at_least, one_of

LEVELS = {8: 127}


def fake_quantize(weights, num_bits=8):
    """`weights` rounded to symmetric per-output-channel int8, as floats.

    Args:
        weights: a numpy array; its last axis is the output channel.
        num_bits: 8 (the only width TFLite's integer kernels take).
    """
    levels = LEVELS[num_bits]
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 0:
        return w
    reduce_axes = tuple(range(w.ndim - 1))
    scale = np.max(np.abs(w), axis=reduce_axes, keepdims=True) / levels
    safe = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / safe), -levels, levels) * safe).astype(np.float32)


def fake_quantize_tensor(weights, num_bits=8):
    """`fake_quantize` with TensorFlow ops (the same values), for a compiled step."""
    levels = LEVELS[num_bits]
    weights = tf.convert_to_tensor(weights)
    if weights.shape.rank == 0:
        return weights
    axes = list(range(weights.shape.rank - 1))
    scale = tf.reduce_max(tf.abs(weights), axis=axes, keepdims=True) / levels
    safe = tf.where(scale > 0, scale, tf.ones_like(scale))
    return tf.clip_by_value(tf.round(weights / safe), -levels, levels) * safe


class WeightQuantizer:
    """Straight-through int8 weight rounding during training.

    Args:
        model: a built model, typically one `micik_tf.compress()` made. The
            variables are those `micik_tf.deploy.pruning.prunable_variables` lists
            with `include_dense_kernels=True`: every shared basis (once),
            every factor, and the kernels of Dense/Conv2D layers left
            untouched. Biases stay float, as TFLite keeps them in int32.
        begin_step: the first step that trains on rounded weights (e.g. once
            pruning has reached its final sparsity).
        num_bits: 8.
    """

    def __init__(self, model, begin_step=0, num_bits=8):
        self.begin_step = int_at_least("begin_step", begin_step, 0)
        self.num_bits = one_of("num_bits", num_bits, LEVELS)
        self.variables = [v for _, v in prunable_variables(model, include_dense_kernels=True)]
        if not self.variables:
            raise ValueError(
                f"Model '{model.name}' has no Dense, Conv2D or factorized layer "
                "weights to quantize."
            )
        # The float weights while a step runs on their rounding.
        self._masters = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                     name=f"master_{i}") for i, v in enumerate(self.variables)]
        self._active = False

    @property
    def active(self):
        """Whether the variables hold rounded weights (between the eager calls)."""
        return self._active

    def round_weights(self, step):
        """Inside a compiled step: from `begin_step` on, keeps the float weights
        and puts their rounding into the variables. Returns whether it did (a
        tensor, for `restore`)."""
        def rounded():
            for variable, master in zip(self.variables, self._masters):
                master.assign(variable)
                variable.assign(fake_quantize_tensor(variable, self.num_bits))
            return tf.constant(True)

        return tf.cond(tf.cast(step, tf.int64) >= self.begin_step, rounded,
                       lambda: tf.constant(False))

    def restore(self, rounded):
        """Inside a compiled step: moves the step's update from the rounded
        weights onto the float ones, `master + (variable - round(master))`."""
        def moved():
            for variable, master in zip(self.variables, self._masters):
                update = variable - fake_quantize_tensor(master, self.num_bits)
                variable.assign(master + update)
            return tf.constant(True)

        tf.cond(rounded, moved, lambda: tf.constant(False))

    def before_step(self, step):
        """Eagerly, `round_weights`. Returns whether it rounded."""
        self._check_context()
        if self._active:
            raise RuntimeError("before_step() called twice without after_step().")
        self._active = bool(self.round_weights(tf.constant(int(step), tf.int64)))
        return self._active

    def after_step(self):
        """Eagerly, `restore` after a `before_step`."""
        self._check_context()
        self.restore(tf.constant(self._active))
        self._active = False

    def _check_context(self):
        if in_replica_context():
            raise RuntimeError(
                "WeightQuantizer runs in the cross-replica context: call "
                "before_step()/after_step() around `strategy.run(...)`, not inside it."
            )

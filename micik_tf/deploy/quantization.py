"""Quantization-aware training (QAT) of the weights, native to Keras 3.

MICIK.md section 1.3: quantization applies on top of the compressed factors.
Post-training int8 (`micik_tf.export`, format `tflite_int8`) rounds each
weight once, after training. QAT lets recovery training see that rounding:
every step runs forward and backward on int8-rounded weights, and the update
goes to float master weights (the straight-through estimator), so the weights
settle where rounding costs the least.

Like `micik_tf.pruning` this works on the model's own variables, without
wrapper layers: tfmot's QAT (`quantize_model`) exists for tf_keras (Keras 2)
models only, and Keras 3's `model.quantize("int8")` covers Dense, EinsumDense
and Embedding, not our factorized layers, and exports nothing TFLite can run
as int8. Inside a custom loop:

    qat = WeightQuantizer(student, begin_step=700)
    for step, (x, y) in enumerate(dataset, start=1):
        qat.before_step(step)  # variables <- round(master) from begin_step on
        train_step(x, y)       # gradients at the rounded weights, applied
        qat.after_step()       # master += the update; variables <- master

The rounding is TFLite's for int8 weights: symmetric, per output channel (the
last axis of a Keras kernel or factor), to the 255 levels -127..127 scaled by
the channel's largest magnitude; zero stays zero, so pruned weights stay
pruned. Activations are not fake-quantized: their int8 ranges are calibrated
at conversion (`representative_data`). Both calls run eagerly in the
cross-replica context, as the pruner's do.
"""

import numpy as np

from keras import ops

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


class WeightQuantizer:
    """Straight-through int8 weight rounding during training.

    Args:
        model: a built model, typically one `micik_tf.compress()` made. The
            variables are those `micik_tf.pruning.prunable_variables` lists
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
        self._master = None

    @property
    def active(self):
        """Whether the variables hold rounded weights (between the calls)."""
        return self._master is not None

    def before_step(self, step):
        """From `begin_step` on, keeps the float weights and puts their
        rounded values into the variables. Returns whether it did."""
        self._check_context()
        if self._master is not None:
            raise RuntimeError("before_step() called twice without after_step().")
        if int(step) < self.begin_step:
            return False
        self._master = [ops.convert_to_numpy(v) for v in self.variables]
        for variable, master in zip(self.variables, self._master):
            variable.assign(fake_quantize(master, self.num_bits))
        return True

    def after_step(self):
        """Moves the step's update from the rounded weights onto the float
        ones: `master + (variable - round(master))`."""
        self._check_context()
        if self._master is None:
            return
        for variable, master in zip(self.variables, self._master):
            update = ops.convert_to_numpy(variable) - fake_quantize(master, self.num_bits)
            variable.assign(master + update)
        self._master = None

    def _check_context(self):
        if in_replica_context():
            raise RuntimeError(
                "WeightQuantizer runs in the cross-replica context: call "
                "before_step()/after_step() around `strategy.run(...)`, not inside it."
            )

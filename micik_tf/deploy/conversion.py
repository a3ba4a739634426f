"""Converting a Keras model for deployment: SavedModel and TFLite.

TFLite files are converted from a SavedModel of a *conversion view* of the
model (`_SplitFactorized`): the converter folds constant subgraphs, and the
wrappers' `concat([B_g, U_l])` is one, so converting the model as it is would
copy the shared basis into every layer of its group. The view computes the
same function without ever concatenating the basis to another constant, so
the basis stays one tensor in the flatbuffer, read by every member.
"""

import re

import keras
import tensorflow as tf
from keras import ops

from micik_tf.compression import graph
from micik_tf.layers import FACTORIZED, FactorizedEinsumDense


class _SplitFactorized(keras.layers.Layer):
    """Computes a wrapper's output without `concat(shared basis, own factor)`.

    Input-side sharing: `concat(x*B, x*U) . [A; V]`, the activations are
    concatenated, not the basis; `[A; V]` is the layer's own and may be
    folded. Output-side sharing: `(x*C) . B + (x*U) . V`. It reads the
    wrapper's own variables, so nothing is copied.
    """

    def __init__(self, wrapped):
        super().__init__(name=wrapped.name, dtype=wrapped.dtype_policy)
        self.wrapped = wrapped

    def call(self, inputs):
        w = self.wrapped
        x, basis = inputs
        if w.shared_side == "input" and not isinstance(w, FactorizedEinsumDense):
            projected = ops.concatenate(
                [w.project(x, basis), w.project(x, w.unique_left)], axis=-1
            )
            y = w.combine(
                projected, ops.concatenate([w.coefficients, w.unique_right], axis=0)
            )
        else:
            # An einsum's projection may not end in its rank axis: two sums.
            common = ((basis, w.coefficients) if w.shared_side == "input"
                      else (w.coefficients, basis))
            y = ops.add(
                w.combine(w.project(x, common[0]), common[1]),
                w.combine(w.project(x, w.unique_left), w.unique_right),
            )
        if w.use_bias:
            y = ops.add(y, w.bias)
        return w.activation(y)


def conversion_view(model):
    """`model` with each shared-basis wrapper that also has a unique part
    replaced by a `_SplitFactorized` over the same variables."""
    views = {}

    def make_layer(layer, path):
        if (
            isinstance(layer, FACTORIZED)
            and layer.rank_common
            and layer.rank_unique
        ):
            if id(layer) not in views:
                views[id(layer)] = _SplitFactorized(layer)
            return views[id(layer)]
        return layer

    def call_layer(layer, path, args, kwargs):
        return layer(*args, **kwargs)

    return graph.rebuild(model, make_layer, call_layer)


def save_serving_model(model, directory):
    """A SavedModel with a `serve` endpoint and a `serving_default` signature.

    This is what `model.export(directory, format="tf_saved_model")` writes,
    except that the model is not `track()`ed: Keras 3.15 then stores every
    variable twice, once as the Keras variable and once as the `tf.Variable`
    the endpoint captured (keras-team/keras#23553), doubling the size. The
    endpoint's captures alone keep each variable, shared bases included, once.
    """
    source = model.inputs[0]
    spec = tf.TensorSpec(tuple(source.shape), source.dtype, name=_input_name(model))
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    archive.write_out(directory, verbose=False)


def _input_name(model):
    name = getattr(model.inputs[0], "name", None) or "inputs"
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


def convert_tflite(fmt, saved_model_dir, representative):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    # Builtins only: a model that needs Select TF (Flex) ops must fail here,
    # not on a device whose runtime has no Flex delegate.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt == "tflite_fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "tflite_int8_dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "tflite_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def samples():
            # One sample per step, as the calibrator expects.
            for i in range(len(representative)):
                yield [representative[i : i + 1]]

        converter.representative_dataset = samples
    try:
        return converter.convert()
    except Exception as error:  # ConverterError, or a quantizer RuntimeError
        message = str(error)
        ops_needed = sorted(set(re.findall(r"'tf\.(\w+)' op", message)))
        if ops_needed or "flex" in message.lower():
            raise ValueError(
                f"Format {fmt!r}: the model needs TensorFlow ops with no TFLite "
                f"builtin kernel ({', '.join(ops_needed) or 'see the converter log'}). "
                "export() converts to builtin ops only, so that the file runs "
                "in the plain LiteRT interpreter without the Flex delegate. "
                "Replace those ops in the model, or leave the TFLite formats out."
            ) from None
        first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        raise ValueError(f"Format {fmt!r}: TFLite conversion failed: {first[:300]}") from error

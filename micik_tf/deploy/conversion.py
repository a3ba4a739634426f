"""Converting a Keras model for deployment: SavedModel and TFLite.

SavedModels are traced within `basis_kept_apart()`: the TFLite converter
folds constant subgraphs, and the wrappers' `concat([B_g, U_l])` is one, so
converting the model as traced for training would copy the shared basis into
every layer of its group. Kept apart, the basis stays one tensor in the
flatbuffer, read by every member, wherever the wrapper sits (in the graph or
inside a composite layer).
"""

import re

import keras
import tensorflow as tf

from micik_tf.layers.factorized import basis_kept_apart


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
    with basis_kept_apart():
        archive.add_endpoint("serve", lambda x: model(x, training=False),
                             input_signature=[spec])
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

"""`export()` (`micik_tf.export`): a Keras model to deployment formats, each checked against it.

    results = micik_tf.export(
        compressed, "exported/", representative_data=train_images,
        check_data=test_images, check_labels=test_labels)

Every format writes one artifact into the output directory (`ARTIFACTS`). The
artifacts are first written under temporary names in that directory, run on
`check_data` and compared with the Keras model, and only then renamed into
place; a failure at any step removes the temporaries and leaves whatever was
there before untouched.

TFLite files are converted from a SavedModel of a *conversion view* of the
model (`_SplitFactorized`): the converter folds constant subgraphs, and the
wrappers' `concat([B_g, U_l])` is one, so converting the model as it is would
copy the shared basis into every layer of its group. The view computes the
same function without ever concatenating the basis to another constant, so
the basis stays one tensor in the flatbuffer, read by every member.
"""

import gzip
import io
import os
import re
import shutil
import tarfile
import tempfile
import uuid

import numpy as np

import keras
import tensorflow as tf
from keras import ops

from micik_tf import graph
from micik_tf.grouping import is_graph_model
from micik_tf.layers import FactorizedConv2D, FactorizedDense

FORMATS = (
    "keras",
    "saved_model",
    "tflite",
    "tflite_fp16",
    "tflite_int8_dynamic",
    "tflite_int8",
)
DEFAULT_FORMATS = ("keras", "saved_model", "tflite", "tflite_fp16", "tflite_int8")
# The artifact each format writes inside the output directory.
ARTIFACTS = {
    "keras": "model.keras",
    "saved_model": "saved_model",
    "tflite": "model_float32.tflite",
    "tflite_fp16": "model_float16.tflite",
    "tflite_int8_dynamic": "model_int8_dynamic.tflite",
    "tflite_int8": "model_int8.tflite",
}
# Calibration samples for full-integer quantization: the converter's guidance
# is ~100, fed one at a time; more adds time, not accuracy, on small inputs.
REPRESENTATIVE_SAMPLES = 100
# Samples of representative_data (or random inputs) checked when no
# check_data is given.
DEFAULT_CHECK_SAMPLES = 32
# Batch size for running the Keras model and the artifacts on check_data.
CHECK_BATCH = 64
# Temporary artifacts start with this, so that a listing shows what they are.
TEMP_PREFIX = ".tmp-export-"


def artifact_paths(path, formats=DEFAULT_FORMATS):
    """Returns `{format: artifact path}` for an export into directory `path`."""
    return {f: os.path.join(path, ARTIFACTS[f]) for f in _check_formats(formats)}


def export(
    model,
    path,
    formats=DEFAULT_FORMATS,
    representative_data=None,
    overwrite=False,
    check_data=None,
    check_labels=None,
):
    """Exports `model` to deployment formats and checks each against it.

    Args:
        model: a built Sequential or Functional `keras.Model` with one input
            and one output, e.g. one returned by `micik_tf.compress()`.
        path: the output directory (created if missing). Each format writes
            one artifact in it, named by `ARTIFACTS`: `model.keras`,
            `saved_model/` (Keras' `model.export`, with a `serve` endpoint
            and a `serving_default` signature), `model_float32.tflite`,
            `model_float16.tflite`, `model_int8_dynamic.tflite` (int8
            weights, float activations) and `model_int8.tflite` (int8
            weights and activations, float32 inputs and outputs).
        formats: names from `FORMATS`.
        representative_data: model inputs for calibrating `"tflite_int8"`
            (required for it): an array (one sample or a batch), an
            `(x, y)` pair, or a `tf.data.Dataset` of `x` or `(x, y)`,
            batched or not. The first `REPRESENTATIVE_SAMPLES` are used.
        overwrite: replace artifacts that already exist. Without it, an
            existing artifact raises `FileExistsError` before anything is
            written.
        check_data: inputs to compare the artifacts with the model on, in
            the same forms as `representative_data` (all of it is used; a
            Dataset's labels serve as `check_labels`). Default: the first
            `DEFAULT_CHECK_SAMPLES` of `representative_data`, else as many
            uniform random inputs in `[0, 1)`.
        check_labels: class ids (or one-hot rows) of `check_data`; when
            known, each artifact's top-1 accuracy is recorded.

    Returns:
        `{format: result}`, each result a dict with `path`, `bytes` (the
        file, or the sum of the SavedModel's files), `gzip_bytes` (gzip -9 of
        the file, or of a tar of the SavedModel directory), `max_abs_error`
        and `relative_error` (`||a - k|| / ||k||`, `k` the Keras model's
        outputs), `accuracy` (or None) and `bytes_per_parameter` (`bytes /
        model.count_params()`, which counts a shared basis once).

    Raises:
        FileExistsError: an artifact exists and `overwrite` is False.
        ValueError: an unknown format, a model or data of the wrong kind,
            `"tflite_int8"` without `representative_data`, or a model that
            needs TensorFlow ops TFLite has no builtin kernel for.
    """
    formats = _check_formats(formats)
    input_spec = _check_model(model)
    if "tflite_int8" in formats and representative_data is None:
        raise ValueError(
            "Format 'tflite_int8' (full-integer quantization) needs "
            "`representative_data`: about 100 typical model inputs, e.g. "
            "training images, to calibrate the activation ranges. Pass it, "
            "or use 'tflite_int8_dynamic' (weights only) instead."
        )
    representative = None
    if representative_data is not None:
        representative, _ = _collect(
            representative_data, input_spec, "representative_data", REPRESENTATIVE_SAMPLES
        )
    check_x, check_y = _check_inputs(check_data, check_labels, representative, input_spec)

    path = os.fspath(path)
    targets = {f: os.path.join(path, ARTIFACTS[f]) for f in formats}
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"Output directory {path!r} is an existing file. Give a directory "
            "path (it is created if missing)."
        )
    existing = [t for t in targets.values() if os.path.lexists(t)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s). Pass overwrite=True "
            "(--overwrite) to replace, or choose another output directory."
        )

    reference = _run_batches(lambda x: model(x, training=False), check_x)
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    staged = {}
    try:
        with tempfile.TemporaryDirectory(prefix="micik-export-") as scratch:
            conversion_dir = None
            results = {}
            for fmt in formats:
                if fmt.startswith("tflite") and conversion_dir is None:
                    conversion_dir = os.path.join(scratch, "conversion_saved_model")
                    _save_serving_model(_conversion_view(model), conversion_dir)
                staged[fmt] = _write(fmt, model, path, conversion_dir, representative)
                outputs = _run_artifact(fmt, staged[fmt], check_x)
                results[fmt] = _measure(
                    staged[fmt], outputs, reference, check_y, model.count_params()
                )
                results[fmt]["path"] = targets[fmt]
        for fmt in formats:
            _move_into_place(staged.pop(fmt), targets[fmt])
    finally:
        for temp in staged.values():
            _remove(temp)
        if created and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    return results


def _check_formats(formats):
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"Received an invalid value for `formats`, expected names from "
            f"{list(FORMATS)}. Received: formats={list(formats)!r}"
        )
    return formats


def _check_model(model):
    """Returns the model's input spec, after checking what export() supports."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"export() takes a keras.Model. Received: {type(model).__name__}"
        )
    if not is_graph_model(model) or not model.built:
        raise ValueError(
            f"Model '{model.name}' is not a built Sequential or Functional "
            "model; export() needs its input shape. Build it as "
            "keras.Model(inputs, outputs) (compress() returns one)."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; export() checks models with one "
            "input and one output."
        )
    source = model.inputs[0]
    return tf.TensorSpec(tuple(source.shape), source.dtype)


def _collect(data, spec, name, limit=None):
    """Returns `(x, y)` numpy arrays from an array, `(x, y)` or a Dataset."""
    xs, ys = [], []
    count = 0
    if isinstance(data, tf.data.Dataset):
        elements = data.as_numpy_iterator()
    else:
        elements = [data]
    for element in elements:
        x, y = _split_element(element)
        x = _as_batch(x, spec, name)
        xs.append(x)
        if y is not None:
            y = np.asarray(y)
            ys.append(y[None] if y.ndim == 0 or len(y) != len(x) else y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    if not xs or count == 0:
        raise ValueError(f"`{name}` is empty: give at least one model input.")
    x = np.concatenate(xs)[:limit]
    y = np.concatenate(ys)[:limit] if len(ys) == len(xs) else None
    return x, y


def _split_element(element):
    if isinstance(element, (tuple, list)):
        if len(element) in (2, 3):  # (x, y) or (x, y, sample_weight)
            return element[0], element[1]
        raise ValueError(
            "Expected inputs `x` or a pair `(x, y)`. Received a "
            f"{type(element).__name__} of {len(element)} items."
        )
    if isinstance(element, dict):
        raise ValueError("Expected inputs `x` or a pair `(x, y)`, not a dict.")
    return element, None


def _as_batch(x, spec, name):
    x = np.asarray(x)
    rank = len(spec.shape)
    if x.ndim == rank - 1:
        x = x[None]
    expected = tuple(spec.shape[1:])
    if x.ndim != rank or any(e is not None and e != d for e, d in zip(expected, x.shape[1:])):
        raise ValueError(
            f"`{name}` has shape {x.shape}, but the model takes inputs of shape "
            f"(batch,) + {expected}. Give samples of shape {expected}, one or "
            "a batch."
        )
    return x.astype(spec.dtype.as_numpy_dtype)


def _check_inputs(check_data, check_labels, representative, spec):
    if check_data is not None:
        x, y = _collect(check_data, spec, "check_data")
    elif representative is not None:
        x, y = representative[:DEFAULT_CHECK_SAMPLES], None
    else:
        if not spec.dtype.is_floating or None in spec.shape[1:]:
            raise ValueError(
                f"The model's input ({spec.shape}, {spec.dtype.name}) cannot be "
                "filled with random numbers: pass `check_data`."
            )
        rng = np.random.default_rng(0)
        shape = (DEFAULT_CHECK_SAMPLES,) + tuple(spec.shape[1:])
        x, y = rng.random(shape).astype(spec.dtype.as_numpy_dtype), None
    if check_labels is not None:
        y = np.asarray(check_labels)
    if y is not None:
        if y.ndim == 2 and y.shape[1] > 1:
            y = y.argmax(axis=-1)
        y = y.reshape(-1)
        if len(y) != len(x):
            raise ValueError(
                f"`check_labels` has {len(y)} labels for {len(x)} check inputs; "
                "give one class id (or one-hot row) per input."
            )
    return x, y


def _run_batches(fn, x):
    return np.concatenate(
        [np.asarray(ops.convert_to_numpy(fn(x[i : i + CHECK_BATCH])))
         for i in range(0, len(x), CHECK_BATCH)]
    )


# --- The conversion view: the same function, the shared basis never folded.


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
        if w.shared_side == "input":
            projected = ops.concatenate(
                [w.project(x, basis), w.project(x, w.unique_left)], axis=-1
            )
            y = ops.matmul(
                projected, ops.concatenate([w.coefficients, w.unique_right], axis=0)
            )
        else:
            y = ops.add(
                ops.matmul(w.project(x, w.coefficients), basis),
                ops.matmul(w.project(x, w.unique_left), w.unique_right),
            )
        if w.use_bias:
            y = ops.add(y, w.bias)
        return w.activation(y)


def _conversion_view(model):
    """`model` with each shared-basis wrapper that also has a unique part
    replaced by a `_SplitFactorized` over the same variables."""
    views = {}

    def make_layer(layer, path):
        if (
            isinstance(layer, (FactorizedDense, FactorizedConv2D))
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


# --- Writing one artifact under a temporary name.


def _write(fmt, model, directory, conversion_dir, representative):
    temp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{ARTIFACTS[fmt]}")
    try:
        if fmt == "keras":
            model.save(temp)
        elif fmt == "saved_model":
            _save_serving_model(model, temp)
        else:
            content = _convert(fmt, conversion_dir, representative)
            with open(temp, "xb") as f:
                f.write(content)
    except BaseException:
        _remove(temp)
        raise
    return temp


def _save_serving_model(model, directory):
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


def _convert(fmt, saved_model_dir, representative):
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


# --- Running an artifact and measuring it.


def _run_artifact(fmt, path, x):
    if fmt == "keras":
        loaded = keras.models.load_model(path, safe_mode=True, compile=False)
        return _run_batches(lambda b: loaded(b, training=False), x)
    if fmt == "saved_model":
        serving = tf.saved_model.load(path).signatures["serving_default"]
        (name,) = serving.structured_input_signature[1]
        return _run_batches(lambda b: _single(serving(**{name: tf.constant(b)})), x)
    return _run_tflite(path, x)


def _single(outputs):
    (value,) = outputs.values()
    return value


def _run_tflite(path, x):
    from ai_edge_litert.interpreter import Interpreter

    # The plain interpreter, without the Flex delegate: a file that needed
    # Select TF ops would fail to allocate here.
    interpreter = Interpreter(model_path=path)
    (source,) = interpreter.get_input_details()
    (target,) = interpreter.get_output_details()
    dynamic_batch = source["shape_signature"][0] == -1
    step = CHECK_BATCH if dynamic_batch else 1
    outputs, allocated = [], None
    for i in range(0, len(x), step):
        batch = x[i : i + step]
        if dynamic_batch and allocated != len(batch):
            interpreter.resize_tensor_input(source["index"], (len(batch),) + x.shape[1:])
            allocated = None
        if allocated is None:
            interpreter.allocate_tensors()
            allocated = len(batch)
        interpreter.set_tensor(source["index"], quantize_input(batch, source))
        interpreter.invoke()
        outputs.append(_dequantize(interpreter.get_tensor(target["index"]), target))
    return np.concatenate(outputs)


def quantize_input(x, detail):
    """`x` in the dtype of a TFLite input (`detail`: its entry in
    `get_input_details()`): scaled, rounded and clipped for an integer input,
    cast for a float one."""
    scale, zero_point = detail["quantization"]
    if np.issubdtype(detail["dtype"], np.integer) and scale:
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
    return x.astype(detail["dtype"])


def _dequantize(y, detail):
    scale, zero_point = detail["quantization"]
    if np.issubdtype(detail["dtype"], np.integer) and scale:
        return (y.astype(np.float32) - zero_point) * scale
    return y.astype(np.float32)


def _measure(path, outputs, reference, labels, params):
    size = _size(path)
    difference = outputs.astype(np.float64) - reference.astype(np.float64)
    norm = float(np.linalg.norm(reference))
    accuracy = None
    if labels is not None:
        accuracy = float(np.mean(outputs.reshape(len(outputs), -1).argmax(-1) == labels))
    return {
        "path": path,
        "bytes": size,
        "gzip_bytes": gzip_size(path),
        "max_abs_error": float(np.max(np.abs(difference))) if difference.size else 0.0,
        "relative_error": float(np.linalg.norm(difference)) / norm if norm else float(
            np.linalg.norm(difference)
        ),
        "accuracy": accuracy,
        "bytes_per_parameter": size / max(int(params), 1),
    }


def _size(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
    return os.path.getsize(path)


class _CountingSink(io.RawIOBase):
    """A write-only stream that only counts bytes (gzip sizes, no copies)."""

    def __init__(self):
        self.count = 0

    def writable(self):
        return True

    def write(self, data):
        self.count += len(data)
        return len(data)


def gzip_size(path):
    """Bytes of `path` under gzip -9 (a directory: of its tar), without
    writing the compressed copy anywhere."""
    sink = _CountingSink()
    with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=9, mtime=0) as zipped:
        if os.path.isdir(path):
            with tarfile.open(fileobj=zipped, mode="w") as tar:
                tar.add(path, arcname=os.path.basename(path))
        else:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, zipped, 1 << 20)
    return sink.count


# --- Moving finished artifacts into place.


def _move_into_place(temp, target):
    if os.path.isdir(temp) or (os.path.lexists(target) and os.path.isdir(target)):
        # A directory cannot replace another in one rename: move the old one
        # aside first, and delete it only once the new one is in place.
        aside = None
        if os.path.lexists(target):
            aside = f"{temp}-old"
            os.rename(target, aside)
        try:
            os.rename(temp, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
            raise
        if aside is not None:
            _remove(aside)
    else:
        os.replace(temp, target)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

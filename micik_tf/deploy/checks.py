"""Checking exported artifacts against the Keras model: the check inputs,
running each artifact on them, and measuring sizes, errors and accuracy."""

import gzip
import io
import os
import shutil
import tarfile

import numpy as np

import keras
import tensorflow as tf
from keras import ops

from micik_tf.recovery.evaluation import top1

# Samples of representative_data (or random inputs) checked when no
# check_data is given.
DEFAULT_CHECK_SAMPLES = 32
# Batch size for running the Keras model and the artifacts on check_data.
CHECK_BATCH = 64


def collect(data, spec, name, limit=None):
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


def check_inputs(check_data, check_labels, representative, spec):
    if check_data is not None:
        x, y = collect(check_data, spec, "check_data")
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


def run_batches(fn, x):
    return np.concatenate(
        [np.asarray(ops.convert_to_numpy(fn(x[i : i + CHECK_BATCH])))
         for i in range(0, len(x), CHECK_BATCH)]
    )


def run_artifact(fmt, path, x):
    if fmt == "keras":
        loaded = keras.models.load_model(path, safe_mode=True, compile=False)
        return run_batches(lambda b: loaded(b, training=False), x)
    if fmt == "saved_model":
        serving = tf.saved_model.load(path).signatures["serving_default"]
        (name,) = serving.structured_input_signature[1]
        return run_batches(lambda b: _single(serving(**{name: tf.constant(b)})), x)
    try:
        return _run_tflite(path, x)
    except RuntimeError as error:
        if "XNNPACK" not in str(error):
            raise
        # LiteRT's default CPU delegate, which a phone's interpreter uses too.
        raise ValueError(
            f"Format {fmt!r}: the converted file does not run under LiteRT's "
            f"XNNPACK delegate ({str(error).strip().splitlines()[0][:160]}). The usual "
            "cause is a tensor whose calibrated range is zero: a part of the model "
            "whose output is zero on all the representative data. Give more "
            "varied representative data, or leave this format out.") from None


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


def measure(path, outputs, reference, labels, params):
    size = size_of(path)
    difference = outputs.astype(np.float64) - reference.astype(np.float64)
    norm = float(np.linalg.norm(reference))
    accuracy = None
    if labels is not None:
        accuracy = top1(outputs, labels)
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


def size_of(path):
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

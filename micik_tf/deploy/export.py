"""`export()` (`micik_tf.export`): a Keras model to deployment formats, each checked against it.

    results = micik_tf.export(
        compressed, "exported/", representative_data=train_images,
        check_data=test_images, check_labels=test_labels)

Every format writes one artifact into the output directory (`ARTIFACTS`). The
export is all or nothing: the artifacts are first written under temporary
names in that directory, run on `check_data` and compared with the Keras
model, and only then moved into place together; if any step fails, even the
last move, every artifact that was there before is back as it was and no
temporary is left.

The steps live beside this module: `conversion` (SavedModel, TFLite, and the
view that keeps a shared basis one tensor in TFLite) and `checks` (the check
inputs, running each artifact, measuring it).
"""

import os
import shutil
import tempfile
import uuid

import keras
import tensorflow as tf

from micik_tf.compression.grouping import is_graph_model
from micik_tf.deploy import checks, conversion

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
        representative, _ = checks.collect(
            representative_data, input_spec, "representative_data", REPRESENTATIVE_SAMPLES
        )
    check_x, check_y = checks.check_inputs(check_data, check_labels, representative, input_spec)
    path = os.fspath(path)
    targets = {f: os.path.join(path, ARTIFACTS[f]) for f in formats}
    _check_targets(path, targets, overwrite)

    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    staged = {}
    try:
        results = _stage(model, formats, path, representative, check_x, check_y, staged)
        _commit(staged, targets)
        staged.clear()
    finally:
        for temp in staged.values():
            _remove(temp)
        if created and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    for fmt, result in results.items():
        result["path"] = targets[fmt]
    return results


def _check_targets(path, targets, overwrite):
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


def _stage(model, formats, directory, representative, check_x, check_y, staged):
    """Writes every artifact under a temporary name in `directory` (recorded in
    `staged` as it goes, for cleanup) and checks each against the model."""
    reference = checks.run_batches(lambda x: model(x, training=False), check_x)
    results = {}
    with tempfile.TemporaryDirectory(prefix="micik-export-") as scratch:
        conversion_dir = None
        for fmt in formats:
            if fmt.startswith("tflite") and conversion_dir is None:
                conversion_dir = os.path.join(scratch, "conversion_saved_model")
                conversion.save_serving_model(model, conversion_dir)
            staged[fmt] = _write(fmt, model, directory, conversion_dir, representative)
            outputs = checks.run_artifact(fmt, staged[fmt], check_x)
            results[fmt] = checks.measure(
                staged[fmt], outputs, reference, check_y, model.count_params()
            )
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



def _write(fmt, model, directory, conversion_dir, representative):
    temp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{ARTIFACTS[fmt]}")
    try:
        if fmt == "keras":
            model.save(temp)
        elif fmt == "saved_model":
            conversion.save_serving_model(model, temp)
        else:
            content = conversion.convert_tflite(fmt, conversion_dir, representative)
            with open(temp, "xb") as f:
                f.write(content)
    except BaseException:
        _remove(temp)
        raise
    return temp



# --- Moving finished artifacts into place, all or none.


def _commit(staged, targets):
    """Moves every staged artifact onto its target, or none of them.

    Each existing target is first renamed aside; if any move fails, the
    targets moved so far are removed and every original is renamed back.
    The originals are deleted only once all the new artifacts are in place.
    """
    asides, placed = {}, []
    try:
        for fmt, temp in staged.items():
            target = targets[fmt]
            if os.path.lexists(target):
                asides[fmt] = f"{temp}-old"
                os.rename(target, asides[fmt])
            os.rename(temp, target)
            placed.append(fmt)
    except BaseException:
        for fmt in placed:
            _remove(targets[fmt])
        for fmt, aside in asides.items():
            os.rename(aside, targets[fmt])
        raise
    for aside in asides.values():
        _remove(aside)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

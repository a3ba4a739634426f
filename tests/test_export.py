"""export(): every format checked against the Keras model, the shared basis
stored once, the refuse-to-overwrite and leave-nothing-behind file handling,
and tools/export.py's one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import micik_tf
from micik_tf import models
from micik_tf.recovery import datasets, pipeline
from micik_tf.deploy import ARTIFACTS, FORMATS, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "export.py")


def _arrays(ds):
    x, y = next(iter(ds.batch(1 << 16)))
    return np.asarray(x), np.asarray(y)


@pytest.fixture(scope="module")
def digits():
    """A digits CNN, compressed 3x (with a shared basis), briefly recovered,
    and exported to every format with the test split as check data."""
    keras.utils.set_random_seed(0)
    source = datasets.load("digits")
    model = models.vgg_style((8, 8, 1), 10, widths=(16, 16, 32, 32), dense=32)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(pipeline.pipeline(source.train, 64, training=True), epochs=3, verbose=0)
    compressed = micik_tf.compress(
        model, ratio=3, verbose=0,
        calibration_data=pipeline.pipeline(source.train, 64, training=False),
    )
    # A short recovery, so that the int8 comparison is made on a good model.
    compressed.compile(keras.optimizers.Adam(1e-3),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compressed.fit(pipeline.pipeline(source.train, 64, training=True), epochs=2, verbose=0)
    train_x, _ = _arrays(source.train)
    test_x, test_y = _arrays(source.test)
    return compressed, train_x, test_x, test_y


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    compressed, train_x, test_x, test_y = digits
    directory = tmp_path_factory.mktemp("digits_export")
    results = export(compressed, directory, formats=FORMATS, representative_data=train_x,
                     check_data=test_x, check_labels=test_y)
    return directory, results


def test_export_is_the_package_level_function():
    assert micik_tf.export is export and callable(micik_tf.export)


def test_the_digits_model_shares_a_basis(digits):
    groups = micik_tf.report(digits[0]).groups
    assert groups and all(len(g["members"]) >= 2 for g in groups)


def test_every_format_matches_the_keras_model(digits, exported):
    compressed, _, test_x, test_y = digits
    directory, results = exported
    assert list(results) == list(FORMATS)
    assert sorted(os.listdir(directory)) == sorted(ARTIFACTS.values())
    params = compressed.count_params()
    for fmt, result in results.items():
        assert result["path"] == os.path.join(directory, ARTIFACTS[fmt])
        assert 0 < result["gzip_bytes"] and result["bytes"] > 0
        assert result["bytes_per_parameter"] == pytest.approx(result["bytes"] / params)
        assert 0.0 <= result["accuracy"] <= 1.0
    assert results["keras"]["relative_error"] < 1e-6
    assert results["saved_model"]["relative_error"] < 1e-5
    assert results["tflite"]["relative_error"] < 1e-4
    assert results["tflite_fp16"]["relative_error"] < 1e-2
    assert results["tflite_int8_dynamic"]["relative_error"] < 0.1
    assert results["tflite_int8"]["bytes"] < results["tflite"]["bytes"]
    # The recorded accuracy is the artifact's own, on the check data.
    interpreter = Interpreter(model_path=results["tflite"]["path"])
    interpreter.resize_tensor_input(0, test_x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], test_x)
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert results["tflite"]["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == test_y))


def test_full_integer_model_keeps_the_accuracy(digits, exported):
    compressed, _, test_x, test_y = digits
    _, results = exported
    float_accuracy = float(np.mean(compressed.predict(test_x, verbose=0).argmax(-1) == test_y))
    assert len(test_y) == 450 and float_accuracy > 0.85
    assert results["keras"]["accuracy"] == pytest.approx(float_accuracy)
    assert abs(results["tflite_int8"]["accuracy"] - float_accuracy) <= 0.01
    # Weights and activations are int8 (inputs and outputs stay float32).
    interpreter = Interpreter(model_path=results["tflite_int8"]["path"])
    dtypes = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in dtypes
    assert interpreter.get_input_details()[0]["dtype"] == np.float32


def test_tflite_files_run_without_the_flex_delegate(exported):
    _, results = exported
    for fmt in FORMATS:
        if fmt.startswith("tflite"):
            interpreter = Interpreter(model_path=results[fmt]["path"])
            interpreter.allocate_tensors()  # fails for Select TF (Flex) ops
            interpreter.invoke()


@keras.saving.register_keras_serializable(package="test_export")
class _Cosh(keras.layers.Layer):
    """TFLite has no builtin kernel for Cosh: it would need the Flex delegate."""

    def call(self, x):
        return keras.ops.cosh(x)


def _flex_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(_Cosh()(inputs)))


def test_a_failure_midway_leaves_old_artifacts_and_no_temporaries(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match="Cosh.*Flex delegate"):
        # keras and saved_model are written before the tflite conversion fails.
        export(_flex_model(), tmp_path, formats=["keras", "saved_model", "tflite"],
               overwrite=True)
    assert os.listdir(tmp_path) == ["model.keras"]
    assert (tmp_path / "model.keras").read_bytes() == b"an earlier export"


def test_an_int8_file_that_xnnpack_refuses_gets_one_line_and_no_file(tmp_path):
    """A branch whose output is zero on every representative input gets a
    zero calibrated range, and XNNPACK (LiteRT's default CPU delegate, on
    phones too) then refuses the file's int8 ADD."""
    inputs = keras.Input((6,))
    silent = keras.layers.Dense(8, use_bias=False, name="silent")
    model = keras.Model(inputs, keras.layers.Add()([keras.layers.Dense(8)(inputs),
                                                    silent(inputs)]))
    kernel = np.zeros((6, 8), "float32")
    kernel[3:] = 1.0
    silent.kernel.assign(kernel)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    x[:, 3:] = 0.0  # the only inputs the silent branch reads
    with pytest.raises(ValueError, match="does not run under LiteRT's XNNPACK") as error:
        export(model, tmp_path, formats=["tflite_int8"], representative_data=x, check_data=x)
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_a_failure_while_moving_into_place_restores_every_old_artifact(tmp_path, monkeypatch):
    """All or nothing: the moves happen last, and if the second one fails the
    first is undone, so the folder holds exactly the earlier export."""
    (tmp_path / "model.keras").write_bytes(b"an earlier keras export")
    (tmp_path / "model_float32.tflite").write_bytes(b"an earlier tflite export")
    real_rename, moves = os.rename, []

    def rename(source, target):
        if os.path.basename(str(source)).startswith(".tmp-export-") and not str(source).endswith("-old"):
            moves.append(target)
            if len(moves) == 2:
                raise OSError("disk full")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        export(_small_model(), tmp_path, formats=["keras", "tflite"], overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "model_float32.tflite"]
    assert (tmp_path / "model.keras").read_bytes() == b"an earlier keras export"
    assert (tmp_path / "model_float32.tflite").read_bytes() == b"an earlier tflite export"


def test_int8_without_representative_data_writes_nothing(digits, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="representative_data"):
        export(digits[0], target, formats=["keras", "tflite_int8"])
    assert not target.exists()


def _small_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _contents(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_refuses_to_overwrite_unless_asked(tmp_path):
    formats = ["keras", "saved_model", "tflite"]
    export(_small_model(), tmp_path, formats=formats)
    before = _contents(tmp_path)
    with pytest.raises(FileExistsError, match=r"model\.keras.*overwrite=True"):
        export(_small_model(), tmp_path, formats=formats)
    assert _contents(tmp_path) == before
    other = _small_model()
    results = export(other, tmp_path, formats=formats, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(ARTIFACTS[f] for f in formats)
    assert _contents(tmp_path) != before
    assert all(r["relative_error"] < 1e-4 for r in results.values())
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    x = np.ones((2, 6), "float32")
    (value,) = reloaded.signatures["serving_default"](**{
        next(iter(reloaded.signatures["serving_default"].structured_input_signature[1])):
        tf.constant(x)}).values()
    np.testing.assert_allclose(value.numpy(), other(x), rtol=1e-5, atol=1e-6)


def test_shared_basis_is_stored_once(tmp_path):
    """One 576x96 basis shared by four convolutions (over half the model):
    storing it per layer would give ~6.2 bytes per parameter."""
    inputs = keras.Input((8, 8, 64))
    x = inputs
    names = [f"conv{i}" for i in range(4)]
    for name in names:
        x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name=name)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    compressed = micik_tf.compress(model, ranks={n: (96, 8) for n in names},
                                   groups=[names], verbose=0)
    (group,) = micik_tf.report(compressed).groups
    assert len(group["members"]) == 4
    params = compressed.count_params()
    assert params >= 100_000 and group["params"] > params / 2
    results = export(compressed, tmp_path, formats=["saved_model", "tflite"])
    assert results["tflite"]["bytes_per_parameter"] < 4.6
    assert results["tflite"]["relative_error"] < 1e-4
    # The SavedModel's checkpoint holds each variable once, the basis included.
    reader = tf.train.load_checkpoint(str(tmp_path / "saved_model" / "variables" / "variables"))
    shapes = [s for k, s in reader.get_variable_to_shape_map().items() if "VARIABLE_VALUE" in k]
    assert sum(int(np.prod(s)) for s in shapes) == params


# --- tools/export.py, as users run it.


def _tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, TOOL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=ROOT,
    )


ERROR_CASES = {
    "corrupt": "not a Keras 3 archive",
    "missing": "no such file",
    "unknown_format": "unknown or missing format",
    "existing_target": "--overwrite",
}


@pytest.fixture(scope="module")
def tool_runs(exported, tmp_path_factory):
    """Runs every case of the tool at once: each pays TensorFlow's import."""
    directory, _ = exported
    model = os.path.join(directory, "model.keras")
    scratch = tmp_path_factory.mktemp("tool")
    (scratch / "x.keras").write_bytes(np.random.default_rng(0).bytes(2048))
    out = str(scratch / "out")
    args = {
        "corrupt": [f"--model={scratch / 'x.keras'}", f"--output_dir={out}", "--formats=tflite"],
        "missing": [f"--model={scratch / 'nope.keras'}", f"--output_dir={out}", "--formats=tflite"],
        "unknown_format": [f"--model={model}", f"--output_dir={out}", "--formats=tflite,onnx"],
        "existing_target": [f"--model={model}", f"--output_dir={directory}", "--formats=tflite"],
        "success": [f"--model={model}", f"--output_dir={scratch / 'cli'}",
                    "--formats=tflite,tflite_int8", "--representative_data=digits"],
    }
    processes = {case: _tool(*a) for case, a in args.items()}
    runs = {case: (p.wait(timeout=300), *p.communicate()) for case, p in processes.items()}
    assert not os.path.exists(out)
    return scratch, runs


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_tool_errors_are_one_line(case, tool_runs):
    returncode, _, stderr = tool_runs[1][case]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("export.py: error:") and ERROR_CASES[case] in lines[0]


def test_tool_shows_a_native_crash(tmp_path):
    """Nothing the tool's process writes to fd 2 is thrown away: a crash in
    native code (here a segfault once TensorFlow is loaded) is reported."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, ctypes, faulthandler, sys\n"
        "faulthandler.enable()\n"
        "atexit.register(lambda: 'tensorflow' in sys.modules and ctypes.string_at(0))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, TOOL, f"--model={tmp_path / 'nope.keras'}",
         f"--output_dir={tmp_path / 'out'}", "--formats=tflite"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert result.returncode != 0
    assert "Segmentation fault" in result.stderr, result.stderr[-2000:]
    assert "crashed with signal SIGSEGV" in result.stderr


def test_tool_refuses_a_zip_that_is_not_a_keras_archive(tmp_path):
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("export_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a Keras archive")
    with pytest.raises(tool.UsageError, match="not a Keras 3 model"):
        tool._load_model(str(tmp_path / "other.keras"))


def test_tool_exports_a_saved_compressed_model(exported, tool_runs):
    _, results = exported
    scratch, runs = tool_runs
    returncode, stdout, stderr = runs["success"]
    assert returncode == 0, stderr[-3000:]
    assert "tflite_int8" in stdout and "gzip bytes" in stdout
    out = scratch / "cli"
    report = json.loads((out / "export_report.json").read_text())
    assert sorted(os.listdir(out)) == sorted(
        ["export_report.json", ARTIFACTS["tflite"], ARTIFACTS["tflite_int8"]])
    assert report["check_samples"] == 450
    assert report["formats"]["tflite"]["relative_error"] < 1e-4
    assert report["formats"]["tflite"]["bytes"] == results["tflite"]["bytes"]
    assert abs(report["formats"]["tflite_int8"]["accuracy"] - report["reference_accuracy"]) <= 0.01

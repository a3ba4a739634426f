"""The recovery job refuses what it cannot do safely: every flag value is
checked before any work, a resume must match the run it continues, the run's
folder holds one run, writes are atomic, and the caller's objects and global
state are left as they were."""

import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

import keras

from micik_tf.job import RunConfig, UsageError
from micik_tf.job.workspace import Workspace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")


def _train(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- every flag value is checked when the flags are parsed ---------------------


@pytest.fixture(scope="module")
def parse():
    import importlib.util

    if "ratio" not in flags.FLAGS:
        spec = importlib.util.spec_from_file_location("micik_train_tool", TRAIN)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.define_flags()

    def parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train.py", *argv])

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("argv, named", [
    (["--augment=flp"], r"--augment=\['flp'\].*flip, crop, shift"),
    (["--prune_sparsity=1.5"], r"--prune_sparsity=1.5.*\[0, 1\)"),
    (["--export=keras,onnx"], r"--export=.*onnx.*tflite_int8"),
    (["--ratio=1"], r"--ratio=1.0.*> 1"),
    (["--epochs=-1"], r"--epochs=-1.*>= 0"),
    (["--validation_fraction=1.5"], r"--validation_fraction=1.5.*\[0, 1\)"),
    (["--allow_changes=ratio"], r"--allow_changes=\['ratio'\].*epochs, learning_rate"),
    (["--mode=magnitude_pruning", "--prune_sparsity=0.5"], "sets its own sparsity"),
    (["--teacher_arch=vgg17"], r"--teacher_arch=vgg17.*vgg_style"),
    (["--unique=dense"], r"--unique=dense.*low_rank\|sparse"),
    (["--unique=sparse", "--sparse_share=1.5"], r"--sparse_share=1.5.*\[0, 1\]"),
    (["--sparse_share=0.5"], "--sparse_share needs --unique=sparse"),
    (["--min_rank=0"], "--min_rank=0 leaves a layer only its sparse part"),
    (["--unique=sparse", "--prune_sparsity=0.5"], "masks fixed"),
    (["--sequential", "--calibration_batches=0"], "--calibration_batches > 0"),
    (["--sparse_masks=gradual"], "--sparse_masks=gradual .* needs --unique=sparse"),
    (["--unique=sparse", "--sparse_masks=moving"], r"--sparse_masks=moving.*fixed\|gradual"),
])
def test_bad_flag_values_are_refused_at_parse_time(parse, tmp_path, argv, named):
    with pytest.raises(flags.IllegalFlagValueError, match=named):
        parse(f"--model_dir={tmp_path / 'run'}", *argv)


def test_model_dir_that_is_a_file_is_refused_at_parse_time(parse, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    with pytest.raises(flags.IllegalFlagValueError, match="--model_dir=.*not an existing file"):
        parse(f"--model_dir={existing}")
    assert existing.read_text() == "mine"


@pytest.mark.parametrize("bad", ["--augment=flp", "--prune_sparsity=1.5"])
def test_the_binary_refuses_before_any_work(tmp_path, bad):
    """One line naming the flag, no traceback, and nothing trained or written:
    --prune_sparsity used to be checked only after the teacher was trained."""
    model_dir = tmp_path / "run"
    result = _train(f"--model_dir={model_dir}", "--teacher=train", bad)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "Flags parsing error" in line]
    assert len(errors) == 1 and bad.split("=")[0] in errors[0], result.stderr[-2000:]
    assert not model_dir.exists()


def test_config_validate_uses_the_same_rules(tmp_path):
    with pytest.raises(UsageError, match=r"--augment=flp: expected names from flip, crop, shift"):
        RunConfig(model_dir=str(tmp_path), augment=("flp",)).validate()


# --- the run's folder ---------------------------------------------------------------


def _config(tmp_path, **settings):
    return RunConfig(model_dir=str(tmp_path / "run"), **settings)


def _strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


def _started(tmp_path, **settings):
    """A run that has begun writing into its folder."""
    workspace = Workspace.open(_config(tmp_path, **settings), _strategy())
    (tmp_path / "run" / "history.json").write_text("[]")
    return workspace


def test_a_resume_with_other_settings_names_each_difference(tmp_path):
    _started(tmp_path, epochs=1, learning_rate=1e-3)
    with pytest.raises(UsageError) as error:
        Workspace.open(_config(tmp_path, epochs=3, learning_rate=0.5), _strategy())
    message = str(error.value)
    assert "--epochs: 1 there, 3 now" in message
    assert "--learning_rate: 0.001 there, 0.5 now" in message
    assert "--allow_changes=epochs,learning_rate" in message


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
    _started(tmp_path, epochs=1)
    run_file = tmp_path / "run" / "run.json"
    recorded = json.loads(run_file.read_text())
    del recorded["fingerprint"]["sparse_masks"]
    run_file.write_text(json.dumps(recorded))
    with pytest.raises(UsageError, match="--sparse_masks: None there, 'gradual' now"):
        Workspace.open(_config(tmp_path, epochs=1, unique="sparse", sparse_masks="gradual"),
                       _strategy())
    assert Workspace.open(_config(tmp_path, epochs=1), _strategy()).resuming


def test_allowed_changes_are_recorded(tmp_path):
    _started(tmp_path, epochs=1)
    workspace = Workspace.open(_config(tmp_path, epochs=3, allow_changes=("epochs",)), _strategy())
    assert workspace.resuming and workspace.changed_now == {"epochs"}
    assert [(c["setting"], c["was"], c["now"]) for c in workspace.changes] == [("epochs", 1, 3)]
    # Kept in run.json for later resumes (and copied into report.json).
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["fingerprint"]["epochs"] == 3 and recorded["changes"][0]["now"] == 3


@pytest.mark.parametrize("setting", [dict(ratio=8.0), dict(dataset="fashion_mnist"),
                                     dict(train_fraction=0.1), dict(prune_sparsity=0.5),
                                     dict(quantize="int8"), dict(mode="per_layer"),
                                     dict(seed=1), dict(alpha=0.0)])
def test_every_setting_that_changes_the_result_is_fingerprinted(tmp_path, setting):
    _started(tmp_path)
    with pytest.raises(UsageError, match=f"--{next(iter(setting))}: "):
        Workspace.open(_config(tmp_path, **setting), _strategy())


def test_a_changed_teacher_file_is_noticed(tmp_path):
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"one")
    _started(tmp_path, teacher=str(teacher))
    teacher.write_bytes(b"two")
    with pytest.raises(UsageError, match=r"--teacher \(file contents\)"):
        Workspace.open(_config(tmp_path, teacher=str(teacher)), _strategy())


def test_a_run_that_wrote_nothing_binds_no_settings(tmp_path):
    """A first attempt refused before writing anything (bad data, a typo in
    --teacher) leaves only run.json: the corrected rerun is not refused."""
    Workspace.open(_config(tmp_path, dataset="fashion_mnst"), _strategy())
    workspace = Workspace.open(_config(tmp_path, dataset="fashion_mnist"), _strategy())
    assert not workspace.resuming


def test_model_dir_that_is_a_file_is_refused_and_kept(tmp_path):
    existing = tmp_path / "run"
    existing.write_text("mine")
    with pytest.raises(UsageError, match="is an existing file"):
        Workspace.open(_config(tmp_path), _strategy())
    assert existing.read_text() == "mine"


@pytest.mark.parametrize("stale", ["teacher.keras", "student_init.keras"])
def test_files_of_an_unknown_run_are_not_reused(tmp_path, stale):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / stale).write_bytes(b"another run's model")
    with pytest.raises(UsageError, match=f"holds {stale} of an unknown run"):
        Workspace.open(_config(tmp_path), _strategy())
    assert (folder / stale).read_bytes() == b"another run's model"
    assert sorted(os.listdir(folder)) == [stale]


def test_resume_with_changed_settings_end_to_end(tmp_path, teacher_file):
    """Refused, then continued with --allow_changes (another optimizer too),
    without a traceback or checkpoint warnings, and recorded in report.json."""
    model_dir = tmp_path / "run"
    base = [f"--model_dir={model_dir}", f"--teacher={teacher_file}", "--ratio=2",
            "--batch_size=32", "--steps_per_epoch=2", "--calibration_batches=1", "--verbose=0"]
    first = _train(*base, "--epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _train(*base, "--epochs=2", "--optimizer=sgd")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--epochs: 1 there, 2 now" in refused.stderr
    assert "--optimizer: 'adam' there, 'sgd' now" in refused.stderr
    resumed = _train(*base, "--epochs=2", "--optimizer=sgd", "--allow_changes=epochs,optimizer")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and "checkpoint" not in resumed.stderr.lower()
    report = json.loads((model_dir / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["steps"] == 4
    assert {c["setting"] for c in report["changes_on_resume"]} == {"epochs", "optimizer"}


# --- atomic writes and the caller's objects -------------------------------------------


def _tiny_pair():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    teacher = keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))
    import micik_tf

    student = micik_tf.compress(teacher, ranks={"fc1": (0, 2)}, verbose=0)
    return teacher, student


def _trainer(tmp_path, teacher, student):
    from micik_tf.recovery.trainer import RecoveryConfig, RecoveryTrainer

    return RecoveryTrainer(teacher, student, _strategy(), RecoveryConfig(epochs=1, batch_size=4),
                           str(tmp_path), steps_per_epoch=2, verbose=0)


def test_best_weights_are_written_atomically(tmp_path, monkeypatch):
    teacher, student = _tiny_pair()
    trainer = _trainer(tmp_path, teacher, student)
    trainer.save_best()
    best = tmp_path / "best.weights.h5"
    before = best.read_bytes()

    def killed_mid_write(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save_weights", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_best()
    assert best.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_training_leaves_the_teacher_as_it_was(tmp_path):
    import tensorflow as tf

    teacher, student = _tiny_pair()
    weights = [np.array(w) for w in teacher.weights]
    trainer = _trainer(tmp_path, teacher, student)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.random((8, 4), dtype=np.float32), rng.integers(0, 3, 8).astype("int32"))).batch(4)
    trainer.fit(lambda epoch: data, data)
    assert teacher.trainable is True
    assert all(l.trainable for l in teacher.layers)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(weights, teacher.weights))


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from micik_tf.job.outputs import plot_history

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        history = [{"epoch": 1, "loss": 1.0, "ce": 1.0, "kd": 0.1, "sim": 0.01, "inh": 0.1,
                    "train_accuracy": 0.5, "val_accuracy": 0.5}]
        plot_history(history, 0.9, str(tmp_path / "curves.png"))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "curves.png").stat().st_size > 1000
    finally:
        matplotlib.use(previous)


def test_library_imports_no_private_names_across_modules():
    """Public APIs only: no module imports another module's `_private` name."""
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "micik_tf", "**", "*.py"), recursive=True):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("micik_tf"):
                offenders += [f"{os.path.relpath(path, ROOT)}: {a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_a_failed_export_keeps_the_run(tmp_path, teacher_file, monkeypatch):
    """One format failing its check costs that format only: the others are
    written, report.json records the run, and the error carries the report."""
    from micik_tf import job
    from micik_tf.job import outputs

    real_export = outputs.deploy.export

    def int8_fails(model, path, formats, **kwargs):
        if "tflite_int8" in formats:
            raise ValueError("Format 'tflite_int8': the converted file does not run.")
        return real_export(model, path, formats=formats, **kwargs)

    monkeypatch.setattr(outputs.deploy, "export", int8_fails)
    config = RunConfig(model_dir=str(tmp_path / "run"), teacher=teacher_file, dataset="digits",
                       ratio=2, epochs=1, batch_size=32, steps_per_epoch=2,
                       calibration_batches=1, verbose=0, export=("tflite", "tflite_int8"))
    with pytest.raises(job.ExportError, match="format 'tflite_int8': .* does not run") as caught:
        job.run(config)
    assert "\n" not in str(caught.value)
    exports = caught.value.report["exports"]
    assert set(exports["tflite_int8"]) == {"error"}
    assert exports["tflite"]["relative_error"] < 1e-4
    assert os.path.exists(exports["tflite"]["path"])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["student_accuracy"] == caught.value.report["student_accuracy"]
    assert "error" in saved["exports"]["tflite_int8"]

"""tools/train.py end to end on tiny configurations: strategies, resume after a
kill, and the one-line errors. Each run is a subprocess, as users run it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")


def _env(extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra or {})
    return env


def _run(args, extra_env=None, timeout=300):
    return subprocess.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True,
        timeout=timeout, env=_env(extra_env), cwd=ROOT,
    )


def _tiny(model_dir, teacher, *extra):
    return [
        f"--model_dir={model_dir}", f"--teacher={teacher}", "--dataset=digits",
        "--ratio=2", "--epochs=1", "--batch_size=32", "--verbose=0",
        "--calibration_batches=2", *extra,
    ]


def _report(model_dir):
    with open(os.path.join(model_dir, "report.json")) as f:
        return json.load(f)


def test_mirrored_matches_one_device(tmp_path, teacher_file):
    losses = {}
    # Two SGD steps: Adam would amplify the summation-order noise of the
    # two-replica gradient sum in near-zero gradients over a long run.
    common = ["--deterministic", "--steps_per_epoch=2", "--optimizer=sgd", "--learning_rate=0.005"]
    for name, extra in (
        ("one", ["--strategy=one_device"]),
        ("mirrored", ["--strategy=mirrored", "--logical_cpus=2"]),
    ):
        model_dir = tmp_path / name
        result = _run(_tiny(model_dir, teacher_file, *extra, *common))
        assert result.returncode == 0, result.stderr[-3000:]
        report = _report(model_dir)
        losses[name] = report["history"][0]
        assert report["replicas"] == (2 if name == "mirrored" else 1)
    for key in ("loss", "ce", "kd", "sim", "inh"):
        np.testing.assert_allclose(losses["mirrored"][key], losses["one"][key], rtol=1e-4, atol=1e-6)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes(tmp_path, teacher_file):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN, *_tiny(model_dir, teacher_file, "--strategy=multi_worker_mirrored")],
            env=_env({"TF_CONFIG": tf_config}), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate(timeout=400) for p in procs]
    errors = "\n---\n".join(err[-2500:] for _, err in outputs)
    assert all(p.returncode == 0 for p in procs), errors
    report = _report(model_dir)
    assert report["replicas"] == 2 and report["steps"] > 0


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, teacher_file):
    args = ["--epochs=2", "--checkpoint_every=5", "--deterministic"]
    straight = tmp_path / "straight"
    result = _run(_tiny(straight, teacher_file, *args))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *_tiny(killed, teacher_file, *args)],
        env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    index = killed / "checkpoints" / "checkpoint"
    deadline = time.time() + 300
    while not index.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists()

    result = _run(_tiny(killed, teacher_file, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference = _report(killed), _report(straight)
    assert resumed["resumed_from_step"] > 0
    assert resumed["steps"] == reference["steps"]
    assert abs(resumed["student_accuracy"] - reference["student_accuracy"]) <= 0.005


def _lambda_teacher(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Flatten()(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)
    return path


def _bad_input(case, tmp_path, teacher_file):
    """Settings `{name: value}` for one bad-input case, and the folder it uses."""
    model_dir = tmp_path / "run"
    settings = dict(model_dir=str(model_dir), teacher=teacher_file, dataset="digits", ratio=2.0,
                    epochs=1, batch_size=32, verbose=0, calibration_batches=2)
    if case == "unknown_dataset":
        settings["dataset"] = "no_such_dataset_xyz"
    elif case == "missing_teacher":
        settings["teacher"] = str(tmp_path / "nope.keras")
    elif case == "corrupt_teacher":
        bad = tmp_path / "bad.keras"
        bad.write_bytes(b"this is not a zip file")
        settings["teacher"] = str(bad)
    elif case == "lambda_teacher":
        settings["teacher"] = str(_lambda_teacher(tmp_path))
    elif case == "other_run":
        model_dir.mkdir()
        (model_dir / "run.json").write_text(json.dumps({"fingerprint": {"ratio": 8.0}}))
        (model_dir / "history.json").write_text("[]")
    elif case == "unreachable_ratio":
        settings["ratio"] = 500.0
    return settings, model_dir


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown_dataset", "Unknown dataset"),
        ("missing_teacher", "no such file"),
        ("corrupt_teacher", "not a Keras 3 archive"),
        ("lambda_teacher", "safe_mode"),
        ("other_run", "holds a run with other settings"),
        ("unreachable_ratio", "largest reachable ratio"),
    ],
)
def test_bad_input_is_one_usage_error(case, expected, tmp_path, teacher_file):
    """Each bad input ends the job with one UsageError line (which the binary
    prints as its one-line error, below), naming the problem."""
    from micik_tf import job

    settings, model_dir = _bad_input(case, tmp_path, teacher_file)
    with pytest.raises(job.UsageError) as error:
        job.run(job.RunConfig(**settings))
    assert expected in str(error.value) and "\n" not in str(error.value)
    if case == "other_run":
        # Nothing of the other run was touched.
        assert sorted(os.listdir(model_dir)) == ["history.json", "run.json"]


@pytest.mark.parametrize("case, expected", [
    ("misspelled_flag", "Unknown command line flag 'ratoi'"),
    ("corrupt_teacher", "not a Keras 3 archive"),
])
def test_the_binary_prints_bad_input_in_one_line(case, expected, tmp_path, teacher_file):
    settings, model_dir = _bad_input(case, tmp_path, teacher_file)
    args = _tiny(model_dir, settings["teacher"])
    if case == "misspelled_flag":
        flagfile = tmp_path / "bad.cfg"
        flagfile.write_text("--ratoi=8\n")
        args.append(f"--flagfile={flagfile}")
    result = _run(args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr[-2000:]
    if case == "corrupt_teacher":
        errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1


@pytest.mark.slow  # also tools/device_check.sh, on the GPU where it matters
def test_mixed_precision_run(tmp_path, teacher_file):
    model_dir = tmp_path / "mixed"
    result = _run(_tiny(model_dir, teacher_file, "--mixed_precision", "--steps_per_epoch=3", "--clip_norm=1.0"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(model_dir)
    assert report["steps"] == 3 and np.isfinite(report["history"][0]["loss"])
    student = keras.models.load_model(model_dir / "student.keras")
    assert student.get_layer("conv2").compute_dtype == "float16"
    assert all(w.dtype == "float32" for w in student.weights)


@pytest.mark.slow  # export itself is test_export's; make demo runs this path
def test_deployment_exports_recorded_in_report(tmp_path, teacher_file):
    model_dir = tmp_path / "exports"
    result = _run(_tiny(model_dir, teacher_file, "--steps_per_epoch=2",
                        "--export=keras,saved_model,tflite,tflite_int8"))
    assert result.returncode == 0, result.stderr[-3000:]
    exports = _report(model_dir)["exports"]
    assert set(exports) == {"keras", "saved_model", "tflite", "tflite_int8"}
    assert exports["tflite"]["relative_error"] < 1e-4
    assert abs(exports["tflite_int8"]["accuracy"] - exports["tflite"]["accuracy"]) <= 0.01
    assert (model_dir / "export" / "model_float32.tflite").exists()


def test_pruning_and_qat_during_recovery(tmp_path, teacher_file):
    from micik_tf.deploy import pruning
    from micik_tf.deploy.quantization import fake_quantize

    model_dir = tmp_path / "pruned"
    result = _run(_tiny(model_dir, teacher_file, "--steps_per_epoch=6", "--prune_sparsity=0.6",
                        "--quantize=int8"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(model_dir)
    assert abs(report["sparsity"] - 0.6) < 0.02
    student = keras.models.load_model(model_dir / "student.keras")
    zeros = [float(np.mean(np.array(v) == 0)) for _, v in pruning.prunable_variables(student)]
    assert zeros and min(zeros) > 0.55
    # QAT ran on the last steps (after pruning), and --quantize=int8 exported
    # the full-integer file, checked against Keras on the test split.
    assert report["quantize"] == "int8" and 1 < report["qat_from_step"] <= 6
    int8 = report["exports"]["tflite_int8"]
    assert int8["gzip_bytes"] < int8["bytes"] and int8["accuracy"] is not None
    assert abs(int8["accuracy"] - report["student_accuracy"]) <= 0.02
    assert report["exports"]["keras"]["gzip_bytes"] > 0
    # The saved weights are the float master weights, not their rounding.
    factor = np.array(pruning.prunable_variables(student)[0][1])
    assert not np.array_equal(factor, fake_quantize(factor))


@pytest.mark.slow  # the pruning budget is also the quick curve smoke's
def test_magnitude_pruning_baseline_stores_the_same_parameter_count(tmp_path, teacher_file):
    model_dir = tmp_path / "baseline"
    result = _run(_tiny(model_dir, teacher_file, "--steps_per_epoch=4", "--mode=magnitude_pruning",
                        "--ratio=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(model_dir)
    teacher = keras.models.load_model(teacher_file)
    assert report["params_before"] == teacher.count_params()
    # Stored parameters: every nonzero (pruned kernels) plus all the rest.
    assert abs(report["ratio"] / 4 - 1) <= 0.01
    student = keras.models.load_model(model_dir / "student.keras")
    nonzero = sum(int(np.count_nonzero(np.array(w))) for w in student.weights)
    assert nonzero <= report["params_after"]
    assert student.get_layer("conv2").__class__ is keras.layers.Conv2D  # not factorized
    result = _run(_tiny(tmp_path / "too_far", teacher_file, "--mode=magnitude_pruning",
                        "--ratio=100000"))
    assert result.returncode == 2 and "cannot be reached by pruning" in result.stderr
    assert "Traceback" not in result.stderr

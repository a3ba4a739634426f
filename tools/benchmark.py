"""Benchmarks of micik_tf, one suite per run, results as JSON and markdown.

Suites:
  compress_speed: `micik_tf.compress()` wall time on the 138M-parameter
      ImageNet VGG-16 shape (`keras.applications.VGG16(weights=None)`: random
      weights, since ImageNet weights cannot be downloaded here), for each
      ratio in `--ratios`, in mode "micik" and "per_layer". Target: 60 s or
      less at ratio 16 on 2 CPU cores (30 s stretch). With `--smoke` the model
      is VGG-16's topology at 1/8 width on 32x32 inputs, for tests.

    python tools/benchmark.py --flagfile=flags/compress_speed.cfg

  recovery: the offline demo's recovery, with ablations. One VGG-style teacher
      is trained on the digits (flags/quickstart.cfg settings), then compressed
      at the first of `--ratios` and recovered four ways on the same teacher:
      MICIK with all losses, without L_sim, without L_kd, and per-layer SVD with
      the same losses. With `--smoke`, a tiny teacher and two steps.

    python tools/benchmark.py --suite=recovery --ratios=16
"""

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS

MODES = ("micik", "per_layer")
TARGET = {"ratio": 16.0, "seconds": 60.0, "stretch_seconds": 30.0, "cpu_cores": 2}


# Each suite's ratios when --ratios is not given.
DEFAULT_RATIOS = {"compress_speed": ["4", "16"], "recovery": ["16"],
                  "curve": ["8", "16", "32", "64", "128"], "cost": ["16"],
                  "paper": [], "deploy": ["16"]}


def define_flags():
    flags.DEFINE_enum("suite", None, sorted(SUITES), "Which benchmark suite to run.")
    flags.DEFINE_string("output_dir", "benchmarks/results", "Where <suite>.json and <suite>.md are written.")
    flags.DEFINE_list("ratios", None, "Target compression ratios, each > 1 (default: the "
                      "suite's own: " + "; ".join(f"{k} {','.join(v) or '-'}"
                                                  for k, v in DEFAULT_RATIOS.items()) + ").")
    flags.DEFINE_integer("seeds", 3, "curve: seeds per cell (0, 1, ...).")
    flags.DEFINE_integer("epochs", None, "curve: recovery epochs per run (default 12).")
    flags.DEFINE_list("methods", None, "curve: methods to run (default: all).")
    flags.DEFINE_bool(
        "smoke",
        False,
        "Tiny models and a step or two of training, so the suite runs in well under a "
        "minute (for tests); results go to --output_dir as usual.",
    )
    flags.register_validator("ratios", _ratios_valid, message="--ratios must be numbers > 1, e.g. --ratios=4,16")
    flags.mark_flag_as_required("suite")


def _ratios_valid(values):
    if values is None:
        return True
    try:
        return len(values) > 0 and all(float(v) > 1 for v in values)
    except ValueError:
        return False


def _kernel_layers(model, path=()):
    """`{path name: layer}` for every Dense/Conv2D leaf, nested models included.

    Path names join the enclosing models' names with "/", as `report()` does.
    """
    import keras

    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(_kernel_layers(layer, path + (layer.name,)))
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            found["/".join(path + (layer.name,))] = layer
    return found


def _squared_norms(model):
    import keras
    import numpy as np

    return {
        name: float(np.sum(np.square(keras.ops.convert_to_numpy(layer.kernel).astype(np.float64))))
        for name, layer in _kernel_layers(model).items()
    }


def _machine():
    import keras
    import numpy as np
    import tensorflow as tf

    import micik_tf

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "micik_tf": micik_tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "git_commit": _git_commit(),
    }


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _build_model(smoke):
    import keras

    if smoke:
        return _small_vgg16(keras), "VGG-16 topology at 1/8 width, 32x32x3 inputs, 10 classes"
    return keras.applications.VGG16(weights=None), "VGG16(weights=None) (ImageNet shape, random weights)"


def _small_vgg16(keras):
    """VGG-16's 13 convolutions and 3 Dense layers at 1/8 width.

    The same groups as the full model (two 3x3x64-input convs become
    3x3x8, the five 512-wide ones 3x3x64, ...) at a size that compresses in
    seconds; even the 32x32 `keras.applications.VGG16` without its top takes
    minutes at ratio 4 on 2 cores.
    """
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for block, (width, convs) in enumerate(((8, 2), (16, 2), (32, 3), (64, 3), (64, 3)), start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                width, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}"
            )(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(512, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(512, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(10, name="predictions")(x)
    return keras.Model(inputs, outputs, name="vgg16_eighth")


def compress_speed(ratios, smoke):
    import keras

    import micik_tf

    keras.utils.set_random_seed(0)
    tic = time.perf_counter()
    model, description = _build_model(smoke)
    build_seconds = time.perf_counter() - tic
    norms = _squared_norms(model)
    total_norm = sum(norms.values())
    print(f"{description}: {model.count_params():,} parameters, built in {build_seconds:.1f}s", flush=True)

    runs = []
    for ratio in ratios:
        for mode in MODES:
            tic = time.perf_counter()
            compressed = micik_tf.compress(model, ratio=ratio, mode=mode, verbose=0)
            seconds = time.perf_counter() - tic
            recorded = micik_tf.report(compressed)
            measured = micik_tf.report(compressed, reference=model)
            errors = {layer["name"]: layer["relative_error"] for layer in measured.layers}
            # Layers kept dense add no error but their norm counts in the total.
            residual = sum(errors[name] ** 2 * norms[name] for name in errors)
            drift = max(
                (abs(a["relative_error"] - errors[a["name"]]) for a in recorded.layers
                 if a["relative_error"] is not None),
                default=0.0,
            )
            run = {
                "mode": mode,
                # Other processes on the machine slow compress() down; the
                # 1-minute load average after the run shows whether there were any.
                "load_average_1min": _load_average(),
                "target_ratio": ratio,
                "seconds": seconds,
                "achieved_ratio": recorded.ratio,
                "params_before": recorded.params_before,
                "params_after": recorded.params_after,
                "factorized_layers": len(measured.layers),
                "groups": len(measured.groups),
                "mean_layer_relative_error": (
                    sum(errors.values()) / len(errors) if errors else None
                ),
                "overall_relative_error": math.sqrt(residual / total_norm),
                # compress() records each layer's error; report(reference=)
                # recomputes it from the weights. They must agree.
                "recorded_vs_recomputed_error_max_diff": drift,
            }
            runs.append(run)
            print(
                f"{mode:<10} ratio {ratio:>5g}: {seconds:6.1f}s, {run['achieved_ratio']:.2f}x, "
                f"mean layer error {run['mean_layer_relative_error']:.4f}, "
                f"overall error {run['overall_relative_error']:.4f}",
                flush=True,
            )
            del compressed
    return {
        "model": description,
        "model_params": int(model.count_params()),
        "model_build_seconds": build_seconds,
        "note": (
            "Random (glorot) weights: their singular values are nearly flat, so the "
            "errors here are far above those of trained weights. The timings are "
            "what this suite is for."
        ),
        "runs": runs,
    }


RECOVERY_VARIANTS = (
    ("micik", dict(mode="micik")),
    ("micik_no_sim", dict(mode="micik", beta=0.0)),
    ("micik_no_kd", dict(mode="micik", alpha=0.0)),
    ("per_layer_kd", dict(mode="per_layer")),
)


def recovery(ratios, smoke):
    import dataclasses
    import tempfile

    import keras

    from micik_tf import recovery_run
    from micik_tf.training import RecoveryConfig

    ratio = ratios[0]
    scratch = tempfile.mkdtemp(prefix="micik_recovery_bench_")
    base = recovery_run.RunConfig(
        model_dir="", dataset="digits", teacher="train",
        teacher_arch="vgg_style_small" if smoke else "vgg_style",
        teacher_epochs=1 if smoke else 20, ratio=ratio, verbose=0,
        steps_per_epoch=2 if smoke else None,
        recovery=RecoveryConfig(epochs=1 if smoke else 30, batch_size=64,
                                learning_rate=2e-3, checkpoint_every=10_000),
    )
    runs, teacher_file = [], None
    for name, change in RECOVERY_VARIANTS:
        keras.utils.set_random_seed(0)
        recovery_change = {k: v for k, v in change.items() if k in ("alpha", "beta")}
        config = dataclasses.replace(
            base, model_dir=os.path.join(scratch, name), mode=change["mode"],
            teacher=teacher_file or "train",
            recovery=dataclasses.replace(base.recovery, **recovery_change),
        )
        report = recovery_run.run(config)
        teacher_file = teacher_file or os.path.join(scratch, name, "teacher.keras")
        runs.append({
            "method": name,
            "target_ratio": ratio,
            "achieved_ratio": report["ratio"],
            "params_before": report["params_before"],
            "params_after": report["params_after"],
            "teacher_accuracy": report["teacher_accuracy"],
            "accuracy_before_recovery": report["student_accuracy_before_recovery"],
            "accuracy": report["student_accuracy"],
            "drop_points": 100 * (report["teacher_accuracy"] - report["student_accuracy"]),
            "wall_seconds": report["wall_seconds"],
            "loss_weights": report["loss_weights"],
        })
        print(f"{name:<14} {report['ratio']:.2f}x  before {runs[-1]['accuracy_before_recovery']:.4f}"
              f"  after {runs[-1]['accuracy']:.4f}  teacher {report['teacher_accuracy']:.4f}", flush=True)
    return {
        "model": "vgg_style teacher on digits" + (" (smoke: vgg_style_small)" if smoke else ""),
        "model_params": runs[0]["params_before"],
        "test_examples": 450,
        "note": ("One teacher, one seed; the digits test split has 450 images, so one "
                 "image is 0.22 points."),
        "runs": runs,
    }


def _recovery_markdown(suite, result):
    lines = [
        f"# {suite}{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Teacher: {result['model']}, {result['model_params']:,} parameters. "
        f"Written {result['written']} by `python tools/benchmark.py --suite={suite} "
        f"--ratios={result['ratios'][0]:g}{' --smoke' if result['smoke'] else ''}`.",
        "",
        "| method | ratio | params after | teacher acc. | before recovery | after recovery | drop (points) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['method']} | {run['achieved_ratio']:.2f} | {run['params_after']:,} "
            f"| {run['teacher_accuracy']:.4f} | {run['accuracy_before_recovery']:.4f} "
            f"| {run['accuracy']:.4f} | {run['drop_points']:.2f} |"
        )
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def _compress_speed_markdown(suite, result):
    lines = [
        f"# {suite}{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Model: {result['model']}, {result['model_params']:,} parameters. "
        f"Machine: {result['machine']['cpu_count']} CPUs, TensorFlow "
        f"{result['machine']['tensorflow']}, Keras {result['machine']['keras']}. "
        f"Written {result['written']} by `python tools/benchmark.py --suite={suite}"
        f"{' --smoke' if result['smoke'] else ''}`.",
        "",
        f"Target: compress() in {TARGET['seconds']:g} s or less at ratio {TARGET['ratio']:g} "
        f"on {TARGET['cpu_cores']} CPU cores ({TARGET['stretch_seconds']:g} s stretch).",
        "",
        "| mode | target ratio | achieved ratio | params before | params after | seconds "
        "| mean layer rel. error | overall rel. error | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        mean = run["mean_layer_relative_error"]
        lines.append(
            f"| {run['mode']} | {run['target_ratio']:g} | {run['achieved_ratio']:.2f} "
            f"| {run['params_before']:,} | {run['params_after']:,} | {run['seconds']:.1f} "
            f"| {'-' if mean is None else f'{mean:.4f}'} | {run['overall_relative_error']:.4f} "
            f"| {run['load_average_1min']} |"
        )
    lines += [
        "",
        result["note"],
        "",
        "Load avg: the machine's 1-minute load average after each run; above the "
        "core count, other processes competed for the CPUs and the time is inflated.",
        "",
    ]
    return "\n".join(lines)


def curve(ratios, smoke):
    from micik_tf.benchmarks import curve as curve_lib

    result, work = curve_lib.run_suite(
        ratios, seeds=FLAGS.seeds, smoke=smoke, epochs=FLAGS.epochs or curve_lib.DEFAULT_EPOCHS,
        output_dir=FLAGS.output_dir, methods=FLAGS.methods or curve_lib.METHOD_ORDER,
    )
    result["_work"] = work
    return result


def _curve_markdown(suite, result):
    from micik_tf.benchmarks import curve as curve_lib

    return curve_lib.markdown(result, _command(suite, result))


def _curve_plot(result, path):
    from micik_tf.benchmarks import curve as curve_lib

    curve_lib.plot(result, path)


def _command(suite, result):
    """The command line that rewrites this suite's results."""
    parts = [f"python tools/benchmark.py --suite={suite}"]
    if FLAGS["ratios"].present:
        parts.append(f"--ratios={','.join(FLAGS.ratios)}")
    for name in ("seeds", "epochs", "methods"):
        if FLAGS[name].present:
            value = FLAGS[name].value
            parts.append(f"--{name}={','.join(value) if isinstance(value, list) else value}")
    if result["smoke"]:
        parts.append("--smoke")
    return " ".join(parts)


# name: (run(ratios, smoke) -> result, markdown(suite, result) -> str, plot(result, path) or None)
SUITES = {
    "compress_speed": (compress_speed, _compress_speed_markdown, None),
    "recovery": (recovery, _recovery_markdown, None),
    "curve": (curve, _curve_markdown, _curve_plot),
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # TF's checkpoint code logs every save at INFO through absl.
    logging.set_verbosity(logging.WARNING)
    suite = FLAGS.suite
    ratios = [float(r) for r in (FLAGS.ratios if FLAGS.ratios is not None else DEFAULT_RATIOS[suite])]
    run_suite, render, draw = SUITES[suite]
    started = time.perf_counter()
    load_before = _load_average()
    result = run_suite(ratios, FLAGS.smoke)
    work = result.pop("_work", None)
    machine = _machine()
    target_runs = [
        r for r in result.get("runs", ())
        if suite == "compress_speed" and r["mode"] == "micik" and r["target_ratio"] == TARGET["ratio"]
    ]
    result.update(
        suite=suite,
        smoke=FLAGS.smoke,
        ratios=ratios,
        machine=dict(machine, load_average_1min_at_start=load_before),
        written=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds_total=time.perf_counter() - started,
    )
    if suite == "compress_speed":
        result["target"] = dict(
            TARGET,
            model="VGG16(weights=None), 138,357,544 parameters",
            # Only the full-size model on the target's core count says anything.
            met=(
                target_runs[0]["seconds"] <= TARGET["seconds"]
                if target_runs and not FLAGS.smoke
                and machine["cpus_usable"] == TARGET["cpu_cores"]
                else None
            ),
        )
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    json_path = os.path.join(FLAGS.output_dir, f"{suite}.json")
    md_path = os.path.join(FLAGS.output_dir, f"{suite}.md")
    from micik_tf.atomic import write_text

    write_text(json_path, json.dumps(result, indent=2) + "\n")
    write_text(md_path, render(suite, result))
    written = [json_path, md_path]
    if draw is not None:
        written.append(os.path.join(FLAGS.output_dir, f"{suite}.png"))
        draw(result, written[-1])
    if work is not None:
        # The suite's resumable state: done with once the results are written.
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

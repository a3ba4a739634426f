"""Compression demo: train a small VGG on digits, compress it, fine-tune it.

Offline and CPU-sized: scikit-learn's bundled handwritten digits (1797 8x8
images), a VGG-style teacher trained for a few epochs, then for each ratio a
MICIK model and a per-layer SVD model (the baseline, at the same parameter
budget), each evaluated straight after compression and after a short plain
cross-entropy fine-tune (followed, as for the teacher, by a re-estimation of
the BatchNorm statistics on the training set). Writes `student.keras` (the MICIK model at the last
ratio) and `demo_results.json` to `--output_dir`.

    python tools/demo.py --output_dir=runs/demo --ratios=4,16
"""

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS

STUDENT_FILE = "student.keras"
RESULTS_FILE = "demo_results.json"
MODES = ("micik", "per_layer")
# Wide enough that ratio 16 is reachable at compress()'s default minimum ranks:
# with 32/64/128 channels those floors cap the ratio near 12.
CHANNELS = (64, 128, 256)


def define_flags():
    flags.DEFINE_string("output_dir", "runs/demo", "Where student.keras and demo_results.json go.")
    flags.DEFINE_list("ratios", ["4", "16"], "Target compression ratios (params_before / params_after), each > 1.")
    flags.DEFINE_integer("epochs", 18, "Teacher training epochs.")
    flags.DEFINE_integer("finetune_epochs", 3, "Plain cross-entropy fine-tuning epochs per compressed model.")
    flags.DEFINE_integer("batch_size", 64, "Batch size for training and evaluation.")
    flags.DEFINE_integer("calibration_examples", 512, "Training images passed to compress() as calibration_data.")
    flags.DEFINE_integer("seed", 0, "Seed of the split, the weights and compress().")
    flags.DEFINE_integer("min_rank", None, "compress(min_rank=...): smallest total rank per layer (default: the library's).")
    flags.DEFINE_bool("overwrite", False, "Replace existing output files instead of refusing.")
    flags.register_validator("ratios", _ratios_valid, message="--ratios must be numbers > 1, e.g. --ratios=4,16")
    for name in ("epochs", "batch_size", "calibration_examples"):
        flags.register_validator(name, lambda v: v >= 1, message=f"--{name} must be >= 1")
    flags.register_validator("finetune_epochs", lambda v: v >= 0, message="--finetune_epochs must be >= 0")


def _ratios_valid(values):
    try:
        return len(values) > 0 and all(float(v) > 1 for v in values)
    except ValueError:
        return False


def load_digits_split(seed):
    """Digits scaled to [0, 1] as (N, 8, 8, 1), split 80/20, stratified."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def build_teacher(keras):
    """A small VGG: three blocks of two 3x3 convs with BatchNorm, GAP, two Dense layers."""
    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = inputs
    for block, channels in enumerate(CHANNELS, start=1):
        if block > 1:
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
        for conv in (1, 2):
            name = f"block{block}_conv{conv}"
            # No bias: the BatchNormalization right after has its own offset.
            x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=name)(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(128, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_vgg")


def compile_classifier(keras, model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def accuracy(model, x, y, batch_size):
    return float(model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)["accuracy"])


def mean_relative_error(report):
    errors = [layer["relative_error"] for layer in report.layers if layer["relative_error"] is not None]
    return sum(errors) / len(errors) if errors else None


def atomic_write_json(path, payload):
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_model(model, path):
    # Keras only writes files that end in ".keras", so the temporary name does too.
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    ratios = [float(r) for r in FLAGS.ratios]
    output_dir = FLAGS.output_dir
    outputs = [os.path.join(output_dir, f) for f in (STUDENT_FILE, RESULTS_FILE)]
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not FLAGS.overwrite:
        # Checked before training so that minutes of work are not thrown away.
        raise SystemExit(
            f"error: {', '.join(existing)} already exist(s); pass --overwrite to "
            "replace, or choose another --output_dir."
        )
    os.makedirs(output_dir, exist_ok=True)

    import numpy as np
    import keras

    import micik_tf

    start = time.perf_counter()
    keras.utils.set_random_seed(FLAGS.seed)
    x_train, x_test, y_train, y_test = load_digits_split(FLAGS.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 8x8x1")

    teacher = build_teacher(keras)
    compile_classifier(keras, teacher, 1e-3)
    print(f"teacher: {teacher.count_params():,} parameters, training {FLAGS.epochs} epochs")
    teacher.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=2)
    raw_accuracy = accuracy(teacher, x_test, y_test, FLAGS.batch_size)
    # On a data set this small the BatchNorm moving statistics lag behind the
    # weights (several points of test accuracy); one pass over the training set
    # with micik_tf's re-estimation fixes them without touching any weight.
    micik_tf.recalibrate_batchnorm(teacher, x_train, max_batches=len(x_train))
    teacher_accuracy = accuracy(teacher, x_test, y_test, FLAGS.batch_size)
    print(
        f"teacher test accuracy: {teacher_accuracy:.4f} "
        f"({raw_accuracy:.4f} before re-estimating BatchNorm statistics)"
    )

    calibration = x_train[: FLAGS.calibration_examples]
    runs, reports, last_micik = [], {}, None
    for ratio in ratios:
        for mode in MODES:
            keras.utils.set_random_seed(FLAGS.seed)
            print(f"\n== {mode}, ratio {ratio:g} ==")
            tic = time.perf_counter()
            student = micik_tf.compress(
                teacher, ratio=ratio, mode=mode, calibration_data=calibration,
                min_rank=FLAGS.min_rank, seed=FLAGS.seed,
            )
            seconds = time.perf_counter() - tic
            rep = micik_tf.report(student)
            compile_classifier(keras, student, 5e-4)
            before = accuracy(student, x_test, y_test, FLAGS.batch_size)
            if FLAGS.finetune_epochs:
                student.fit(
                    x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.finetune_epochs, verbose=2
                )
                # Fine-tuning moves the weights; its moving statistics lag as the teacher's did.
                micik_tf.recalibrate_batchnorm(student, x_train, max_batches=len(x_train))
            after = accuracy(student, x_test, y_test, FLAGS.batch_size)
            print(f"test accuracy: {before:.4f} after compression, {after:.4f} after fine-tuning")
            runs.append(
                {
                    "mode": mode,
                    "target_ratio": ratio,
                    "achieved_ratio": rep.ratio,
                    "params_before": rep.params_before,
                    "params_after": rep.params_after,
                    "compress_seconds": seconds,
                    "accuracy_after_compression": before,
                    "accuracy_after_finetune": after,
                    "mean_relative_error": mean_relative_error(rep),
                    "groups": len(rep.groups),
                }
            )
            reports[(mode, ratio)] = rep
            if mode == "micik":
                last_micik = student

    print(f"\nMICIK report at ratio {max(ratios):g}:")
    print(reports[("micik", max(ratios))])

    student_path, results_path = outputs
    if os.path.exists(student_path) and not FLAGS.overwrite:
        raise SystemExit(f"error: {student_path} appeared while the demo ran; pass --overwrite to replace it.")
    atomic_save_model(last_micik, student_path)
    # The saved file must load with nothing but `import micik_tf` done.
    reloaded = keras.models.load_model(student_path)
    reload_diff = float(
        np.max(np.abs(last_micik.predict(x_test, verbose=0) - reloaded.predict(x_test, verbose=0)))
    )
    payload = {
        "dataset": "sklearn digits (8x8x1), stratified 80/20 split",
        "seed": FLAGS.seed,
        "teacher_epochs": FLAGS.epochs,
        "finetune_epochs": FLAGS.finetune_epochs,
        # Accuracies after fine-tuning are measured after re-estimating the
        # BatchNorm statistics on the training set (no weight changes).
        "batchnorm_reestimated_after_finetune": True,
        "calibration_examples": len(calibration),
        "teacher_params": int(teacher.count_params()),
        "teacher_accuracy": teacher_accuracy,
        "teacher_accuracy_before_bn_reestimation": raw_accuracy,
        "min_rank": FLAGS.min_rank,
        "runs": runs,
        "student_file": STUDENT_FILE,
        "student_mode_ratio": ["micik", ratios[-1]],
        "student_reload_max_abs_diff": reload_diff,
        "seconds_total": time.perf_counter() - start,
    }
    atomic_write_json(results_path, payload)

    print(f"\nteacher: {teacher.count_params():,} params, test accuracy {teacher_accuracy:.4f}")
    header = f"{'mode':<10} {'target':>6} {'achieved':>8} {'params':>9} {'rel.err':>8} {'acc':>7} {'acc+ft':>7}"
    print(header)
    print("-" * len(header))
    for run in runs:
        error = run["mean_relative_error"]
        print(
            f"{run['mode']:<10} {run['target_ratio']:>6g} {run['achieved_ratio']:>7.2f}x "
            f"{run['params_after']:>9,} " + (f"{error:>8.4f}" if error is not None else f"{'-':>8}")
            + f" {run['accuracy_after_compression']:>7.4f} {run['accuracy_after_finetune']:>7.4f}"
        )
    print(f"\nwrote {student_path} (reload max |diff| {reload_diff:.2e}) and {results_path}")
    print(f"total {payload['seconds_total']:.0f}s")


if __name__ == "__main__":
    define_flags()
    app.run(main)

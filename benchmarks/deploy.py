"""Deployment: file sizes, accuracy and TFLite CPU latency of every format,
for the teacher and for MICIK students stacked with pruning and int8.

The demo's setting (flags/quickstart.cfg): a VGG-style teacher trained on the
digits, compressed at `ratio` and recovered for 30 epochs, three ways:

    micik             MICIK only
    micik_pruned_ptq  MICIK + magnitude pruning of the factors to 50% during
                      recovery, then post-training int8 quantization
    micik_pruned_qat  the same with the last 30% of recovery trained on
                      int8-rounded weights (QAT, `--quantize=int8`)

The teacher and every student are exported to each TFLite format and checked
against Keras on the test split (`micik_tf.export`); the latency of each file
is timed at batch 1, interleaved with the teacher's file of the same format,
and reported as a ratio.
"""

import dataclasses
import os
import shutil
import tempfile


from benchmarks.common import digits_run

TFLITE_FORMATS = ("tflite", "tflite_fp16", "tflite_int8_dynamic", "tflite_int8")
PRUNE_SPARSITY = 0.5
VARIANTS = (
    ("micik", dict()),
    ("micik_pruned_ptq", dict(prune_sparsity=PRUNE_SPARSITY)),
    ("micik_pruned_qat", dict(prune_sparsity=PRUNE_SPARSITY, quantize="int8")),
)
# What the stacked pipeline must reach (issue 4): the gzip'd int8 student
# against the teacher's gzip'd float32 .tflite, within a point of its accuracy.
TARGET_SIZE_RATIO = 50.0
TARGET_DROP_POINTS = 1.0


def _base_config(ratio, smoke):
    return digits_run("vgg_style", smoke, 30, ratio=ratio, export=("keras",) + TFLITE_FORMATS)


def run_suite(ratio=16.0, smoke=False, log=print):
    import keras

    from micik_tf import deploy, job
    from micik_tf.recovery import datasets, pipeline
    from micik_tf.deploy import latency

    base = _base_config(ratio, smoke)
    scratch = tempfile.mkdtemp(prefix="micik_deploy_")
    try:
        students, teacher_path = {}, None
        for name, change in VARIANTS:
            keras.utils.set_random_seed(0)
            config = dataclasses.replace(base, model_dir=os.path.join(scratch, name),
                                         teacher=teacher_path or "train", **change)
            report = job.run(config)
            teacher_path = teacher_path or os.path.join(scratch, name, "teacher.keras")
            students[name] = report
            log(f"{name}: {report['ratio']:.2f}x, accuracy {report['student_accuracy']:.4f}, "
                f"sparsity {report['sparsity']:.2f}")

        source = datasets.load("digits")
        representative, _ = pipeline.to_arrays(source.train, 128)
        test_x, test_y = pipeline.to_arrays(source.test)
        teacher = keras.models.load_model(teacher_path)
        teacher_exports = deploy.export(
            teacher, os.path.join(scratch, "teacher_export"), formats=("keras",) + TFLITE_FORMATS,
            representative_data=representative, check_data=test_x, check_labels=test_y,
        )
        teacher_accuracy = students["micik"]["teacher_accuracy"]

        exports = {"teacher": teacher_exports}
        exports.update({name: report["exports"] for name, report in students.items()})
        sample = test_x[0]
        latencies = {}
        for fmt in TFLITE_FORMATS:
            paths = {model: files[fmt]["path"] for model, files in exports.items()}
            latencies[fmt] = latency.median_latencies(paths, sample)
            log(f"latency {fmt}: " + ", ".join(f"{m} {s * 1e6:.0f} us" for m, s in latencies[fmt].items()))

        rows = []
        for model, files in exports.items():
            for fmt, result in files.items():
                lat = latencies.get(fmt, {}).get(model)
                reference = latencies.get(fmt, {}).get("teacher")
                rows.append({
                    "model": model, "format": fmt, "bytes": result["bytes"],
                    "gzip_bytes": result["gzip_bytes"],
                    "accuracy": result.get("accuracy"),
                    "relative_error_vs_keras": result.get("relative_error"),
                    "latency_median_us": None if lat is None else lat * 1e6,
                    "latency_ratio_vs_teacher": None if lat is None else lat / reference,
                })
        teacher_float = exports["teacher"]["tflite"]
        stacked = {}
        for name in ("micik_pruned_ptq", "micik_pruned_qat"):
            int8 = exports[name]["tflite_int8"]
            # Like with like: gzip'd file against gzip'd file, and raw against raw.
            stacked[name] = {
                "file": "tflite_int8",
                "bytes": int8["bytes"],
                "gzip_bytes": int8["gzip_bytes"],
                "teacher_float32_tflite_bytes": teacher_float["bytes"],
                "teacher_float32_tflite_gzip_bytes": teacher_float["gzip_bytes"],
                "gzip_size_ratio": teacher_float["gzip_bytes"] / int8["gzip_bytes"],
                "raw_size_ratio": teacher_float["bytes"] / int8["bytes"],
                "accuracy": int8["accuracy"],
                "drop_points": 100 * (teacher_accuracy - int8["accuracy"]),
                "params_ratio": students[name]["ratio"],
                "sparsity": students[name]["sparsity"],
            }
            stacked[name]["meets_target"] = bool(
                stacked[name]["gzip_size_ratio"] >= TARGET_SIZE_RATIO
                and stacked[name]["drop_points"] <= TARGET_DROP_POINTS
            )
        return {
            "model": "vgg_style teacher on digits" + (" (smoke: vgg_style_small)" if smoke else ""),
            "teacher_params": int(teacher.count_params()),
            "teacher_accuracy": teacher_accuracy,
            "ratio": ratio,
            "prune_sparsity": PRUNE_SPARSITY,
            "test_examples": int(len(test_y)),
            "latency": {"batch": 1, "threads": 1, "block": latency.BLOCK,
                        "blocks": latency.BLOCKS},
            "students": {name: {"ratio": r["ratio"], "params_after": r["params_after"],
                                "accuracy_keras": r["student_accuracy"],
                                "sparsity": r["sparsity"], "quantize": r["quantize"]}
                         for name, r in students.items()},
            "rows": rows,
            "latency_ratios": {fmt: {m: v / lat["teacher"] for m, v in lat.items() if m != "teacher"}
                               for fmt, lat in latencies.items()},
            "stacked": stacked,
            "target": {"size_ratio": TARGET_SIZE_RATIO, "drop_points": TARGET_DROP_POINTS},
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(result, command):
    lines = [
        f"# deploy{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Teacher: {result['model']}, {result['teacher_params']:,} parameters, test accuracy "
        f"{result['teacher_accuracy']:.4f} ({result['test_examples']} images). Students: MICIK at "
        f"{result['ratio']:g}x; `_pruned` adds magnitude pruning of the factors to "
        f"{result['prune_sparsity']:.0%}; `_ptq` is post-training int8, `_qat` trains the last "
        f"30% of recovery on int8-rounded weights. Latency: median of batch-1 TFLite invokes, "
        f"1 thread, interleaved with the teacher's file of the same format in one run (below 1: "
        f"faster than the teacher). "
        f"Written {result['written']} by `{command}`.",
        "",
        "| model | format | bytes | gzip bytes | accuracy | latency ÷ teacher's |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        ratio = "-" if row["latency_ratio_vs_teacher"] is None else f"{row['latency_ratio_vs_teacher']:.2f}"
        lines.append(f"| {row['model']} | {row['format']} | {row['bytes']:,} | {row['gzip_bytes']:,} "
                     f"| {acc} | {ratio} |")
    lines += ["", "Stacked pipeline (MICIK + pruning + int8) against the teacher's float32 "
              "`.tflite`, like with like: gzip'd against gzip'd, and raw against raw:", "",
              "| pipeline | gzip bytes | smaller, gzip'd vs gzip'd | raw bytes | smaller, raw vs raw "
              f"| accuracy | drop (points) | ≥{result['target']['size_ratio']:g}x gzip'd and "
              f"≤{result['target']['drop_points']:g} point |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in result["stacked"].items():
        lines.append(
            f"| {name} | {s['gzip_bytes']:,} | {s['gzip_size_ratio']:.1f}x | {s['bytes']:,} "
            f"| {s['raw_size_ratio']:.1f}x | {s['accuracy']:.4f} "
            f"| {s['drop_points']:.2f} | {'yes' if s['meets_target'] else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def plot(result, path):
    """Gzip'd size and accuracy of every format, teacher against students."""
    from benchmarks.common import figure

    from micik_tf.files import write_figure

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    formats = list(dict.fromkeys(r["format"] for r in result["rows"]))
    cell = {(r["model"], r["format"]): r for r in result["rows"]}
    fig, (size_ax, acc_ax) = figure(1, 2, size=(12, 4.5))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs = [f + i * width for f in range(len(formats))]
        size_ax.bar(xs, [cell[(model, f)]["gzip_bytes"] for f in formats], width, label=model)
        acc_ax.bar(xs, [cell[(model, f)]["accuracy"] or 0 for f in formats], width, label=model)
    for ax in (size_ax, acc_ax):
        ax.set_xticks([f + 0.4 - width / 2 for f in range(len(formats))], formats, rotation=20)
    size_ax.set_yscale("log")
    size_ax.set_ylabel("gzip'd bytes (log scale)")
    acc_ax.set_ylabel("test accuracy")
    acc_ax.set_ylim(max(0.0, min(r["accuracy"] or 0 for r in result["rows"]) - 0.05), 1.0)
    size_ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: deployment files")
    fig.tight_layout()
    write_figure(fig, path)

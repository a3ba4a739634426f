"""What a recovery job leaves behind: the student's exports, `report.json`, a
plot of the training curves, and the summary the binary prints."""

import os
import shutil
import tempfile

from micik_tf import deploy, files
from micik_tf.compression import report as compression_report
from micik_tf.deploy import pruning
from micik_tf.deploy.checks import gzip_size
from micik_tf.deploy.export import ARTIFACTS
from micik_tf.job.config import PRUNING_MODE, QUANTIZE_FORMATS
from micik_tf.recovery import pipeline, strategies

# Training examples used to calibrate int8 activations in the TFLite exports,
# and the first test examples each export is checked on: up to the 10,000 of
# Fashion-MNIST's (or CIFAR's) whole test split, so that a file's accuracy
# and the Keras model's come from the same images there (each result says
# how many it used, `check_examples`).
REPRESENTATIVE_EXAMPLES = 128
CHECK_EXAMPLES = 10_000
EXPORT_DIR = "export"
STUDENT_FILE = "student.keras"


def report(config, data, trainer, teacher, workspace, accuracies, history, resumed_from):
    """The report dict of a finished run (exports and timing added by the caller)."""
    compression = _compression(config, teacher, trainer.student)
    return {
        "dataset": data.source.name,
        "train_examples": data.train_size,
        "teacher_accuracy": accuracies["teacher"],
        "student_accuracy_before_recovery": accuracies["before"],
        "student_accuracy": accuracies["after"],
        "params_before": compression["params_before"],
        "params_after": compression["params_after"],
        "ratio": compression["ratio"],
        "steps": int(trainer.step.numpy()),
        "resumed_from_step": resumed_from,
        "changes_on_resume": workspace.changes,
        "strategy": config.strategy,
        "replicas": trainer.replicas,
        "feature_layers": trainer.feature_layers,
        "loss_weights": {"alpha": config.alpha, "beta": config.beta, "gamma": config.gamma,
                         "temperature": config.temperature, "window": config.window},
        "learning_rate": config.learning_rate,
        "best_epoch_from_step": trainer.best_from_step,
        "history": history,
        "sparsity": trainer.pruner.sparsity()["overall"] if trainer.pruner else 0.0,
        "quantize": config.quantize,
        "qat_from_step": trainer.quantizer.begin_step if trainer.quantizer else None,
        "data_cached": data.cached,
        "compression": compression,
    }


def _compression(config, teacher, student):
    """The compression record: `micik_tf.report()` against the teacher (for a
    student given as a file, e.g. a thin network trained from scratch, it
    lists no factorized layers), or for the pruning baseline the stored
    (nonzero) parameters of the pruned teacher copy. Parameters before are
    always the teacher's."""
    if config.mode == PRUNING_MODE:
        record = {"groups": [], "layers": [], "untouched": [],
                  "params_after": pruning.stored_parameters(student)}
    else:
        record = compression_report(student, reference=teacher).to_dict()
    record["params_before"] = int(teacher.count_params())
    record["ratio"] = record["params_before"] / max(record["params_after"], 1)
    return record


def export_student(config, student, accuracy, data, workspace, strategy):
    """`student.keras` and the deployment formats `--export` and `--quantize`
    ask for, each checked against Keras on the test split. Returns
    `{format: result}` as `micik_tf.export` does."""
    exports = {}
    if "keras" in config.export:
        path = workspace.save_model(student, STUDENT_FILE, strategy)
        if path:
            exports["keras"] = {"path": path, "bytes": os.path.getsize(path),
                                "gzip_bytes": gzip_size(path), "accuracy": accuracy}
    formats = [f for f in config.export if f != "keras"]
    added = QUANTIZE_FORMATS[config.quantize]
    if added and added not in formats:
        formats.append(added)
    if formats:
        exports.update(_deployment_files(student, formats, data, workspace, strategy))
    return exports


def _deployment_files(student, formats, data, workspace, strategy):
    """The folder belongs to this run, so a rerun refreshes it. Under a
    multi-worker strategy every worker exports (variable reads are
    collective); only the chief's files are kept."""
    representative = next(iter(data.calibration.unbatch().batch(REPRESENTATIVE_EXAMPLES)))[0]
    check_x, check_y = pipeline.to_arrays(data.source.test, CHECK_EXAMPLES)
    chief = strategies.is_chief(strategy)
    target = workspace.path(EXPORT_DIR) if chief else tempfile.mkdtemp(
        prefix="micik_worker_export_")

    def export(formats):
        results = deploy.export(student, target, formats=formats,
                                representative_data=representative.numpy(), overwrite=True,
                                check_data=check_x, check_labels=check_y)
        for result in results.values():
            # Which test images the file's accuracy is on: the first this many.
            result["check_examples"] = int(len(check_x))
        return results

    try:
        try:
            return export(formats)
        except (ValueError, FileExistsError):
            # `export` writes all or none; one format's failed check (an int8
            # file that does not run, say) should cost only that format.
            # Every worker fails alike (the same model and data), so the
            # collective reads below stay in step.
            return _export_each(export, formats, target)
    finally:
        if not chief:
            shutil.rmtree(target, ignore_errors=True)


def _export_each(export, formats, target):
    """`{format: result}`, each format exported alone; a failed one's result
    is `{"error": message}` and an earlier run's file of it is removed, so the
    folder holds what report.json says."""
    results = {}
    for fmt in formats:
        try:
            results.update(export([fmt]))
        except (ValueError, FileExistsError) as error:
            results[fmt] = {"error": str(error)}
            stale = os.path.join(target, ARTIFACTS[fmt])
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.lexists(stale):
                os.remove(stale)
    return results


def export_errors(exports):
    """`"--export: ..."`, one line naming each failed format, or None."""
    failed = [f"format {fmt!r}: {r['error']}" for fmt, r in exports.items() if "error" in r]
    return "--export: " + "; ".join(failed) if failed else None


def plot_history(history, teacher_accuracy, path):
    """Loss components and validation accuracy per epoch, as a PNG; returns `path`.

    Drawn on a `matplotlib.figure.Figure` of its own: the user's pyplot state
    and backend are never touched.
    """
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for key, label in (("loss", "total"), ("ce", "CE"), ("kd", "KD"), ("sim", "L_sim"),
                       ("inh", "L_inh")):
        left.plot(epochs, [h[key] for h in history], marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("loss (per step, mean)")
    left.set_yscale("symlog", linthresh=1e-3)
    left.legend()
    if any("val_accuracy" in h for h in history):
        right.plot(epochs, [h.get("val_accuracy") for h in history], marker="o",
                   label="student (val)")
    right.plot(epochs, [h["train_accuracy"] for h in history], marker=".", label="student (train)")
    if teacher_accuracy is not None:
        right.axhline(teacher_accuracy, color="k", linestyle="--", label="teacher (test)")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.legend()
    figure.tight_layout()
    files.write_figure(figure, path)
    return path


def summary_table(report):
    """The few lines `tools/train.py` prints at the end of a run."""
    rows = [
        ("teacher accuracy", f"{report['teacher_accuracy']:.4f}"),
        ("student accuracy before recovery", f"{report['student_accuracy_before_recovery']:.4f}"),
        ("student accuracy", f"{report['student_accuracy']:.4f}"),
        ("parameters", f"{report['params_before']:,} -> {report['params_after']:,}"),
        ("ratio", f"{report['ratio']:.2f}x"),
        ("steps (resumed from)", f"{report['steps']} ({report['resumed_from_step']})"),
        ("wall time", f"{report['wall_seconds']:.1f} s"),
    ]
    for fmt, result in report.get("exports", {}).items():
        accuracy = result.get("accuracy")
        if "error" in result:
            rows.append((f"export {fmt}", "failed (see the error above)"))
            continue
        rows.append((f"export {fmt}",
                     f"{result['bytes']:,} bytes ({result['gzip_bytes']:,} gzip'd)"
                     + ("" if accuracy is None else f", accuracy {accuracy:.4f}")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

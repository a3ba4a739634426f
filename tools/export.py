"""Exports a saved Keras model to deployment formats and checks each one.

    python tools/export.py --model=runs/digits/student.keras \
        --output_dir=runs/digits/export --representative_data=digits

Writes one artifact per format (see micik_tf.deploy.ARTIFACTS), runs each on
check data and compares it with the Keras model, prints a size table and
writes <output_dir>/export_report.json. With --representative_data=digits the
check data is the digits test split, so accuracies are reported too.
"""

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
PROG = "export.py"
REPORT_NAME = "export_report.json"


class UsageError(Exception):
    """A problem with the command line or its files, reported in one line."""


def define_flags():
    """All flags of this binary, defined once (TF official models style)."""
    from micik_tf.deploy import DEFAULT_FORMATS, FORMATS

    flags.DEFINE_string("model", None, "A .keras file saved by Keras 3 (loaded with "
                        "safe_mode on, so files carrying code are refused).")
    flags.DEFINE_string("output_dir", None, "Directory for the artifacts and "
                        f"{REPORT_NAME} (created if missing).")
    flags.DEFINE_list("formats", list(DEFAULT_FORMATS), f"Formats, from: {', '.join(FORMATS)}.")
    flags.DEFINE_string("representative_data", None, "'digits' (the bundled digits, "
                        "scaled to [0, 1], shape (8, 8, 1); its test split is the "
                        "check data) or a .npy file of model inputs. Required for "
                        "tflite_int8.")
    flags.DEFINE_bool("overwrite", False, "Replace artifacts that already exist.")
    flags.DEFINE_bool("debug", False, "Show full tracebacks.")
    flags.mark_flags_as_required(["model", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        return _export()
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _export():
    from absl import logging

    from micik_tf import deploy as export_lib

    # TF's SavedModel writer logs "Assets written to ..." at INFO through absl.
    logging.set_verbosity(logging.WARNING)

    formats = [f.strip() for f in FLAGS.formats if f.strip()]
    unknown = [f for f in formats if f not in export_lib.FORMATS]
    if unknown or not formats:
        raise UsageError(
            f"--formats: unknown or missing format(s) {unknown or formats}; "
            f"choose from {', '.join(export_lib.FORMATS)}."
        )
    if "tflite_int8" in formats and not FLAGS.representative_data:
        raise UsageError(
            "--formats includes tflite_int8, which needs calibration inputs: pass "
            "--representative_data=digits or --representative_data=<inputs.npy>, "
            "or leave tflite_int8 out of --formats."
        )
    model_path = FLAGS.model
    if not os.path.isfile(model_path):
        raise UsageError(f"--model={model_path}: no such file. Give a .keras file "
                         "saved by Keras 3 (model.save('model.keras')).")
    output_dir = FLAGS.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir={output_dir} is an existing file; give a directory.")
    report_path = os.path.join(output_dir, REPORT_NAME)
    # Checked before the (slow) loading, and again by export() itself.
    targets = list(export_lib.artifact_paths(output_dir, formats).values()) + [report_path]
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not FLAGS.overwrite:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass --overwrite to "
                         "replace, or choose another --output_dir.")

    representative, check_x, check_y = _load_data(FLAGS.representative_data)
    model = _load_model(model_path)
    if FLAGS.representative_data == "digits":
        expected = tuple(model.inputs[0].shape[1:])
        if expected != tuple(check_x.shape[1:]):
            raise UsageError(f"--representative_data=digits gives inputs of shape "
                             f"{tuple(check_x.shape[1:])}, but the model takes {expected}. "
                             "Give a .npy file of inputs the model takes.")
    try:
        results = export_lib.export(
            model, output_dir, formats=formats, representative_data=representative,
            overwrite=FLAGS.overwrite, check_data=check_x, check_labels=check_y,
        )
    except (ValueError, FileExistsError) as error:
        if FLAGS.debug:
            raise
        message = str(error).splitlines()[0].replace("overwrite=True (--overwrite)", "--overwrite")
        raise UsageError(message) from None

    report = {
        "model": os.path.abspath(model_path),
        "params": int(model.count_params()),
        "representative_data": FLAGS.representative_data,
        "check_samples": None if check_x is None else int(len(check_x)),
        "reference_accuracy": _accuracy(model, check_x, check_y),
        "formats": results,
    }
    from micik_tf.files import write_json

    write_json(report_path, report)
    print(_table(report))
    print(f"\nWrote {report_path}")
    return 0


def _load_data(spec):
    """Returns `(representative, check_x, check_y)` for --representative_data."""
    import numpy as np

    if not spec:
        return None, None, None
    if spec == "digits":
        from micik_tf.recovery import datasets, pipeline

        source = datasets.load("digits")
        train_x, _ = pipeline.to_arrays(source.train)
        test_x, test_y = pipeline.to_arrays(source.test)
        return train_x, test_x, test_y
    if not spec.endswith(".npy"):
        raise UsageError(f"--representative_data={spec}: give 'digits' or a .npy file "
                         "of model inputs.")
    if not os.path.isfile(spec):
        raise UsageError(f"--representative_data={spec}: no such file.")
    try:
        inputs = np.load(spec, allow_pickle=False)
    except Exception as error:
        from micik_tf.errors import first_line

        raise UsageError(f"--representative_data={spec}: cannot read it as a .npy "
                         f"array ({first_line(error)}).") from None
    return inputs, None, None


def _load_model(path):
    from micik_tf import files

    try:
        return files.load_model(path, "--model")
    except ValueError as error:
        raise UsageError(str(error)) from None


def _accuracy(model, x, y):
    from micik_tf.recovery.evaluation import top1

    if x is None or y is None:
        return None
    return top1(model.predict(x, batch_size=256, verbose=0), y)


def _table(report):
    with_accuracy = report["reference_accuracy"] is not None
    header = (f"{'format':<20} {'bytes':>11} {'gzip bytes':>11} {'B/param':>8} "
              f"{'max abs err':>12} {'rel err':>9}" + (f" {'accuracy':>8}" if with_accuracy else ""))
    lines = [f"{report['params']:,} parameters" + (
        f", Keras model accuracy {report['reference_accuracy']:.4f} on "
        f"{report['check_samples']} check samples" if with_accuracy else ""), "", header]
    for name, r in report["formats"].items():
        line = (f"{name:<20} {r['bytes']:>11,} {r['gzip_bytes']:>11,} "
                f"{r['bytes_per_parameter']:>8.2f} {r['max_abs_error']:>12.3g} "
                f"{r['relative_error']:>9.2e}")
        if with_accuracy:
            line += f" {r['accuracy']:>8.4f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    from native_logs import run_as_filtered_child

    # TensorFlow's native start-up lines would bury the one-line error; they
    # are filtered in a parent process, so that a crash still reports.
    run_as_filtered_child(__file__, PROG)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))

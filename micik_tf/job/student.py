"""The job's student: reused from this run, loaded from a file, or compressed
from the teacher (or, for the pruning baseline, a copy of the teacher)."""

import keras

from micik_tf import files
from micik_tf.compression import compress
from micik_tf.job.config import PRUNING_MODE, UsageError

STUDENT_INIT_FILE = "student_init.keras"


def make_student(config, teacher, data, workspace, strategy):
    """Returns `(student, how it was obtained)`; build it under `strategy.scope()`."""
    saved = workspace.reusable(STUDENT_INIT_FILE)
    if saved:
        student, how = files.load_model(saved, "student"), "reloaded from this run"
    elif config.student:
        try:
            student, how = files.load_model(config.student, "--student"), f"loaded from {config.student}"
        except ValueError as error:
            raise UsageError(str(error)) from None
        workspace.save_model(student, STUDENT_INIT_FILE, strategy)
    else:
        student, how = _compressed(config, teacher, data), f"compressed ({config.mode})"
        workspace.save_model(student, STUDENT_INIT_FILE, strategy)
    if config.mixed_precision:
        student = with_dtype_policy(student, "mixed_float16")
    return student, how


def _compressed(config, teacher, data):
    if config.mode == PRUNING_MODE:
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        return student
    calibrate = config.calibration_batches > 0
    try:
        return compress(
            teacher, ratio=config.ratio, mode=config.mode, share=config.share,
            unique=config.unique, sparse_share=config.sparse_share,
            min_rank=config.min_rank,
            objective=None if config.objective == "auto" else config.objective,
            sequential=config.sequential,
            calibration_data=data.calibration if calibrate else None,
            calibration_batches=max(config.calibration_batches, 1),
            verbose=config.verbose,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"compress(): {error}") from None


def with_dtype_policy(model, policy):
    """A copy of `model` whose layers compute under `policy` (same weights).

    compress() keeps each layer's dtype policy, and a loaded teacher carries
    the float32 policies it was saved with, so mixed precision must be set on
    the student explicitly. Variables stay float32 under mixed_float16.
    """

    def clone(layer):
        layer_config = layer.get_config()
        if "dtype" in layer_config and not isinstance(layer, keras.layers.InputLayer):
            layer_config["dtype"] = policy
        return layer.__class__.from_config(layer_config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy

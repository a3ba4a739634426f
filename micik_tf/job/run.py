"""One recovery job, end to end, as a sequence of named steps.

    config = RunConfig(model_dir="runs/x", dataset="digits", ratio=16)
    report = run(config)

`tools/train.py` parses its flags into a `RunConfig` and calls `run()`; the
benchmarks and tests call it directly. The steps: check the settings, open
the run's folder, load the data, get the teacher, make the student, build
the trainer, recover (resuming where a run stopped), evaluate, export and
write the report.
"""

import time

from micik_tf import files
from micik_tf.compression import recalibrate_batchnorm
from micik_tf.compression.sparse import fill_residuals
from micik_tf.job import outputs
from micik_tf.job.config import (OPTIMIZER_CHANGES, PRUNING_MODE, QAT_FRACTION, ExportError,
                                 UsageError)
from micik_tf.job.data import load_data
from micik_tf.job.student import make_student
from micik_tf.job.teacher import resolve_teacher
from micik_tf.job.workspace import Workspace
from micik_tf.recovery import strategies
from micik_tf.recovery.trainer import RecoveryTrainer

HISTORY_FILE = "history.json"
# Batches of training data that re-estimate BatchNorm statistics.
BATCHNORM_BATCHES = 8


def run(config, strategy=None):
    """Runs one recovery job; returns the report dict (also in report.json).

    Args:
        config: a `RunConfig`.
        strategy: the `tf.distribute.Strategy` (default: built from
            `config.strategy`; multi-worker must build it at program start).

    Raises:
        UsageError: bad settings or input, in one line, before any work
            that the bad input would spoil.
        ExportError: (a UsageError) recovery finished but a deployment
            format failed its check; the error's `report` keeps the rest.
    """
    started = time.perf_counter()
    config.validate()
    strategy = strategy or _strategy(config)
    workspace = Workspace.open(config, strategy)
    data = load_data(config)
    with strategy.scope():
        teacher, teacher_origin = resolve_teacher(config, data, workspace, strategy)
        _log(config, f"teacher {teacher.name}: {teacher.count_params():,} parameters, "
                     f"{teacher_origin}")
        student, student_origin = make_student(config, teacher, data, workspace, strategy)
        _log(config, f"student: {student.count_params():,} parameters, {student_origin}")
        trainer = _trainer(config, teacher, student, data, strategy)
    # A caller that knows the teacher's accuracy (a benchmark running many
    # jobs on one teacher) may skip its evaluation.
    teacher_accuracy = trainer.evaluate(teacher, data.test) if config.evaluate_teacher else None
    accuracy_before = _accuracy_before(config, trainer, student, data)
    if config.sparse_masks == "gradual":
        _start_from_residuals(config, student, teacher, data, strategy)
    resumed_from, history = _recover(config, trainer, data, workspace)
    student_accuracy = trainer.evaluate(student, data.test)
    trainer.cleanup()

    report = outputs.report(
        config, data, trainer, teacher, workspace,
        accuracies=dict(teacher=teacher_accuracy, before=accuracy_before, after=student_accuracy),
        history=history, resumed_from=resumed_from,
    )
    report["exports"] = outputs.export_student(config, student, student_accuracy, data,
                                               workspace, strategy)
    report["wall_seconds"] = time.perf_counter() - started
    if workspace.chief:
        report["plot"] = outputs.plot_history(history, teacher_accuracy,
                                              workspace.path("training_curves.png"))
        files.write_json(workspace.path("report.json"), report)
    failed = outputs.export_errors(report["exports"])
    if failed:
        raise ExportError(f"{failed} Recovery finished: its accuracy and the formats "
                          "that passed are in report.json.", report)
    return report


def _log(config, message):
    if config.verbose:
        print(f"[train] {message}", flush=True)


def _strategy(config):
    try:
        return strategies.get_distribution_strategy(config.strategy, config.num_gpus, config.tpu)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _trainer(config, teacher, student, data, strategy):
    """The recovery trainer, with the pruner and QAT the settings ask for."""
    from micik_tf.deploy.quantization import WeightQuantizer

    total_steps = data.steps_per_epoch * config.epochs
    try:
        pruner = _pruner(config, student, total_steps)
        quantizer = None
        if config.quantize == "int8":
            quantizer = WeightQuantizer(student,
                                        begin_step=int((1 - QAT_FRACTION) * total_steps) + 1)
    except ValueError as error:  # e.g. a --student with no factorized layer to prune
        raise UsageError(f"--prune_sparsity/--quantize: {error}") from None
    before_validation = None
    if config.mode == PRUNING_MODE or config.sparse_masks == "gradual":
        # Pruning shifts every pruned layer's outputs; the baseline (and a
        # gradually pruned sparse part) gets its BatchNorm statistics
        # re-estimated before each validation, as compress() does for a
        # factorized student.
        def before_validation():
            recalibrate_batchnorm(student, data.calibration, BATCHNORM_BATCHES)

    return RecoveryTrainer(teacher, student, strategy, config, config.model_dir,
                           data.steps_per_epoch, verbose=config.verbose, pruner=pruner,
                           quantizer=quantizer, before_validation=before_validation)


def _pruner(config, student, total_steps):
    """Gradual magnitude pruning during recovery, or None.

    Without either, a student with sparse unique parts keeps their masks.
    `--prune_sparsity` prunes the MICIK factors, each to that sparsity (as
    tfmot does). The `magnitude_pruning` baseline prunes the teacher copy's
    kernels with one global threshold on LAMP scores (layer-normalized
    magnitudes), down to as many nonzeros as `--ratio` allows.
    """
    from micik_tf.deploy import pruning

    if config.sparse_masks == "gradual":
        # Made while the sparse parts hold their budget: it prunes back to it.
        pruner = pruning.from_residuals(student, total_steps)
        if pruner is None:
            raise UsageError("--sparse_masks=gradual: the student has no sparse unique "
                             "part (compress with --unique=sparse and a --sparse_share "
                             "above 0).")
        return pruner
    if config.mode != PRUNING_MODE and not config.prune_sparsity:
        # A sparse student's zeros are its masks (compress(unique="sparse")):
        # kept through recovery. None for any other student.
        return pruning.MagnitudePruner.fixed_masks(student)
    if config.mode != PRUNING_MODE:
        return pruning.MagnitudePruner(
            student, pruning.gradual_schedule(config.prune_sparsity, total_steps))
    try:
        target = pruning.sparsity_for_ratio(student, config.ratio)
    except ValueError as error:
        raise UsageError(f"--mode={PRUNING_MODE}: {error}") from None
    return pruning.MagnitudePruner(student, pruning.gradual_schedule(target, total_steps),
                                   include_dense_kernels=True, scope="lamp")


def _start_from_residuals(config, student, teacher, data, strategy):
    """`--sparse_masks=gradual`: recovery starts from the student with its
    sparse parts dense (the teacher's function again, `fill_residuals`), and
    its pruner takes them back to the budget. A resumed run's checkpoint
    then replaces these weights."""
    with strategy.scope():
        try:
            filled = fill_residuals(student, teacher)
        except ValueError as error:
            raise UsageError(f"--sparse_masks=gradual: {error}") from None
        recalibrate_batchnorm(student, data.calibration, BATCHNORM_BATCHES)
    _log(config, f"{filled} sparse parts start dense (the teacher's residuals), "
                 "pruned back to the budget during recovery")


def _accuracy_before(config, trainer, student, data):
    """The student's test accuracy before recovery. For the pruning baseline,
    with its final sparsity applied at once (the student is put back)."""
    if config.mode != PRUNING_MODE:
        return trainer.evaluate(student, data.test)
    weights = student.get_weights()
    trainer.pruner.prune_to(trainer.pruner.final_sparsity)
    recalibrate_batchnorm(student, data.calibration, BATCHNORM_BATCHES)
    accuracy = trainer.evaluate(student, data.test)
    student.set_weights(weights)
    trainer.pruner.reset()
    return accuracy


def _recover(config, trainer, data, workspace):
    """Restores any checkpoint of this run, trains to the end of the schedule,
    and keeps the best validation epoch. Returns `(resumed from step, history)`."""
    fresh_optimizer = bool(workspace.changed_now & set(OPTIMIZER_CHANGES))
    try:
        resumed_from = trainer.restore(with_optimizer=not fresh_optimizer)
    except ValueError as error:
        raise UsageError(str(error)) from None
    history = []
    if resumed_from:
        _log(config, f"resumed from step {resumed_from} (epoch {int(trainer.epoch.numpy()) + 1}, "
                     f"batch {int(trainer.batch.numpy())}) in {config.model_dir}")
        saved = workspace.reusable(HISTORY_FILE)
        history = files.read_json(saved) if saved else []
    history = trainer.fit(data.train_epoch, data.validation, history=history,
                          on_epoch_end=lambda h: files.write_json(workspace.path(HISTORY_FILE), h))
    trainer.restore_best()
    return resumed_from, history

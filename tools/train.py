"""Recovery training for a MICIK-compressed model.

    python tools/train.py --flagfile=flags/quickstart.cfg

Trains (or loads) a teacher, compresses it with micik_tf.compress(), recovers
the student with CE + KD + cross-layer similarity + inheritance losses in a
custom tf.distribute loop, evaluates, exports and writes report.json. Every
flag value is checked when the flags are parsed, before any work starts.
"""

import os
import sys

# Before TensorFlow is imported (define_flags imports it): quiet C++ logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """All flags of this binary, defined once (TF official models style), each
    with the validator of `micik_tf.job.config.RULES`."""
    from micik_tf.compression.allocation import OBJECTIVES
    from micik_tf.compression.compress import UNIQUE_KINDS
    from micik_tf.compression.grouping import SHARE_CHOICES
    from micik_tf.job.config import CHANGEABLE, MODES, QUANTIZE_FORMATS, SPARSE_MASKS, RunConfig
    from micik_tf.recovery.pipeline import CACHE_CHOICES
    from micik_tf.recovery.strategies import STRATEGIES
    from micik_tf.recovery.trainer import OPTIMIZERS, SCHEDULES

    d = RunConfig(model_dir="")  # the defaults
    # Data.
    flags.DEFINE_string("dataset", d.dataset, "'digits' (bundled, offline), 'fashion_mnist' "
                        "(TFDS in --data_dir, else its IDX files), a TFDS name (e.g. "
                        "'cifar10', 'imagenet2012'), or an image folder path.")
    flags.DEFINE_string("data_dir", d.data_dir, "TFDS data directory (prepared data), or a "
                        "folder with the Fashion-MNIST IDX files.")
    flags.DEFINE_integer("image_size", d.image_size, "Resize images to this size.")
    flags.DEFINE_list("augment", list(d.augment), "Training augmentations: flip, crop, shift.")
    flags.DEFINE_float("validation_fraction", d.validation_fraction, "Share of the training "
                       "split held out (fixed for every seed) to pick the best epoch.")
    flags.DEFINE_float("train_fraction", d.train_fraction, "Share of the training split "
                       "trained on (fixed for every seed; 0.1: the limited-data regime).")
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "Shuffle buffer, in examples: "
                         "bounds memory whatever the data set's size.")
    flags.DEFINE_enum("cache", d.cache, CACHE_CHOICES, "Cache the decoded training split in "
                      "memory: auto decides by its size (on up to 2 GiB).")
    # Teacher.
    flags.DEFINE_string("teacher", d.teacher, "'train' (train one here), a .keras path "
                        "(loaded with safe_mode on), or 'app:<Name>' for keras.applications.")
    flags.DEFINE_string("teacher_arch", d.teacher_arch, "Architecture for --teacher=train.")
    flags.DEFINE_integer("teacher_epochs", d.teacher_epochs, "Epochs for --teacher=train.")
    flags.DEFINE_float("teacher_learning_rate", d.teacher_learning_rate,
                       "Peak learning rate for --teacher=train (Adam, cosine decay).")
    flags.DEFINE_string("teacher_weights", d.teacher_weights, "Weights for --teacher=app:<Name>.")
    # Student.
    flags.DEFINE_string("student", d.student, "A compressed .keras model to recover instead of "
                        "compressing the teacher here.")
    flags.DEFINE_float("ratio", d.ratio, "Target compression ratio (parameters), > 1.")
    flags.DEFINE_enum("mode", d.mode, MODES, "Compression mode: MICIK, per-layer SVD, shared "
                      "parts only, or the pruning baseline (the teacher magnitude-pruned "
                      "during recovery to the nonzero parameter count --ratio gives).")
    flags.DEFINE_enum("share", d.share, SHARE_CHOICES, "Shared side of the kernels.")
    flags.DEFINE_integer("min_rank", d.min_rank, "Smallest total rank per compressed layer "
                         "(default: compress()'s, 8 capped at a sixteenth of the smaller "
                         "side). Lower it to reach ratios above 20x on small models; 0, with "
                         "--unique=sparse, lets the allocator leave a layer only its sparse "
                         "part.")
    flags.DEFINE_enum("unique", d.unique, UNIQUE_KINDS, "What each compressed layer keeps "
                      "of its own: a low-rank part, or a low-rank part plus a sparse "
                      "residual (one budget for ranks and nonzeros; the masks stay fixed "
                      "through recovery).")
    flags.DEFINE_float("sparse_share", d.sparse_share, "With --unique=sparse, the share of "
                       "the budget spent on nonzeros, in [0, 1] (unset: the allocator "
                       "chooses; 0: plain MICIK; 1: LAMP pruning).")
    flags.DEFINE_enum("objective", d.objective, ("auto",) + tuple(OBJECTIVES), "What the rank "
                      "allocator minimises over the layers' relative errors e: the sum of e, "
                      "or of -log(1 - e) (never starves a layer); auto: compress()'s "
                      "default for --unique (sum_error for low_rank, log_energy for sparse).")
    flags.DEFINE_enum("sparse_masks", d.sparse_masks, SPARSE_MASKS, "With --unique=sparse: "
                      "fixed keeps the masks compress() chose through recovery; gradual "
                      "starts recovery from the whole residuals (the teacher's function) and "
                      "prunes them back to the budget by LAMP scores on the pruning "
                      "baseline's schedule.")
    flags.DEFINE_bool("sequential", d.sequential, "Fit each layer, in the graph's order, to "
                      "the original outputs from the inputs the compressed layers before it "
                      "produce (needs --calibration_batches > 0).")
    flags.DEFINE_integer("calibration_batches", d.calibration_batches, "Batches for the "
                         "data-aware initialisation and BatchNorm re-estimation (0: off).")
    flags.DEFINE_float("prune_sparsity", d.prune_sparsity, "Magnitude-prune the MICIK factors "
                       "to this sparsity during recovery (tfmot's polynomial schedule; 0: off).")
    flags.DEFINE_enum("quantize", d.quantize, list(QUANTIZE_FORMATS), "fp16 adds the float16 "
                      "TFLite export; int8 trains the last 30% of recovery on int8-rounded "
                      "weights (QAT, straight-through) and adds the full-integer TFLite export.")
    # Losses.
    flags.DEFINE_float("alpha", d.alpha, "Weight of the KD term.")
    flags.DEFINE_float("beta", d.beta, "Weight of the cross-layer similarity term.")
    flags.DEFINE_float("gamma", d.gamma, "Weight of the per-layer inheritance term.")
    flags.DEFINE_float("temperature", d.temperature, "KD temperature.")
    flags.DEFINE_integer("window", d.window, "Layers at most this far apart count as near.")
    flags.DEFINE_float("w_near", d.w_near, "Weight of near layer pairs in L_sim.")
    flags.DEFINE_float("w_far", d.w_far, "Weight of distant layer pairs in L_sim.")
    # Optimisation.
    flags.DEFINE_enum("optimizer", d.optimizer, OPTIMIZERS, "Optimizer.")
    flags.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate.")
    flags.DEFINE_enum("schedule", d.schedule, SCHEDULES, "Learning-rate schedule.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay (adamw).")
    flags.DEFINE_float("clip_norm", d.clip_norm, "Global gradient-norm clipping.")
    flags.DEFINE_integer("epochs", d.epochs, "Recovery epochs.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.")
    flags.DEFINE_integer("steps_per_epoch", d.steps_per_epoch, "Cap on steps per epoch "
                         "(default: one pass over the training split). For smoke runs.")
    flags.DEFINE_integer("seed", d.seed, "Seed of data order and initialisation.")
    flags.DEFINE_bool("mixed_precision", d.mixed_precision, "mixed_float16 with loss scaling.")
    # Run.
    flags.DEFINE_string("model_dir", None, "This run's folder: checkpoints, logs, exports, "
                        "report.json. Rerunning with the same settings resumes.")
    flags.DEFINE_list("allow_changes", list(d.allow_changes), "Settings a resumed run may "
                      f"change (recorded in report.json): any of {', '.join(CHANGEABLE)}.")
    flags.DEFINE_enum("strategy", d.strategy, STRATEGIES, "tf.distribute strategy.")
    flags.DEFINE_integer("num_gpus", d.num_gpus, "GPUs for one_device / mirrored.")
    flags.DEFINE_string("tpu", d.tpu, "TPU name or address for --strategy=tpu.")
    flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into N logical devices "
                         "(to run --strategy=mirrored without GPUs, e.g. in tests).")
    flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Steps between checkpoints.")
    flags.DEFINE_list("export", list(d.export), "Export formats: keras (student.keras) and any "
                      "of saved_model, tflite, tflite_fp16, tflite_int8_dynamic, tflite_int8 "
                      "(into <model_dir>/export, each checked against Keras).")
    flags.DEFINE_bool("deterministic", False, "Enable TF op determinism.")
    flags.DEFINE_integer("verbose", d.verbose, "0: quiet; 1: progress bars and logs.")
    flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
    flags.mark_flag_as_required("model_dir")
    _register_validators()


def _register_validators():
    from micik_tf.job.config import CROSS_RULES, RULES, passes

    for name, (check, expected) in RULES.items():
        flags.register_validator(name, lambda v, check=check: passes(check, v),
                                 message=f"expected {expected}")
    for names, check, message in CROSS_RULES:
        flags.register_multi_flags_validator(
            list(names), lambda values, check=check: passes(check, values), message=message)


def config_from_flags():
    """A `RunConfig` whose every setting is the flag of the same name."""
    import dataclasses

    from micik_tf.job import RunConfig

    values = {}
    for field in dataclasses.fields(RunConfig):
        if field.name not in FLAGS:
            continue  # settings for programs that run jobs, not for this binary
        value = FLAGS[field.name].value
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return RunConfig(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # TF's checkpoint code logs every save at INFO through absl.
    logging.set_verbosity(logging.WARNING)
    from micik_tf.recovery import strategies

    if FLAGS.logical_cpus:
        strategies.use_logical_cpus(FLAGS.logical_cpus)
    import keras
    import tensorflow as tf

    from micik_tf import job

    # The strategy comes first: MultiWorkerMirroredStrategy must configure
    # collective ops before TensorFlow runs anything (seeding included).
    try:
        strategy = strategies.get_distribution_strategy(FLAGS.strategy, FLAGS.num_gpus, FLAGS.tpu)
    except ValueError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        report = job.run(config_from_flags(), strategy)
    except job.ExportError as error:
        # Recovery finished; only some files failed their checks: the run's
        # summary still shows, and the exit status is not bad input's.
        print(f"train.py: error: {error}", file=sys.stderr)
        _summary(error.report)
        return 1
    except job.UsageError as error:
        if FLAGS.debug:
            raise
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    _summary(report)
    return 0


def _summary(report):
    if FLAGS.verbose:
        print()
        print(job.summary_table(report))


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))

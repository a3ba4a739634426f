"""Recovery training for a MICIK-compressed model.

    python tools/train.py --flagfile=flags/quickstart.cfg

Trains (or loads) a teacher, compresses it with micik_tf.compress(), recovers
the student with CE + KD + cross-layer similarity + inheritance losses in a
custom tf.distribute loop, evaluates, exports and writes report.json.
"""

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    """All flags of this binary, defined once (TF official models style)."""
    # Data.
    flags.DEFINE_string("dataset", "digits", "'digits' (bundled, offline), a TFDS name "
                        "(e.g. 'cifar10', 'imagenet2012'), or an image folder path.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (prepared data).")
    flags.DEFINE_integer("image_size", None, "Resize images to this size (TFDS, folders).")
    flags.DEFINE_list("augment", [], "Training augmentations: flip, crop, shift.")
    # Teacher.
    flags.DEFINE_string("teacher", "train", "'train' (train one here), a .keras path "
                        "(loaded with safe_mode on), or 'app:<Name>' for keras.applications.")
    flags.DEFINE_string("teacher_arch", "vgg_style", "Architecture for --teacher=train.")
    flags.DEFINE_integer("teacher_epochs", 20, "Epochs for --teacher=train.")
    flags.DEFINE_string("teacher_weights", "imagenet", "Weights for --teacher=app:<Name>.")
    # Compression.
    flags.DEFINE_float("ratio", 16.0, "Target compression ratio (parameters), > 1.")
    flags.DEFINE_enum("mode", "micik", ["micik", "per_layer", "common_only", "magnitude_pruning"],
                      "Compression mode: MICIK, per-layer SVD, shared parts only, or the "
                      "pruning baseline (the teacher magnitude-pruned during recovery to "
                      "the nonzero parameter count --ratio gives).")
    flags.DEFINE_enum("share", "auto", ["auto", "input", "output"], "Shared side of the kernels.")
    flags.DEFINE_integer("min_rank", None, "Smallest total rank per compressed layer "
                         "(default: compress()'s, 8 capped at a sixteenth of the smaller "
                         "side). Lower it to reach ratios above 20x on small models.")
    flags.DEFINE_float("prune_sparsity", 0.0, "Magnitude-prune the MICIK factors to this "
                       "sparsity during recovery (tfmot's polynomial schedule; 0: off).")
    flags.DEFINE_enum("quantize", "none", ["none", "fp16", "int8"], "Quantize the "
                      "student for deployment: fp16 adds the float16 TFLite export; int8 "
                      "trains the last 30% of recovery on int8-rounded weights (QAT, "
                      "straight-through) and adds the full-integer TFLite export.")
    flags.DEFINE_integer("calibration_batches", 8, "Batches for the data-aware "
                         "initialisation and BatchNorm re-estimation (0: off).")
    # Losses.
    flags.DEFINE_float("alpha", 1.0, "Weight of the KD term.")
    flags.DEFINE_float("beta", 1.0, "Weight of the cross-layer similarity term.")
    flags.DEFINE_float("gamma", 0.5, "Weight of the per-layer inheritance term.")
    flags.DEFINE_float("temperature", 4.0, "KD temperature.")
    flags.DEFINE_integer("window", 1, "Layers at most this far apart count as near.")
    flags.DEFINE_float("w_near", 1.0, "Weight of near layer pairs in L_sim.")
    flags.DEFINE_float("w_far", 0.5, "Weight of distant layer pairs in L_sim.")
    # Optimisation.
    flags.DEFINE_enum("optimizer", "adam", ["adam", "adamw", "sgd"], "Optimizer.")
    flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
    flags.DEFINE_enum("schedule", "cosine", ["cosine", "constant"], "Learning-rate schedule.")
    flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (adamw).")
    flags.DEFINE_float("clip_norm", None, "Global gradient-norm clipping.")
    flags.DEFINE_integer("epochs", 10, "Recovery epochs.")
    flags.DEFINE_integer("batch_size", 64, "Global batch size.")
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: "
                         "one pass over the training split). For smoke runs.")
    flags.DEFINE_integer("seed", 0, "Seed of data order and initialisation.")
    flags.DEFINE_bool("mixed_precision", False, "mixed_float16 with loss scaling.")
    # Run.
    flags.DEFINE_string("model_dir", None, "Checkpoints, logs, exports, report.json.")
    flags.DEFINE_enum("strategy", "default", ["default", "one_device", "mirrored",
                      "multi_worker_mirrored", "tpu"], "tf.distribute strategy.")
    flags.DEFINE_integer("num_gpus", 0, "GPUs for one_device / mirrored.")
    flags.DEFINE_string("tpu", "", "TPU name or address for --strategy=tpu.")
    flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into N logical devices "
                         "(to run --strategy=mirrored without GPUs, e.g. in tests).")
    flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
    flags.DEFINE_list("export", ["keras"], "Export formats: keras (student.keras) and any of "
                      "saved_model, tflite, tflite_fp16, tflite_int8_dynamic, tflite_int8 "
                      "(into <model_dir>/export, each checked against Keras).")
    flags.DEFINE_bool("deterministic", False, "Enable TF op determinism.")
    flags.DEFINE_integer("verbose", 1, "0: quiet; 1: progress bars and logs.")
    flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
    flags.mark_flag_as_required("model_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF's checkpoint code logs every save at INFO through absl.
    logging.set_verbosity(logging.WARNING)
    from micik_tf import distribute

    if FLAGS.logical_cpus:
        distribute.use_logical_cpus(FLAGS.logical_cpus)
    import keras
    import tensorflow as tf

    from micik_tf import recovery_run
    from micik_tf.training import RecoveryConfig

    # The strategy comes first: MultiWorkerMirroredStrategy must configure
    # collective ops before TensorFlow runs anything (seeding included).
    try:
        strategy = distribute.get_distribution_strategy(FLAGS.strategy, FLAGS.num_gpus, FLAGS.tpu)
    except ValueError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    from micik_tf.deployment import FORMATS

    unknown = set(FLAGS.export) - set(FORMATS)
    if unknown:
        print(f"train.py: error: --export: unknown format(s) {sorted(unknown)}; "
              f"supported: {', '.join(FORMATS)}.", file=sys.stderr)
        return 2
    config = recovery_run.RunConfig(
        model_dir=FLAGS.model_dir, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        image_size=FLAGS.image_size, augment=tuple(FLAGS.augment), teacher=FLAGS.teacher,
        teacher_arch=FLAGS.teacher_arch, teacher_epochs=FLAGS.teacher_epochs,
        teacher_weights=FLAGS.teacher_weights, ratio=FLAGS.ratio, mode=FLAGS.mode,
        share=FLAGS.share, min_rank=FLAGS.min_rank, calibration_batches=FLAGS.calibration_batches,
        strategy=FLAGS.strategy, num_gpus=FLAGS.num_gpus, tpu=FLAGS.tpu,
        export=tuple(FLAGS.export), verbose=FLAGS.verbose,
        steps_per_epoch=FLAGS.steps_per_epoch, prune_sparsity=FLAGS.prune_sparsity,
        quantize=FLAGS.quantize,
        recovery=RecoveryConfig(
            alpha=FLAGS.alpha, beta=FLAGS.beta, gamma=FLAGS.gamma,
            temperature=FLAGS.temperature, window=FLAGS.window, w_near=FLAGS.w_near,
            w_far=FLAGS.w_far, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
            optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
            schedule=FLAGS.schedule, weight_decay=FLAGS.weight_decay,
            clip_norm=FLAGS.clip_norm, mixed_precision=FLAGS.mixed_precision,
            checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed,
        ),
    )
    try:
        report = recovery_run.run(config, strategy)
    except recovery_run.UsageError as error:
        if FLAGS.debug:
            raise
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    if FLAGS.verbose:
        print()
        print(recovery_run.summary_table(report))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))

"""One recovery run end to end: teacher, compression, recovery, evaluation,
exports and report. `tools/train.py` parses flags into a `RunConfig` and calls
`run()`; tests call `run()` directly on tiny configurations."""

import dataclasses
import inspect
import json
import os
import tempfile
import time

import keras
import tensorflow as tf

import micik_tf
from micik_tf import data as data_lib
from micik_tf import distribute, models
from micik_tf.atomic import atomic_path, write_figure, write_json
from micik_tf.training import RecoveryConfig, RecoveryTrainer

TEACHER_ARCHS = ("vgg_style", "vgg_style_small", "cifar_vgg16", "vgg16_half", "googlenet")
# The baseline that does not factorize: the teacher itself, magnitude-pruned
# during recovery to as many nonzero parameters as `ratio` allows.
PRUNING_MODE = "magnitude_pruning"
MODES = ("micik", "per_layer", "common_only", PRUNING_MODE)
# --quantize: the TFLite format each choice adds to the exports; "int8" also
# trains the final QAT_FRACTION of the recovery steps on int8-rounded weights.
QUANTIZE_FORMATS = {"none": None, "fp16": "tflite_fp16", "int8": "tflite_int8"}
QAT_FRACTION = 0.3


class UsageError(ValueError):
    """Bad input from the user: reported as one line, without a traceback."""


@dataclasses.dataclass
class RunConfig:
    model_dir: str
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    augment: tuple = ()
    teacher: str = "train"
    teacher_arch: str = "vgg_style"
    teacher_epochs: int = 20
    teacher_weights: str = "imagenet"
    ratio: float = 16.0
    mode: str = "micik"
    share: str = "auto"
    min_rank: int | None = None
    calibration_batches: int = 8
    validation_fraction: float = 0.1
    strategy: str = "default"
    num_gpus: int = 0
    tpu: str = ""
    export: tuple = ("keras",)
    steps_per_epoch: int | None = None
    prune_sparsity: float = 0.0
    quantize: str = "none"
    recovery: RecoveryConfig = dataclasses.field(default_factory=RecoveryConfig)
    verbose: int = 1

    def fingerprint(self):
        """What decides the student's architecture and data: a resumed run
        must agree on all of it."""
        return {
            "dataset": self.dataset,
            "image_size": self.image_size,
            "teacher": self.teacher,
            "teacher_arch": self.teacher_arch if self.teacher == "train" else None,
            "prune_sparsity": float(self.prune_sparsity),
            "quantize": self.quantize,
            "ratio": float(self.ratio),
            "mode": self.mode,
            "share": self.share,
            "min_rank": self.min_rank,
            "seed": self.recovery.seed,
            "batch_size": self.recovery.batch_size,
        }


def _log(config, message):
    if config.verbose:
        print(f"[train] {message}", flush=True)


def check_model_dir(config):
    """Refuses a model_dir that holds another run's checkpoints."""
    path = os.path.join(config.model_dir, "run.json")
    ckpt = os.path.join(config.model_dir, "checkpoints")
    mine = config.fingerprint()
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f).get("fingerprint", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise UsageError(
                f"--model_dir {config.model_dir} holds a different run ({detail}). "
                "Use a new --model_dir, or delete that one to start over."
            )
        return True
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        raise UsageError(
            f"--model_dir {config.model_dir} holds checkpoints of an unknown run "
            "(no run.json). Use a new --model_dir."
        )
    return False


def load_teacher(config, source, strategy):
    """The teacher: reloaded from this run, loaded from a file or
    keras.applications, or trained here. Returns `(model, how)`."""
    saved = os.path.join(config.model_dir, "teacher.keras")
    if os.path.exists(saved):
        return keras.models.load_model(saved), "reloaded from this run"
    spec = config.teacher
    if spec == "train":
        return _train_teacher(config, source, strategy, saved), f"trained here ({config.teacher_arch})"
    if spec.startswith("app:"):
        name = spec[4:]
        if not hasattr(keras.applications, name):
            raise UsageError(f"--teacher={spec}: keras.applications has no model {name!r}.")
        weights = None if config.teacher_weights in ("", "none", "None") else config.teacher_weights
        builder = getattr(keras.applications, name)
        kwargs = dict(weights=weights, input_shape=source.input_shape, classes=source.num_classes)
        # The losses take logits (CE and KD with from_logits, KD's temperature
        # divides logits), so the softmax head is left off.
        if "classifier_activation" in inspect.signature(builder).parameters:
            kwargs["classifier_activation"] = None
        try:
            model = builder(**kwargs)
        except Exception as error:  # downloads and shape checks fail in many ways
            raise UsageError(f"--teacher={spec}: cannot build it ({_first_line(error)}).") from None
        return model, f"keras.applications.{name}"
    if not os.path.exists(spec):
        raise UsageError(
            f"--teacher={spec}: no such file. Give a .keras file, 'app:<Name>' "
            "for keras.applications, or 'train' to train one."
        )
    try:
        # safe_mode stays on: a .keras file can carry code (Lambda layers),
        # and we never execute it silently.
        model = keras.models.load_model(spec, safe_mode=True)
    except Exception as error:
        if "safe_mode" in str(error):
            raise UsageError(
                f"--teacher={spec}: the file carries code (e.g. a Lambda layer), "
                "which Keras' safe_mode refuses to run. Rebuild the teacher "
                "without Lambda layers (use registered custom layers)."
            ) from None
        raise UsageError(
            f"--teacher={spec}: cannot load it as a Keras 3 model "
            f"({_first_line(error)}). Is it a .keras file saved by Keras 3?"
        ) from None
    return model, f"loaded from {spec}"


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _train_teacher(config, source, strategy, path):
    if config.teacher_arch not in TEACHER_ARCHS:
        raise UsageError(f"--teacher_arch={config.teacher_arch!r}: use one of {TEACHER_ARCHS}.")
    if config.teacher_arch == "vgg_style":
        model = models.vgg_style(source.input_shape, source.num_classes)
    elif config.teacher_arch == "cifar_vgg16":
        model = models.cifar_vgg16(source.input_shape, source.num_classes)
    elif config.teacher_arch == "googlenet":
        model = models.googlenet(source.input_shape, source.num_classes)
    elif config.teacher_arch == "vgg16_half":
        model = models.cifar_vgg16(source.input_shape, source.num_classes, dense=256,
                                   width=0.5, name="vgg16_half")
    else:
        model = models.vgg_style(source.input_shape, source.num_classes,
                                 widths=(16, 16, 32, 32), dense=32)
    batch = config.recovery.batch_size
    train = data_lib.pipeline(source.train, batch, training=True, seed=config.recovery.seed,
                              augment=config.augment)
    steps = config.teacher_epochs * max(1, int(source.train_size or 1000) // batch)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train, epochs=config.teacher_epochs, verbose=2 if config.verbose else 0)
    save_keras(model, path, strategy)
    return model


def with_dtype_policy(model, policy):
    """A copy of `model` whose layers compute under `policy` (same weights).

    compress() keeps each layer's dtype policy, and a loaded teacher carries
    the float32 policies it was saved with, so mixed precision must be set on
    the student explicitly. Variables stay float32 under mixed_float16.
    """

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def save_keras(model, path, strategy=None):
    """Saves `.keras` atomically (temporary file in the same folder, then rename).

    Under a multi-worker strategy every worker must save (reading distributed
    variables is collective); only the chief's file is kept.
    """
    if strategy is not None and not distribute.is_chief(strategy):
        with tempfile.TemporaryDirectory() as scratch:
            model.save(os.path.join(scratch, "discard.keras"))
        return
    with atomic_path(path) as tmp:
        model.save(tmp)


def _split_validation(source, config):
    """Keeps a validation slice of the training set for picking the best
    student, so the test split is only used for the reported accuracy."""
    if not source.train_size or config.validation_fraction <= 0:
        return source.train, source.test, source.train_size
    n_val = max(1, int(source.train_size * config.validation_fraction))
    fixed = source.train.shuffle(source.train_size, seed=12345, reshuffle_each_iteration=False)
    return fixed.skip(n_val), fixed.take(n_val), source.train_size - n_val


def run(config, strategy=None):
    """Runs one recovery job; returns the report dict (also in report.json).

    Args:
        config: a `RunConfig`.
        strategy: the `tf.distribute.Strategy` (default: built from
            `config.strategy`; multi-worker must build it at program start).
    """
    start = time.perf_counter()
    rc = config.recovery
    if not (isinstance(config.ratio, (int, float)) and config.ratio > 1):
        raise UsageError(f"--ratio must be a number > 1. Received: {config.ratio!r}")
    if config.mode not in MODES:
        raise UsageError(f"--mode={config.mode!r}: use one of {', '.join(MODES)}.")
    if config.mode == PRUNING_MODE and config.prune_sparsity:
        raise UsageError(f"--mode={PRUNING_MODE} sets its own sparsity from --ratio; "
                         "leave --prune_sparsity at 0.")
    if config.quantize not in QUANTIZE_FORMATS:
        raise UsageError(f"--quantize={config.quantize!r}: use one of "
                         f"{', '.join(QUANTIZE_FORMATS)}.")
    if rc.batch_size < 1 or rc.epochs < 0:
        raise UsageError("--batch_size must be >= 1 and --epochs >= 0.")
    if strategy is None:
        try:
            strategy = distribute.get_distribution_strategy(config.strategy, config.num_gpus, config.tpu)
        except ValueError as error:
            raise UsageError(str(error)) from None
    try:
        source = data_lib.load(config.dataset, data_dir=config.data_dir,
                               image_size=config.image_size, seed=rc.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    os.makedirs(config.model_dir, exist_ok=True)
    resuming = check_model_dir(config)
    chief = distribute.is_chief(strategy)
    if chief and not resuming:
        write_json(os.path.join(config.model_dir, "run.json"), {"fingerprint": config.fingerprint()})
    preprocess = (
        models.application_preprocessing(config.teacher[4:])
        if config.teacher.startswith("app:") else None
    )
    if preprocess is not None:
        # keras.applications weights expect their own input scaling.
        source = dataclasses.replace(
            source,
            train=source.train.map(lambda x, y: (preprocess(x), y)),
            test=source.test.map(lambda x, y: (preprocess(x), y)),
        )
    train, validation, train_size = _split_validation(source, config)
    batch = rc.batch_size
    steps_per_epoch = max(1, int(train_size or 1000) // batch)
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(config.steps_per_epoch))
    eval_batch = max(batch, 64)

    def train_epoch(epoch):
        ds = data_lib.pipeline(train, batch, training=True, seed=rc.seed + epoch,
                               augment=config.augment, drop_remainder=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return ds.with_options(options).take(steps_per_epoch)

    val_ds = data_lib.pipeline(validation, eval_batch, training=False)
    test_ds = data_lib.pipeline(source.test, eval_batch, training=False)
    calibration = data_lib.pipeline(train, batch, training=False)

    with strategy.scope():
        teacher, how = load_teacher(config, source, strategy)
        _log(config, f"teacher {teacher.name}: {teacher.count_params():,} parameters, {how}")
        init_path = os.path.join(config.model_dir, "student_init.keras")
        if os.path.exists(init_path):
            student = keras.models.load_model(init_path)
            _log(config, "compressed student reloaded from this run")
        elif config.mode == PRUNING_MODE:
            student = keras.models.clone_model(teacher)
            student.set_weights(teacher.get_weights())
            save_keras(student, init_path, strategy)
        else:
            try:
                student = micik_tf.compress(
                    teacher, ratio=config.ratio, mode=config.mode, share=config.share,
                    min_rank=config.min_rank,
                    calibration_data=calibration if config.calibration_batches > 0 else None,
                    calibration_batches=max(config.calibration_batches, 1),
                    verbose=config.verbose,
                )
            except (TypeError, ValueError) as error:
                raise UsageError(f"compress(): {error}") from None
            save_keras(student, init_path, strategy)
        if rc.mixed_precision:
            student = with_dtype_policy(student, "mixed_float16")
        pruner = _pruner(student, config, steps_per_epoch * rc.epochs)
        quantizer = None
        if config.quantize == "int8":
            from micik_tf.quantization import WeightQuantizer

            quantizer = WeightQuantizer(
                student, begin_step=int((1 - QAT_FRACTION) * steps_per_epoch * rc.epochs) + 1)
        trainer = RecoveryTrainer(teacher, student, strategy, rc, config.model_dir,
                                  steps_per_epoch, verbose=config.verbose, pruner=pruner,
                                  quantizer=quantizer)

    teacher_accuracy = trainer.evaluate(teacher, test_ds)
    if config.mode == PRUNING_MODE:
        before = _one_shot_pruned_accuracy(trainer, student, pruner, test_ds)
    else:
        before = trainer.evaluate(student, test_ds)
    resumed_from = trainer.restore()
    if resumed_from:
        _log(config, f"resumed from step {resumed_from} (epoch {int(trainer.epoch.numpy()) + 1}, "
                     f"batch {int(trainer.batch.numpy())}) in {config.model_dir}")
    history_path = os.path.join(config.model_dir, "history.json")
    history = []
    if resumed_from and os.path.exists(history_path):
        with open(history_path) as f:
            history = json.load(f)
    history = trainer.fit(train_epoch, val_ds, history=history,
                          on_epoch_end=lambda h: write_json(history_path, h))
    if trainer.pruner is None and trainer.quantizer is None:
        # With pruning (or QAT), an earlier "best" epoch would be less sparse
        # (or not yet trained for int8) than the end: keep the final weights.
        trainer.restore_best()
    student_accuracy = trainer.evaluate(student, test_ds)
    trainer.cleanup()

    if config.mode == PRUNING_MODE:
        compression = _pruned_compression(teacher, student)
    else:
        compression = micik_tf.report(student, reference=teacher).to_dict()
    report = {
        "dataset": source.name,
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy_before_recovery": before,
        "student_accuracy": student_accuracy,
        "params_before": compression["params_before"],
        "params_after": compression["params_after"],
        "ratio": compression["ratio"],
        "steps": int(trainer.step.numpy()),
        "resumed_from_step": resumed_from,
        "wall_seconds": time.perf_counter() - start,
        "strategy": config.strategy,
        "replicas": strategy.num_replicas_in_sync,
        "feature_layers": trainer.feature_layers,
        "loss_weights": {"alpha": rc.alpha, "beta": rc.beta, "gamma": rc.gamma,
                         "temperature": rc.temperature, "window": rc.window},
        "history": history,
        "sparsity": trainer.pruner.sparsity()["overall"] if trainer.pruner else 0.0,
        "quantize": config.quantize,
        "qat_from_step": quantizer.begin_step if quantizer is not None else None,
        "compression": compression,
        "exports": {},
    }
    if "keras" in config.export:
        path = os.path.join(config.model_dir, "student.keras")
        save_keras(student, path, strategy)
        if chief:
            from micik_tf.deployment import gzip_size

            report["exports"]["keras"] = {"path": path, "bytes": os.path.getsize(path),
                                          "gzip_bytes": gzip_size(path),
                                          "accuracy": student_accuracy}
    deploy = [f for f in config.export if f != "keras"]
    added = QUANTIZE_FORMATS[config.quantize]
    if added and added not in deploy:
        deploy.append(added)
    if deploy:
        report["exports"].update(_export_deployment(student, deploy, train, source.test, config, strategy))
    if chief:
        plot_path = os.path.join(config.model_dir, "training_curves.png")
        plot_history(history, teacher_accuracy, plot_path)
        report["plot"] = plot_path
        write_json(os.path.join(config.model_dir, "report.json"), report)
    return report


def _pruner(student, config, total_steps):
    """Magnitude pruning during recovery (None if off).

    tfmot's polynomial schedule: from 0 to the target sparsity over the first
    70% of the steps, in ten increments; the rest of recovery heals the
    network. The target is `prune_sparsity` of the MICIK factors, or, in
    `magnitude_pruning` mode, the sparsity of the teacher's kernels at which
    the nonzero parameters meet `ratio`.
    """
    from micik_tf import pruning

    include_dense = config.mode == PRUNING_MODE
    target = pruning_sparsity_for_ratio(student, config.ratio) if include_dense else config.prune_sparsity
    if not target:
        return None
    if not 0 < target < 1:
        raise UsageError(f"--prune_sparsity must be in [0, 1). Received: {target}")
    end = max(1, int(0.7 * total_steps))
    frequency = max(1, end // 10)
    schedule = pruning.PolynomialDecay(
        0.0, target, begin_step=0,
        end_step=frequency * max(1, end // frequency), frequency=frequency,
    )
    return pruning.MagnitudePruner(student, schedule, include_dense_kernels=include_dense)


def pruning_sparsity_for_ratio(model, ratio):
    """The kernel sparsity at which `model`'s nonzero parameters are
    `count_params() / ratio`: the same number of stored parameters as a
    compressed model at `ratio`. Biases, BatchNorm and every other variable
    stay dense and count in full."""
    from micik_tf import pruning

    import numpy as np

    kernels = sum(int(np.prod(v.shape)) for _, v in pruning.prunable_variables(model, True))
    total = model.count_params()
    sparsity = (total - total / ratio) / max(kernels, 1)
    if sparsity >= 1:
        raise UsageError(
            f"--ratio={ratio:g} cannot be reached by pruning: {total - kernels:,} of "
            f"{total:,} parameters are not kernels. The largest reachable ratio is "
            f"{total / max(total - kernels, 1):.2f}."
        )
    return sparsity


def _one_shot_pruned_accuracy(trainer, student, pruner, test_ds):
    """Accuracy with the target sparsity applied at once (the pruning
    baseline's "before recovery"); the student's weights are put back."""
    from micik_tf import pruning

    weights = student.get_weights()
    target = pruner.schedule.final_sparsity
    one_shot = pruning.MagnitudePruner(student, pruning.ConstantSparsity(target, 0, frequency=1),
                                       include_dense_kernels=True)
    one_shot.update(0)
    accuracy = trainer.evaluate(student, test_ds)
    student.set_weights(weights)
    return accuracy


def _pruned_compression(teacher, student):
    """The compression record of a pruned student: stored parameters are all
    but the zeros of its pruned kernels (everything else is kept dense)."""
    import numpy as np

    from micik_tf import pruning

    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(v) == 0))
                for _, v in pruning.prunable_variables(student, True))
    stored = student.count_params() - zeros
    before = teacher.count_params()
    return {"params_before": before, "params_after": stored, "ratio": before / max(stored, 1),
            "groups": [], "layers": [], "untouched": []}


def _export_deployment(student, formats, train, test, config, strategy):
    """SavedModel / TFLite exports of the student into `<model_dir>/export`,
    each checked against Keras on the test split (accuracy per format).

    The folder belongs to this run, so a rerun refreshes it. Under a
    multi-worker strategy every worker exports (variable reads are
    collective); only the chief's files are kept.
    """
    import numpy as np

    from micik_tf import deployment as export_lib

    def arrays(ds, limit):
        xs, ys = [], []
        for x, y in ds.take(limit):
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
        return np.stack(xs), np.stack(ys)

    representative, _ = arrays(train, 128)
    check_x, check_y = arrays(test, 1000)
    target = os.path.join(config.model_dir, "export")
    if not distribute.is_chief(strategy):
        target = tempfile.mkdtemp(prefix="micik_worker_export_")
    try:
        results = export_lib.export(
            student, target, formats=formats, representative_data=representative,
            overwrite=True, check_data=check_x, check_labels=check_y,
        )
    except (ValueError, FileExistsError) as error:
        raise UsageError(f"--export: {error}") from None
    return results


def plot_history(history, teacher_accuracy, path):
    """Loss components and validation accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "total"), ("ce", "CE"), ("kd", "KD"), ("sim", "L_sim"), ("inh", "L_inh")):
        left.plot(epochs, [h[key] for h in history], marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("loss (per step, mean)")
    left.set_yscale("symlog", linthresh=1e-3)
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="student (val)")
    right.plot(epochs, [h["train_accuracy"] for h in history], marker=".", label="student (train)")
    right.axhline(teacher_accuracy, color="k", linestyle="--", label="teacher (test)")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.legend()
    fig.tight_layout()
    write_figure(fig, path)


def summary_table(report):
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
        rows.append((f"export {fmt}", f"{result['bytes']:,} bytes ({result['gzip_bytes']:,} gzip'd)"
                     + ("" if accuracy is None else f", accuracy {accuracy:.4f}")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

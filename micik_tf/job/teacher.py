"""The job's teacher: reused from this run, loaded from a file, built from
`keras.applications`, or trained here."""

import inspect

import keras

from micik_tf import files, models
from micik_tf.errors import first_line
from micik_tf.job.config import UsageError
from micik_tf.recovery import pipeline

TEACHER_FILE = "teacher.keras"
TEACHER_HISTORY = "teacher_history.json"


def resolve_teacher(config, data, workspace, strategy):
    """Returns `(teacher, how it was obtained)`; build it under `strategy.scope()`."""
    saved = workspace.reusable(TEACHER_FILE)
    if saved:
        return files.load_model(saved, "teacher"), "reloaded from this run"
    spec = config.teacher
    if spec == "train":
        model = train_teacher(config, data, workspace, strategy)
        return model, f"trained here ({config.teacher_arch})"
    if spec.startswith("app:"):
        return _application(spec[len("app:"):], config, data), f"keras.applications.{spec[4:]}"
    try:
        return files.load_model(spec, "--teacher"), f"loaded from {spec}"
    except ValueError as error:
        raise UsageError(
            f"{error} Or give 'app:<Name>' for keras.applications, or 'train' to train one."
        ) from None


def _application(name, config, data):
    if not hasattr(keras.applications, name):
        raise UsageError(f"--teacher=app:{name}: keras.applications has no model {name!r}.")
    weights = None if config.teacher_weights in ("", "none", "None") else config.teacher_weights
    builder = getattr(keras.applications, name)
    kwargs = dict(weights=weights, input_shape=data.source.input_shape,
                  classes=data.source.num_classes)
    # The losses take logits (CE and KD with from_logits, KD's temperature
    # divides logits), so the softmax head is left off.
    if "classifier_activation" in inspect.signature(builder).parameters:
        kwargs["classifier_activation"] = None
    try:
        return builder(**kwargs)
    except Exception as error:  # downloads and shape checks fail in many ways
        raise UsageError(f"--teacher=app:{name}: cannot build it ({first_line(error)}).") from None


def train_teacher(config, data, workspace, strategy):
    """Trains `config.teacher_arch` on the run's training split (`fit_teacher`),
    keeps its per-epoch validation accuracy in `teacher_history.json`, and
    saves it as `teacher.keras`."""
    model = models.build(config.teacher_arch, data.source.input_shape, data.source.num_classes)
    train = pipeline.pipeline(data.train, config.batch_size, training=True, seed=config.seed,
                              augment=config.augment, shuffle_buffer=config.shuffle_buffer,
                              drop_remainder=True).take(data.steps_per_epoch)
    history = fit_teacher(model, train, data.validation, config.teacher_epochs,
                          config.teacher_learning_rate, steps_per_epoch=data.steps_per_epoch,
                          verbose=config.verbose)
    if workspace.chief:
        files.write_json(workspace.path(TEACHER_HISTORY), history)
    workspace.save_model(model, TEACHER_FILE, strategy)
    return model


def fit_teacher(model, train, validation, epochs, learning_rate, steps_per_epoch, verbose=1):
    """The teacher recipe: cross-entropy, Adam with a cosine decay from
    `learning_rate` to 0 over `epochs` (so training ends on a plateau), and
    the validation accuracy after every epoch. Returns the history dict."""
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            learning_rate, max(epochs * steps_per_epoch, 1))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(train, epochs=epochs, validation_data=validation,
                        verbose=2 if verbose else 0)
    return {k: [float(v) for v in values] for k, values in history.history.items()}

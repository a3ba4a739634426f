"""tensorflow-model-optimization's own pruning, as its users run it, for the curve.

    python benchmarks/tfmot_baseline.py --spec=spec.json --out=result.json

tfmot works on tf_keras (Keras 2) models only, and importing it switches
`tf.keras` to tf_keras, so it runs in a process of its own: this one. The
teacher is rebuilt as a tf_keras twin (the same architecture from
`micik_tf.models`, its weights copied and its logits checked against the
teacher's), then fine-tuned the way tfmot's guide does it:
`prune_low_magnitude` with a `PolynomialDecay` schedule, cross-entropy, the
`UpdatePruningStep` callback, then `strip_pruning`. tfmot prunes every Conv2D
and Dense kernel to the same sparsity, chosen so that the nonzero parameters
match the budget; that is reported as it is.

The recovery budget (epochs, batch, learning rate schedule), the data and the
best-epoch rule (the best validation epoch once the final sparsity holds)
are the caller's, as for every other method of the curve.
"""

import argparse
import gzip
import json
import os
import time

# Before TensorFlow is imported: tfmot needs tf.keras to be tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPRESENTATIVE_EXAMPLES = 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    result = run(spec)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)


def run(spec):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from micik_tf import models
    from micik_tf.deploy.pruning import PRUNING_INCREMENTS, PRUNING_SHARE
    from micik_tf.recovery import datasets, pipeline

    started = time.perf_counter()
    tf_keras.utils.set_random_seed(spec["seed"])
    source = datasets.load(spec["dataset"], data_dir=spec.get("data_dir"),
                           validation_fraction=spec["validation_fraction"],
                           train_fraction=spec["train_fraction"])
    teacher = _twin(spec, models, tf_keras)
    sparsity = _uniform_sparsity(teacher, spec["ratio"])
    steps_per_epoch = max(1, source.train_size // spec["batch_size"])
    if spec.get("steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, spec["steps_per_epoch"])
    total = steps_per_epoch * spec["epochs"]
    end = max(1, int(PRUNING_SHARE * total))
    frequency = max(1, end // PRUNING_INCREMENTS)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0,
        end_step=frequency * max(1, end // frequency), frequency=frequency)

    test = pipeline.pipeline(source.test, 256, training=False)
    before = _one_shot_accuracy(teacher, sparsity, test, tf_keras)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(teacher, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(
            tf_keras.optimizers.schedules.CosineDecay(spec["learning_rate"], max(total, 1))),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    best = _best_epoch_callback(tf_keras, schedule.end_step, steps_per_epoch)
    train = pipeline.pipeline(source.train.cache(), spec["batch_size"], training=True,
                              seed=spec["seed"], augment=spec.get("augment", ()),
                              drop_remainder=True).repeat()
    validation = pipeline.pipeline(source.validation.cache(), 256, training=False)
    history = pruned.fit(train, epochs=spec["epochs"], steps_per_epoch=steps_per_epoch,
                         validation_data=validation, verbose=0,
                         callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), best])
    if best.weights is not None:
        pruned.set_weights(best.weights)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    accuracy = _accuracy(stripped, test)
    zeros = sum(int(np.sum(w == 0)) for w in _kernels(stripped, tf_keras))
    stored = int(stripped.count_params()) - zeros
    tflite = _int8_tflite(stripped, source, pipeline, tf)
    return {
        "method": "tfmot",
        "tfmot_version": tfmot.__version__,
        "sparsity_per_kernel": sparsity,
        "params_before": int(teacher.count_params()),
        "params": stored,
        "achieved_ratio": teacher.count_params() / stored,
        "accuracy_before_recovery": before,
        "accuracy": accuracy,
        "best_epoch": best.best_epoch,
        "val_accuracy": best.best,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "tflite_int8_bytes": len(tflite),
        "tflite_int8_gzip_bytes": len(gzip.compress(tflite, compresslevel=9, mtime=0)),
        "twin_max_logit_difference": spec.get("_twin_difference"),
        "wall_seconds": time.perf_counter() - started,
    }


def _twin(spec, models, tf_keras):
    """The teacher as a tf_keras model: same architecture, weights copied,
    logits checked against the teacher's on the examples the caller saved."""
    twin = models.build(spec["arch"], spec["input_shape"], spec["num_classes"],
                        width=spec.get("width", 1.0), api=tf_keras)
    saved = np.load(spec["teacher_weights"])
    twin.set_weights([saved[f"w{i}"] for i in range(len(saved.files) - 2)])
    difference = float(np.max(np.abs(twin.predict(saved["x"], verbose=0) - saved["logits"])))
    if difference > 1e-3:
        raise SystemExit(f"tfmot_baseline: the tf_keras twin computes other logits than the "
                         f"teacher (max difference {difference:.3g}).")
    spec["_twin_difference"] = difference
    return twin


def _kernels(model, tf_keras):
    return [layer.kernel.numpy() for layer in model.layers
            if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense))]


def _uniform_sparsity(model, ratio):
    """The sparsity of every kernel at which the nonzero parameters are
    `count_params() / ratio` (what tfmot's one sparsity for all layers gives)."""
    import tf_keras

    kernels = sum(k.size for k in _kernels(model, tf_keras))
    total = model.count_params()
    return float((total - total / ratio) / kernels)


def _one_shot_accuracy(model, sparsity, test, tf_keras):
    """Accuracy with every kernel magnitude-pruned to `sparsity` at once."""
    saved = model.get_weights()
    for layer in model.layers:
        if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
            kernel = layer.kernel.numpy()
            count = int(round(sparsity * kernel.size))
            flat = kernel.ravel().copy()
            flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0
            layer.kernel.assign(flat.reshape(kernel.shape))
    accuracy = _accuracy(model, test)
    model.set_weights(saved)
    return accuracy


def _accuracy(model, dataset):
    from micik_tf.recovery import evaluation

    return evaluation.accuracy(model, dataset)


def _best_epoch_callback(tf_keras, final_step, steps_per_epoch):
    """A callback keeping the weights of the best validation epoch among those
    that end once the final sparsity holds: the rule every method of the
    curve follows."""

    class BestEligibleEpoch(tf_keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.weights = -1.0, None, None

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            step = (epoch + 1) * steps_per_epoch
            if step >= final_step and logs.get("val_accuracy", -1.0) >= self.best:
                self.best, self.best_epoch = float(logs["val_accuracy"]), epoch + 1
                self.weights = self.model.get_weights()

    return BestEligibleEpoch()


def _int8_tflite(model, source, pipeline, tf):
    """The full-integer .tflite, converted exactly as `micik_tf.export` converts
    (builtin ops only, the same calibration), from a SavedModel of the model."""
    import tempfile

    from micik_tf.deploy import conversion

    representative, _ = pipeline.to_arrays(source.train, REPRESENTATIVE_EXAMPLES)
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder, save_format="tf")
        return conversion.convert_tflite("tflite_int8", folder, representative)


if __name__ == "__main__":
    main()

"""Top-1 accuracy of a classifier on a batched dataset, under any strategy.

One implementation for the toolkit: the recovery loop's per-epoch
validation, the teacher's and student's reported accuracies, the tools and
the benchmarks all count correct predictions this way. It neither compiles
nor otherwise changes the model (a teacher is the user's object).
"""

import numpy as np
import tensorflow as tf


def accuracy_step(model, strategy=None):
    """A compiled `step(x, y) -> (correct, count)` summed over replicas.

    Build it once per model and pass it to `accuracy` on every evaluation,
    so the model is traced once, not once per call.
    """
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(x, y):
        logits = model(x, training=False)
        predicted = tf.argmax(tf.cast(logits, tf.float32), -1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int32)), tf.float32))
        return correct, tf.cast(tf.shape(y)[0], tf.float32)

    @tf.function
    def step(x, y):
        correct, count = strategy.run(replica_step, args=(x, y))
        return (strategy.reduce("SUM", correct, axis=None),
                strategy.reduce("SUM", count, axis=None))

    return step


def accuracy(model, dataset, strategy=None, step=None):
    """Top-1 accuracy of `model` (logits or probabilities) on `dataset`.

    Args:
        model: a Keras classifier.
        dataset: batched `(x, y)` with integer labels.
        strategy: the strategy the model was built under (default: none).
        step: a step from `accuracy_step(model, strategy)`, to reuse its trace.
    """
    strategy = strategy or tf.distribute.get_strategy()
    step = step or accuracy_step(model, strategy)
    correct = count = 0.0
    for x, y in strategy.experimental_distribute_dataset(dataset):
        c, n = step(x, y)
        correct += float(c)
        count += float(n)
    return correct / max(count, 1.0)


def top1(outputs, labels):
    """Top-1 accuracy of model outputs (numpy, one row per example)."""
    outputs = np.asarray(outputs)
    return float(np.mean(outputs.reshape(len(outputs), -1).argmax(-1) == np.asarray(labels)))

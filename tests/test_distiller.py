"""micik_tf.Distiller: recovery with plain `fit`, on the loop's objective."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras

import micik_tf
from micik_tf.recovery import datasets, pipeline, strategies, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _teacher():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="teacher")


@pytest.fixture(scope="module")
def digits():
    source = datasets.load("digits")
    return (pipeline.pipeline(source.train, 50, training=True),
            pipeline.pipeline(source.test, 50, training=False))


def _batch(dataset):
    x, y = next(iter(dataset))
    return x, y


def test_fit_recovers_the_student_and_leaves_the_teacher_as_it_was(digits):
    train, test = digits
    teacher = _teacher()
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(train, epochs=2, verbose=0)
    teacher.layers[1].trainable = False  # a flag of the caller's, kept as it is
    flags = [layer.trainable for layer in teacher.layers]
    before = [np.array(v) for v in teacher.variables]
    student = micik_tf.compress(teacher, ratio=4, verbose=0)
    distiller = micik_tf.Distiller(teacher, student)
    assert distiller.layer_names == ["conv1", "conv2", "fc1", "logits"]
    distiller.compile(keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    start = distiller.evaluate(test, verbose=0, return_dict=True)
    history = distiller.fit(train, validation_data=test, epochs=3, verbose=0)
    end = distiller.evaluate(test, verbose=0, return_dict=True)
    assert end["loss"] < start["loss"]
    assert {"ce", "kd", "sim", "inh", "val_accuracy"} <= set(history.history)
    for old, variable in zip(before, teacher.variables):
        np.testing.assert_array_equal(old, np.array(variable))
    assert [layer.trainable for layer in teacher.layers] == flags
    assert all(v.trainable for v in teacher.layers[2].variables[:2])


def test_distiller_and_the_loop_give_the_same_loss_on_a_batch(digits, tmp_path):
    train, _ = digits
    teacher = _teacher()
    student = micik_tf.compress(teacher, ratio=4, verbose=0)
    config = trainer.RecoveryConfig(alpha=0.7, beta=1.3, gamma=0.4, temperature=3.0,
                                    batch_size=50, window=2, w_far=0.2)
    loop = trainer.RecoveryTrainer(teacher, student, strategies.get_distribution_strategy(),
                                   config, str(tmp_path), steps_per_epoch=1, verbose=0)
    distiller = micik_tf.Distiller(teacher, student, alpha=0.7, beta=1.3, gamma=0.4,
                                   temperature=3.0, window=2, w_far=0.2)
    distiller.compile("adam")
    x, y = _batch(train)
    loop_total, loop_terms = loop._replica_losses(x, y)
    fit_total = distiller.compute_loss(x, y, y_pred=None)
    assert float(loop_terms["sim"]) > 0 and float(loop_terms["inh"]) > 0
    np.testing.assert_allclose(float(fit_total), float(loop_total), rtol=1e-5)


def test_save_and_load_keeps_the_objective_and_the_weights(digits, tmp_path):
    train, test = digits
    teacher = _teacher()
    student = micik_tf.compress(teacher, ratio=4, verbose=0)
    distiller = micik_tf.Distiller(teacher, student, layer_names=["conv2", "fc1"], beta=2.0)
    distiller.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    distiller.fit(train, epochs=1, verbose=0)
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, micik_tf.Distiller)
    assert loaded.layer_names == ["conv2", "fc1"] and loaded.objective.weights.beta == 2.0
    x, y = _batch(test)
    np.testing.assert_allclose(np.array(loaded(x)), np.array(distiller(x)), atol=1e-6)
    np.testing.assert_allclose(float(loaded.compute_loss(x, y)), float(distiller.compute_loss(x, y)),
                               rtol=1e-5)
    loaded.fit(train, epochs=1, verbose=0)  # compiled on load: training goes on


def test_bad_models_and_softmax_teachers_are_one_line_errors():
    teacher = _teacher()
    with pytest.raises(TypeError, match="Functional or Sequential"):
        micik_tf.Distiller(teacher, "student.keras")
    inputs = keras.Input((4,))
    softmax = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(inputs))
    with pytest.raises(ValueError, match="ends in a softmax"):
        micik_tf.Distiller(softmax, softmax)


_MIRRORED = """
import json, sys
import keras, numpy as np
from micik_tf.recovery import strategies
strategies.use_logical_cpus(2)
import tensorflow as tf
import micik_tf
from micik_tf.recovery import datasets, pipeline
sys.path.insert(0, {tests!r})
from test_distiller import _teacher
source = datasets.load("digits")
test = pipeline.pipeline(source.test, 50, training=False)
train = pipeline.pipeline(source.train, 50, training=True)
losses = {{}}
for name in ("default", "mirrored"):
    strategy = strategies.get_distribution_strategy(name)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        teacher = _teacher()
        student = micik_tf.compress(teacher, ratio=4, verbose=0)
        distiller = micik_tf.Distiller(teacher, student)
        distiller.compile("adam")
    losses[name] = distiller.evaluate(test, verbose=0, return_dict=True)
    losses[name]["replicas"] = strategy.num_replicas_in_sync
    history = distiller.fit(train, epochs=1, verbose=0)
    losses[name]["fit"] = history.history["loss"][0]
print(json.dumps(losses))
"""


def test_fit_under_a_mirrored_strategy_matches_one_device():
    code = _MIRRORED.format(tests=os.path.join(ROOT, "tests"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    losses = json.loads(done.stdout.strip().splitlines()[-1])
    assert losses["mirrored"]["replicas"] == 2
    for term in ("loss", "ce", "kd", "sim", "inh"):
        np.testing.assert_allclose(losses["mirrored"][term], losses["default"][term], rtol=1e-4)
    assert np.isfinite(losses["mirrored"]["fit"])

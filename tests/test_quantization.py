"""Quantization-aware training of the weights: the rounding matches TFLite's
int8 weights, and the straight-through update lands on the float weights."""

import numpy as np
import pytest

import keras

import micik_tf
from micik_tf.deploy.quantization import WeightQuantizer, fake_quantize


def test_fake_quantize_is_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 4, 5)).astype("float32")
    w[..., 2] *= 100.0  # one wide channel must not coarsen the others
    q = fake_quantize(w)
    for c in range(5):
        scale = np.max(np.abs(w[..., c])) / 127
        levels = q[..., c] / scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert np.max(np.abs(levels)) <= 127 + 1e-3
        assert np.max(np.abs(q[..., c] - w[..., c])) <= scale / 2 + 1e-6
    np.testing.assert_array_equal(fake_quantize(q), q)  # idempotent


def test_fake_quantize_keeps_zeros_and_zero_channels():
    w = np.array([[0.0, 0.0], [0.5, 0.0], [-1.0, 0.0]], dtype="float32")
    q = fake_quantize(w)
    assert q[0, 0] == 0 and np.all(q[:, 1] == 0)
    assert q[2, 0] == -1.0


def _compressed():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="a")(inputs)
    x = keras.layers.Dense(8, activation="relu", name="b")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="c")(x))
    return micik_tf.compress(model, ranks={"a": (0, 3), "b": (0, 3)}, verbose=0)


def test_straight_through_update_lands_on_the_float_weights():
    model = _compressed()
    qat = WeightQuantizer(model, begin_step=2)
    assert qat.variables, "factors and the untouched Dense kernel are quantized"
    masters = [np.array(v) for v in qat.variables]

    assert not qat.before_step(1)  # before begin_step: nothing happens
    qat.after_step()
    for v, m in zip(qat.variables, masters):
        np.testing.assert_array_equal(np.array(v), m)

    assert qat.before_step(2) and qat.active
    for v, m in zip(qat.variables, masters):
        np.testing.assert_allclose(np.array(v), fake_quantize(m))
    # What an optimizer step does to the rounded weights...
    deltas = [np.full(m.shape, 0.01, "float32") for m in masters]
    for v, d in zip(qat.variables, deltas):
        v.assign(np.array(v) + d)
    qat.after_step()
    # ... is applied to the float weights instead.
    assert not qat.active
    for v, m, d in zip(qat.variables, masters, deltas):
        np.testing.assert_allclose(np.array(v), m + d, atol=1e-6)


def test_the_step_runs_on_the_rounded_weights():
    model = _compressed()
    qat = WeightQuantizer(model)
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    qat.before_step(0)
    rounded_out = np.array(model(x))
    qat.after_step()
    float_out = np.array(model(x))
    reference = model.get_weights()
    for v in qat.variables:
        v.assign(fake_quantize(np.array(v)))
    np.testing.assert_allclose(np.array(model(x)), rounded_out, atol=1e-6)
    model.set_weights(reference)
    np.testing.assert_allclose(np.array(model(x)), float_out, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(begin_step=-1), "begin_step"),
    (dict(num_bits=4), "num_bits"),
])
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightQuantizer(_compressed(), **kwargs)


def test_refuses_a_model_without_weights_to_quantize():
    model = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no Dense, Conv2D or factorized"):
        WeightQuantizer(model)


def test_the_graph_rounding_is_the_numpy_grid():
    import tensorflow as tf

    from micik_tf.deploy.quantization import fake_quantize_tensor

    weights = np.random.default_rng(3).normal(size=(3, 3, 4, 5)).astype("float32")
    weights[..., 2] = 0.0  # an all-zero channel stays zero
    np.testing.assert_array_equal(fake_quantize_tensor(tf.constant(weights)).numpy(),
                                  fake_quantize(weights))


def test_the_compiled_step_rounds_and_restores_as_the_eager_calls_do():
    import tensorflow as tf

    eager_model, graph_model = _compressed(), _compressed()
    graph_model.set_weights(eager_model.get_weights())
    eager, graph = WeightQuantizer(eager_model, begin_step=1), WeightQuantizer(graph_model, begin_step=1)

    @tf.function
    def step(number):
        rounded = graph.round_weights(number)
        for v in graph.variables:
            v.assign_add(tf.fill(v.shape, 0.01))  # what an optimizer step would do
        graph.restore(rounded)

    for number in (0, 1):
        eager.before_step(number)
        for v in eager.variables:
            v.assign(np.array(v) + 0.01)
        eager.after_step()
        step(tf.constant(number, tf.int64))
        for a, b in zip(eager.variables, graph.variables):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)

"""prune_channels(): structured pruning to a smaller dense model."""

import numpy as np
import pytest

import keras
import micik_tf
from micik_tf.compression.channels import prune_channels


def test_the_weakest_unit_goes_and_the_rest_compute_as_before_by_hand():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(hidden(inputs)))
    # Unit L1 norms 1.5, 6 and 0.3: unit 2 is the weakest.
    w = np.array([[0.5, 2.0, 0.1], [-0.5, 2.0, -0.1], [0.5, -2.0, 0.1]], "float32")
    b = np.array([0.1, -0.2, 0.3], "float32")
    v = np.array([[1.0, 2.0], [3.0, -1.0], [5.0, 5.0]], "float32")
    c = np.array([0.5, -0.5], "float32")
    hidden.set_weights([w, b])
    head.set_weights([v, c])
    # 20 parameters; without one hidden unit 14, which fits 20 / 1.4.
    pruned = prune_channels(model, 1.4)
    assert pruned.count_params() == 14
    assert [l.name for l in pruned.layers[1:]] == ["hidden", "head"]
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], "float32")
    expected = np.maximum(x @ w[:, :2] + b[:2], 0) @ v[:2] + c
    np.testing.assert_allclose(pruned(x), expected, rtol=1e-6)
    # The model passed in is untouched.
    np.testing.assert_array_equal(hidden.kernel, w)


def _cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = inputs
    for i, width in enumerate((8, 8, 16)):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x) if i < 2 else x
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(12, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))


def test_a_conv_net_becomes_a_smaller_dense_one_and_exports(tmp_path):
    model = _cnn()
    rng = np.random.default_rng(0)
    for layer in model.layers:  # BatchNorm scales that differ, as trained ones do
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.1, 2.0, layer.gamma.shape).astype("float32"))
    x = rng.normal(size=(16, 8, 8, 2)).astype("float32")
    pruned = prune_channels(model, 3, calibration_data=x)
    # Within a channel of the target (a channel here costs up to ~170 parameters).
    assert 2.8 < model.count_params() / pruned.count_params() < 3.3
    kernels = [l for l in pruned.layers if hasattr(l, "kernel")]
    assert all(type(l) in (keras.layers.Conv2D, keras.layers.Dense) for l in kernels)
    assert kernels[-1].units == 4 and min(l.kernel.shape[-1] for l in kernels) >= 1
    # Channel indices follow their weights through Flatten: channels of the
    # last conv that BatchNorm silences (scale and shift 0) score lowest and
    # go first, and without them the copy computes exactly what the model does.
    bn = model.get_layer("bn2")
    gamma, beta = np.asarray(bn.gamma), np.asarray(bn.beta)
    gamma[[1, 5, 9]] = beta[[1, 5, 9]] = 0
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    same = prune_channels(model, model.count_params() / (model.count_params() - 300))
    assert same.get_layer("conv2").filters < 16
    np.testing.assert_allclose(same(x), model(x), rtol=1e-5, atol=1e-5)
    results = micik_tf.export(pruned, tmp_path, formats=["tflite"], check_data=x)
    assert results["tflite"]["relative_error"] < 1e-4


def test_branches_are_refused_in_one_line():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Add()([a, inputs])))
    with pytest.raises(ValueError, match="chains of layers") as error:
        prune_channels(model, 2)
    assert "\n" not in str(error.value)

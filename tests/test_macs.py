"""Forward multiply-accumulates, counted from layer shapes."""

import keras

import micik_tf
from micik_tf.deploy.macs import forward_macs


def _model():
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="valid", name="b")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="d")(x))


def test_counts_conv_and_dense_by_hand():
    macs = forward_macs(_model())
    assert macs["layers"] == {
        "a": 5 * 5 * (3 * 3 * 2 * 4),  # 25 positions, 3x3x2 -> 4
        "b": 3 * 3 * (3 * 3 * 4 * 4),  # valid: 9 positions
        "d": 36 * 3,
    }
    assert macs["total"] == sum(macs["layers"].values())


def test_factorized_layers_cost_m_r_plus_r_n():
    model = _model()
    compressed = micik_tf.compress(model, ranks={"a": (0, 2), "b": (0, 3)}, verbose=0)
    macs = forward_macs(compressed)["layers"]
    assert macs["a"] == 25 * (18 * 2 + 2 * 4)
    assert macs["b"] == 9 * (36 * 3 + 3 * 4)
    assert macs["d"] == 36 * 3  # left dense

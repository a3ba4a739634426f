"""Conv1D: the wrapper layer, compress() with shared bases, calibration, and
the deployment formats, each checked against the original model."""

import numpy as np
import pytest

import keras

import micik_tf
from micik_tf.layers import FactorizedConv1D
from tests.layer_harness import run_layer_test

NAMES = ["c1", "c2", "c3", "c4"]


@pytest.mark.parametrize(
    "kwargs, basis_shape, out_shape",
    [
        (dict(filters=4, kernel_size=3, rank_unique=2, padding="causal"), None, (2, 7, 4)),
        (dict(filters=4, kernel_size=3, strides=2, rank_common=2, rank_unique=1, group="g"),
         (9, 2), (2, 3, 4)),
        (dict(filters=4, kernel_size=2, dilation_rate=2, padding="same", rank_common=2,
              group="g", rank_unique=0, shared_side="output"), (2, 4), (2, 7, 4)),
    ],
    ids=["causal_unique_only", "shared_input_strided", "shared_output_dilated"],
)
def test_factorized_conv1d_harness(kwargs, basis_shape, out_shape):
    weights = 1 + (1 if kwargs.get("rank_common") else 0) + (2 if kwargs.get("rank_unique") else 0)
    run_layer_test(FactorizedConv1D, dict(kwargs, activation="relu"), input_shape=(2, 7, 3),
                   expected_output_shape=out_shape, expected_num_trainable_weights=weights,
                   basis_shape=basis_shape)


def test_conv1d_refuses_what_conv1d_refuses():
    with pytest.raises(ValueError, match="`kernel_size`"):
        FactorizedConv1D(4, (3, 3))
    with pytest.raises(ValueError, match="`padding`"):
        FactorizedConv1D(4, 3, padding="full")


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((40, 12))
    x = keras.layers.Conv1D(32, 5, padding="causal", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv1D(32, 3, padding="same", dilation_rate=2, activation="relu", name="c2")(x)
    x = keras.layers.Conv1D(32, 3, padding="same", dilation_rate=2, activation="relu", name="c3")(x)
    x = keras.layers.Conv1D(48, 3, strides=2, name="c4")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="out")(x))


def _data(count=64):
    return np.random.default_rng(0).normal(size=(count, 40, 12)).astype("float32")


def test_full_rank_factorization_is_exact_with_a_shared_basis():
    model, x = _model(), _data()
    # c2 and c3 (3 taps, C_in 32, dilation 2, same padding) share a basis
    # spanning both kernels (rank 64 of their stacked 96 x 64 matrix).
    compressed = micik_tf.compress(
        model, ranks={"c1": (0, 60), "c2": (64, 0), "c3": (64, 0), "c4": (0, 96)},
        groups=[["c2", "c3"]], verbose=0)
    (group,) = micik_tf.report(compressed).groups
    assert group["members"] == ["c2", "c3"]
    np.testing.assert_allclose(compressed.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)


def test_convs_of_other_geometry_do_not_share():
    sites = {s.name: s for s in micik_tf.compression.grouping.find_sites(_model())[0]}
    assert sites["c2"].kind == "conv1d"
    assert sites["c2"].signature("input") == sites["c3"].signature("input")
    assert sites["c4"].signature("input") != sites["c3"].signature("input")  # strides, padding


def test_keras_round_trip_keeps_the_sharing(tmp_path):
    model, x = _model(), _data()
    compressed = micik_tf.compress(model, ratio=3, calibration_data=x, verbose=0)
    assert micik_tf.report(compressed).groups
    path = str(tmp_path / "student.keras")
    compressed.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == compressed.count_params()
    for group in micik_tf.report(loaded).groups:
        basis = loaded.get_layer(group["name"]).basis
        assert sum(v is basis for v in loaded.weights) == 1
    np.testing.assert_allclose(loaded.predict(x, verbose=0), compressed.predict(x, verbose=0),
                               atol=1e-6)


def test_tflite_matches_keras(tmp_path):
    model, x = _model(), _data(32)
    compressed = micik_tf.compress(model, ratio=2, verbose=0)
    results = micik_tf.export(compressed, tmp_path, formats=["saved_model", "tflite", "tflite_int8"],
                              representative_data=x, check_data=x)
    assert results["saved_model"]["relative_error"] < 1e-5
    assert results["tflite"]["relative_error"] < 1e-4
    assert results["tflite_int8"]["relative_error"] < 0.2

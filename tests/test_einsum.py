"""EinsumDense (attention and feed-forward
projections): the wrapper, sharing with Dense, and the deployment formats."""

import numpy as np
import pytest

import keras

import micik_tf
from micik_tf.compression.grouping import find_sites
from micik_tf.layers import FactorizedEinsumDense
from tests.layer_harness import run_layer_test


@pytest.mark.parametrize(
    "kwargs, basis_shape, out_shape, weights",
    [
        (dict(equation="abc,cde->abde", kernel_shape=(6, 2, 3), bias_shape=(2, 3),
              rank_unique=2), None, (2, 5, 2, 3), 3),
        (dict(equation="abc,cde->abde", kernel_shape=(6, 2, 3), rank_common=2,
              rank_unique=1, group="g"), (6, 2), (2, 5, 2, 3), 3),
        (dict(equation="acb,cd->abd", kernel_shape=(5, 4), bias_shape=(4,), rank_common=2,
              group="g", rank_unique=0, shared_side="output"), (2, 4), (2, 6, 4), 2),
    ],
    ids=["heads_unique_only", "heads_shared_input", "middle_axis_shared_output"],
)
def test_factorized_einsum_harness(kwargs, basis_shape, out_shape, weights):
    run_layer_test(FactorizedEinsumDense, dict(kwargs, activation="relu"),
                   input_shape=(2, 5, 6), expected_output_shape=out_shape,
                   expected_num_trainable_weights=weights, basis_shape=basis_shape)


@pytest.mark.parametrize("equation", ["ab,bc->ac,", "abc,cde->abd", "ab,bb->a", "abc,bc->abc"])
def test_equations_without_a_matrix_form_are_refused(equation):
    with pytest.raises(ValueError, match="either contracted"):
        FactorizedEinsumDense(equation, (2, 2, 2))


def test_two_contracted_axes_flatten_in_kernel_order():
    # MultiHeadAttention's output projection: heads and head size contracted.
    layer = FactorizedEinsumDense("abcd,cde->abe", (3, 4, 6), (6,), rank_unique=12)
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype("float32")
    layer.build(x.shape)
    kernel = np.random.default_rng(1).normal(size=(3, 4, 6)).astype("float32")
    left, right = np.linalg.qr(kernel.reshape(12, 6), mode="complete")[0], None
    layer.unique_left.assign(left)
    layer.unique_right.assign(left.T @ kernel.reshape(12, 6))
    np.testing.assert_allclose(layer.reconstruct_kernel(), kernel, atol=1e-5)
    np.testing.assert_allclose(layer(x), np.einsum("abcd,cde->abe", x, kernel), atol=1e-4)


def _block():
    """Self-attention and a feed-forward block, as keras-hub builds them from
    EinsumDense and Dense nodes (the output projection contracts two axes)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 16))
    heads = [keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 4, 8),
                                      bias_axes="de", name=n)(inputs) for n in "qkv"]
    q, k, v = heads
    scores = keras.ops.softmax(keras.ops.einsum("abhd,afhd->ahbf", q, k) / 8**0.5)
    x = keras.ops.einsum("ahbf,afhd->abhd", scores, v)
    x = keras.layers.EinsumDense("abhd,hde->abe", output_shape=(None, 16), name="o")(x)
    x = keras.layers.Dense(32, activation="relu", name="ff1")(x)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 16), bias_axes="d",
                                 name="ff2")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="out")(x))


def _data(count=32):
    return np.random.default_rng(0).normal(size=(count, 10, 16)).astype("float32")


def test_sites_include_two_contracted_axes():
    sites, untouched = find_sites(_block())
    kinds = {s.name: (s.kind, s.m, s.n) for s in sites}
    assert kinds["q"] == ("einsum", 16, 32) and kinds["ff1"] == ("dense", 16, 32)
    assert kinds["o"] == ("einsum", 32, 16)
    assert "out" not in untouched
    by_name = {s.name: s for s in sites}
    # Last-axis contractions project like Dense: they may share an input basis.
    assert by_name["q"].signature("input") == by_name["ff1"].signature("input")


def test_full_rank_is_exact_with_q_k_v_and_a_dense_sharing_a_basis(tmp_path):
    model, x = _block(), _data()
    compressed = micik_tf.compress(
        model, ranks={"q": (16, 0), "k": (16, 0), "v": (16, 0), "ff1": (16, 0), "ff2": (0, 16),
                      "o": (0, 16)},
        groups=[["q", "k", "v", "ff1"]], share="input", verbose=0)
    (group,) = micik_tf.report(compressed).groups
    assert group["members"] == ["q", "k", "v", "ff1"]
    np.testing.assert_allclose(compressed.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    path = str(tmp_path / "student.keras")
    compressed.save(path)
    loaded = keras.saving.load_model(path)
    basis = loaded.get_layer(group["name"]).basis
    assert sum(v is basis for v in loaded.weights) == 1
    assert loaded.count_params() == compressed.count_params()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), compressed.predict(x, verbose=0),
                               atol=1e-6)


def test_calibrated_compression_exports_to_tflite(tmp_path):
    model, x = _block(), _data()
    compressed = micik_tf.compress(model, ratio=2, calibration_data=x, verbose=0)
    rep = micik_tf.report(compressed)
    assert {layer["initialization"] for layer in rep.layers} == {"outputs"}
    results = micik_tf.export(compressed, tmp_path, formats=["saved_model", "tflite"],
                              check_data=x)
    assert results["saved_model"]["relative_error"] < 1e-5
    assert results["tflite"]["relative_error"] < 1e-4

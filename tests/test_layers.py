import numpy as np
import pytest

import keras

from micik_tf.layers import FactorizedConv2D, FactorizedDense, SharedBasis
from tests.layer_harness import run_layer_test


@pytest.mark.parametrize(
    "kwargs, basis_shape, weights",
    [
        (dict(units=4, rank_common=0, rank_unique=2), None, 3),
        (dict(units=4, rank_common=2, rank_unique=1, group="g"), (6, 2), 4),
        (dict(units=4, rank_common=3, rank_unique=0, group="g", use_bias=False), (6, 3), 1),
        (dict(units=4, rank_common=2, rank_unique=1, group="g", shared_side="output"), (2, 4), 4),
        (dict(units=4, rank_common=2, rank_unique=0, group="g", sparse=True), (6, 2), 3),
        # A zero sparse part and bias would leave relu without a gradient.
        (dict(units=4, rank_common=0, rank_unique=0, sparse=True, bias_initializer="ones"),
         None, 2),
    ],
    ids=["unique_only", "shared_input", "common_only_no_bias", "shared_output",
         "shared_plus_sparse", "sparse_only"],
)
def test_factorized_dense_harness(kwargs, basis_shape, weights):
    run_layer_test(
        FactorizedDense,
        dict(kwargs, activation="relu"),
        input_shape=(3, 6),
        expected_output_shape=(3, 4),
        expected_num_trainable_weights=weights,
        basis_shape=basis_shape,
    )


@pytest.mark.parametrize(
    "kwargs, basis_shape, out_shape",
    [
        (dict(filters=4, kernel_size=3, padding="same", rank_unique=2), None, (2, 5, 5, 4)),
        (
            dict(filters=4, kernel_size=3, strides=2, rank_common=2, rank_unique=1, group="g"),
            (27, 2),
            (2, 2, 2, 4),
        ),
        (
            dict(filters=4, kernel_size=(1, 3), dilation_rate=(1, 2), padding="same",
                 rank_common=2, rank_unique=1, group="g", shared_side="output"),
            (2, 4),
            (2, 5, 5, 4),
        ),
        (
            dict(filters=4, kernel_size=3, strides=2, rank_common=2, rank_unique=1, group="g",
                 sparse=True),
            (27, 2),
            (2, 2, 2, 4),
        ),
    ],
    ids=["unique_only", "shared_input_strided", "shared_output_dilated", "shared_plus_sparse"],
)
def test_factorized_conv_harness(kwargs, basis_shape, out_shape):
    weights = (1 + (1 if kwargs.get("rank_common") else 0) + (2 if kwargs.get("rank_unique") else 0)
               + (1 if kwargs.get("sparse") else 0))
    run_layer_test(
        FactorizedConv2D,
        dict(kwargs, activation="relu"),
        input_shape=(2, 5, 5, 3),
        expected_output_shape=out_shape,
        expected_num_trainable_weights=weights,
        basis_shape=basis_shape,
    )


def test_shared_basis_returns_its_variable():
    layer = SharedBasis(3, 2, name="b")
    out = layer(np.zeros((5, 7), "float32"))
    assert tuple(out.shape) == (3, 2)
    np.testing.assert_array_equal(np.array(out), np.array(layer.basis))
    config = layer.get_config()
    assert SharedBasis.from_config(config).get_config() == config


def _set(layer, **values):
    for name, value in values.items():
        getattr(layer, name).assign(np.asarray(value, "float32"))


def test_dense_numerics_by_hand():
    # m=2, n=2, r_c=1 (input side), r_u=1.
    layer = FactorizedDense(2, rank_common=1, rank_unique=1, group="g", activation="relu")
    basis = np.array([[1.0], [2.0]], "float32")  # B: 2x1
    layer.build([(None, 2), (2, 1)])
    _set(layer, coefficients=[[1.0, -1.0]], unique_left=[[0.0], [1.0]],
         unique_right=[[3.0, 0.0]], bias=[0.5, 0.5])
    x = np.array([[1.0, 1.0]], "float32")
    # W = B A + U V = [[1,-1],[2,-2]] + [[0,0],[3,0]] = [[1,-1],[5,-2]]
    # x W + b = [6, -3] + 0.5 -> relu -> [6.5, 0]
    np.testing.assert_allclose(np.array(layer([x, basis])), [[6.5, 0.0]])
    np.testing.assert_allclose(layer.reconstruct_kernel(basis), [[1, -1], [5, -2]])


def test_dense_output_side_numerics_by_hand():
    layer = FactorizedDense(2, rank_common=1, rank_unique=0, group="g",
                            shared_side="output", use_bias=False)
    basis = np.array([[1.0, 2.0]], "float32")  # 1x2, shared output side
    layer.build([(None, 3), (1, 2)])
    _set(layer, coefficients=[[1.0], [0.0], [-1.0]])
    x = np.array([[2.0, 5.0, 1.0]], "float32")
    # W = A B = [[1,2],[0,0],[-1,-2]]; x W = [1, 2]
    np.testing.assert_allclose(np.array(layer([x, basis])), [[1.0, 2.0]])


def test_conv_numerics_match_dense_conv():
    rng = np.random.default_rng(0)
    layer = FactorizedConv2D(3, 2, strides=1, padding="valid", rank_common=2,
                             rank_unique=1, group="g")
    basis = rng.standard_normal((8, 2)).astype("float32")  # m = 2*2*2
    x = rng.standard_normal((1, 3, 3, 2)).astype("float32")
    y = np.array(layer([x, basis]))
    kernel = layer.reconstruct_kernel(basis)
    assert kernel.shape == (2, 2, 2, 3)
    reference = keras.layers.Conv2D(3, 2, use_bias=False)
    reference.build(x.shape)
    reference.kernel.assign(kernel)
    expected = np.array(reference(x)) + np.array(layer.bias)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The kernel by hand: one output element is sum over the 2x2x2 patch.
    patch = x[0, :2, :2, :].reshape(-1)
    np.testing.assert_allclose(y[0, 0, 0], patch @ kernel.reshape(8, 3), rtol=1e-5)


def test_sparse_part_adds_its_matrix_by_hand():
    layer = FactorizedDense(2, rank_common=0, rank_unique=1, use_bias=False, sparse=True)
    layer.build((1, 3))
    layer.unique_left.assign([[1.0], [0.0], [0.0]])
    layer.unique_right.assign([[1.0, 1.0]])
    layer.sparse_kernel.assign([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    x = np.array([[2.0, 5.0, 1.0]], "float32")
    # W = U V + S = [[1,1],[0,3],[0,0]]; x W = [2, 17]
    np.testing.assert_allclose(np.array(layer(x)), [[2.0, 17.0]])
    np.testing.assert_allclose(layer.reconstruct_kernel(), [[1, 1], [0, 3], [0, 0]])
    assert layer.nonzeros() == 1


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (FactorizedDense, dict(units=0), "`units`"),
        (FactorizedDense, dict(units=3, rank_common=0, rank_unique=0), "at least one rank"),
        (FactorizedDense, dict(units=3, sparse="yes"), "`sparse`"),
        (FactorizedDense, dict(units=3, rank_common=2), "needs `group`"),
        (FactorizedDense, dict(units=3, shared_side="left"), "`shared_side`"),
        (FactorizedDense, dict(units=3, rank_unique=-1), "`rank_unique`"),
        (FactorizedConv2D, dict(filters=3, kernel_size=3, padding="causal"), "`padding`"),
        (FactorizedConv2D, dict(filters=3, kernel_size=(3, 3, 3)), "`kernel_size`"),
        (FactorizedConv2D, dict(filters=3, kernel_size=3, data_format="channels_first"), "channels_last"),
        (SharedBasis, dict(rows=0, cols=2), "`rows`"),
    ],
)
def test_invalid_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_basis_shape_mismatch_is_explained():
    layer = FactorizedDense(2, rank_common=2, rank_unique=0, group="g")
    with pytest.raises(ValueError, match="expects a shared basis of shape"):
        layer([np.zeros((1, 4), "float32"), np.zeros((4, 3), "float32")])

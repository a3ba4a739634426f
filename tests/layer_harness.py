"""One test harness for the micik_tf layers, in the spirit of keras-hub's
`run_layer_test`: config round trip, weight counts, symbolic and eager calls,
one `fit` step, `.keras` round trip and mixed precision, in that order."""

import json
import os
import tempfile

import numpy as np

import keras

from micik_tf.layers import SharedBasis


def _call(layer, x, basis_layer):
    if basis_layer is None:
        return layer(x)
    return layer([x, basis_layer(x)])


def _model(layer_cls, init_kwargs, input_shape, basis_shape, dtype=None):
    kwargs = dict(init_kwargs)
    if dtype:
        kwargs["dtype"] = dtype
    layer = layer_cls(**kwargs)
    basis_layer = None
    if basis_shape is not None:
        basis_layer = SharedBasis(*basis_shape, name=init_kwargs.get("group"), dtype=dtype)
    inputs = keras.Input(shape=input_shape[1:])
    outputs = _call(layer, inputs, basis_layer)
    return keras.Model(inputs, outputs), layer, basis_layer


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    expected_num_trainable_weights,
    basis_shape=None,
    run_mixed_precision_check=True,
):
    """Checks a factorized layer (with its `SharedBasis` when `basis_shape`)."""
    # 1. Config round trip: from_config(get_config()) gives the same JSON.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    revived = layer_cls.from_config(config)
    assert json.dumps(revived.get_config(), sort_keys=True) == json.dumps(
        config, sort_keys=True
    )
    serialized = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is layer_cls

    # 2. Eager call builds the weights: count them, check the output shape.
    x = np.random.default_rng(0).random(input_shape).astype("float32")
    basis_layer = SharedBasis(*basis_shape) if basis_shape else None
    y = _call(layer, x, basis_layer)
    assert tuple(y.shape) == tuple(expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert not layer.non_trainable_weights

    # 3. Symbolic call in a functional model.
    model, sym_layer, sym_basis = _model(layer_cls, init_kwargs, input_shape, basis_shape)
    assert tuple(model.output.shape) == (None,) + tuple(expected_output_shape[1:])

    # 4. One fit step moves every trainable variable, the basis included.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [np.array(w) for w in model.trainable_weights]
    target = np.random.default_rng(1).random(expected_output_shape).astype("float32")
    model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)
    after = [np.array(w) for w in model.trainable_weights]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after))
    expected_variables = expected_num_trainable_weights + (1 if basis_shape else 0)
    assert len(model.trainable_weights) == expected_variables

    # 5. `.keras` round trip, with no custom_objects.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)

    # 6. Mixed precision: float32 variables, float16 computation.
    if run_mixed_precision_check:
        mixed, mixed_layer, mixed_basis = _model(
            layer_cls, init_kwargs, input_shape, basis_shape, dtype="mixed_float16"
        )
        assert mixed.output.dtype == "float16"
        for weight in mixed_layer.weights + (mixed_basis.weights if mixed_basis else []):
            assert weight.dtype == "float32"
        assert mixed(x).dtype == "float16"

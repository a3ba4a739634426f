"""compress(sequential=True): each layer fit to the original outputs from the
inputs the compressed layers before it produce."""

import numpy as np
import pytest

import keras
import micik_tf
from micik_tf.compression import decomposition, sequential
from tests.test_composite import _attention_model


def _deep_chain(depth=8, width=24):
    """A deep tanh MLP whose kernels have decaying spectra (as trained ones
    do): each compressed layer errs a little, and the errors of early layers
    reach every later one."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        x = keras.layers.Dense(width, activation="tanh", name=f"d{i}")(x)
    model = keras.Model(inputs, keras.layers.Dense(6, name="logits")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers[1:-1]:
        u, _ = np.linalg.qr(rng.normal(size=(width, width)))
        v, _ = np.linalg.qr(rng.normal(size=(width, width)))
        layer.kernel.assign((u * (2.0 * 0.75 ** np.arange(width))) @ v.T)
    return model


def _data(n=256, width=24, seed=1):
    rng = np.random.default_rng(seed)
    # Correlated inputs, so the metrics differ from the identity.
    return (rng.normal(size=(n, width)) @ rng.normal(size=(width, width))).astype("float32") / 3


def _error(model, student, x):
    reference = np.asarray(model(x))
    return float(np.linalg.norm(np.asarray(student(x)) - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("kwargs", [dict(), dict(mode="per_layer"),
                                    dict(unique="sparse", sparse_share=0.5)],
                         ids=["micik", "per_layer", "sparse"])
def test_the_output_error_falls_where_errors_accumulate(kwargs):
    model = _deep_chain()
    x, held_out = _data(512), _data(seed=2)
    plain = micik_tf.compress(model, ratio=3, calibration_data=x, calibration_batches=16,
                              verbose=0, **kwargs)
    student = micik_tf.compress(model, ratio=3, calibration_data=x, calibration_batches=16,
                                sequential=True, verbose=0,
                                **kwargs)
    # The same ranks and nonzeros, refit.
    assert micik_tf.report(student).params_after == micik_tf.report(plain).params_after
    assert _error(model, student, x) < _error(model, plain, x)
    assert _error(model, student, held_out) < _error(model, plain, held_out)


def test_a_layer_whose_inputs_did_not_change_keeps_its_fit():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 7)).astype("float32")
    x = rng.normal(size=(200, 10)).astype("float32")
    c = x.T @ x / len(x)
    metric = decomposition.InputMetric.from_covariance(c, keep=False)
    first = decomposition.factorize(w, 3, None, "input", metric)
    # X_hat = X: the target is W itself, and the fit is the ordinary one.
    again = sequential.refit_layer(w, first, c, c)
    np.testing.assert_allclose(again.approximation, first.approximation, rtol=1e-4, atol=1e-5)
    # Inputs that changed move the target: W* = W + C_hat^-1 (C_x - C_hat) W.
    x_hat = x + 0.3 * rng.normal(size=x.shape).astype("float32")
    c_hat, cross = x_hat.T @ x_hat / len(x), x_hat.T @ x / len(x)
    moved = sequential.refit_layer(w, first, c_hat, cross, c)

    def objective(f):  # what the refit minimises (BLEND = 1)
        return (np.linalg.norm(x_hat @ f.approximation - x @ w) ** 2
                + np.linalg.norm(x @ f.approximation - x @ w) ** 2)

    assert objective(moved) < objective(first)
    # Without the plain term, the pure asymmetric fit.
    alone = sequential.refit_layer(w, first, c_hat, cross)
    target_error = lambda f: np.linalg.norm(x_hat @ f.approximation - x @ w)  # noqa: E731
    assert target_error(alone) < target_error(moved) < target_error(first)


def test_layers_held_inside_composite_blocks_are_refit():
    model = _attention_model()
    x = np.random.default_rng(0).normal(size=(64, 6, 16)).astype("float32")
    plain = micik_tf.compress(model, ratio=3, calibration_data=x, verbose=0)
    student = micik_tf.compress(model, ratio=3, calibration_data=x, sequential=True, verbose=0)
    held = [l for l in micik_tf.report(student).layers if l["name"].startswith("mha")]
    assert held
    assert _error(model, student, x) < _error(model, plain, x)


def test_sequential_needs_calibration_data():
    with pytest.raises(ValueError, match="pass `calibration_data`"):
        micik_tf.compress(_deep_chain(), ratio=4, sequential=True, verbose=0)


def _bn_cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = inputs
    for i in range(4):
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))


def test_batchnorm_statistics_follow_the_compressed_layers():
    """With BatchNorm after each convolution, each layer is fit to what it
    will see once compress() has re-estimated the statistics, not made to
    undo a shift that re-estimation removes anyway: without that, kernels
    here grew to 2.8x their own size in error (on vgg_compact at 32x, 40x)."""
    model = _bn_cnn()
    x = np.random.default_rng(0).normal(size=(256, 8, 8, 2)).astype("float32")
    micik_tf.recalibrate_batchnorm(model, x, 8)  # statistics of the data, as trained
    plain = micik_tf.compress(model, ratio=8, min_rank=1, calibration_data=x, verbose=0)
    student = micik_tf.compress(model, ratio=8, min_rank=1, calibration_data=x,
                                sequential=True, verbose=0)
    errors = [layer["relative_error"] for layer in micik_tf.report(student).layers]
    assert max(errors) < 1.5, errors
    assert _error(model, student, x) < 1.1 * _error(model, plain, x)

"""keras.applications architectures (built with weights=None: no downloads)."""

import numpy as np
import pytest

import keras

import micik_tf

A = keras.applications


@pytest.mark.parametrize(
    "build, ratio",
    [
        # The big ones take a minute or more each: VGG-16 is also the paper
        # flagfile's test, residual and concatenated branches are also
        # tests/models.py's branchy CNN and GoogLeNet (test_models).
        pytest.param(lambda: A.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3)), 4.0,
                     marks=pytest.mark.slow),
        pytest.param(lambda: A.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3),
                                        pooling="avg"), 2.0, marks=pytest.mark.slow),
        pytest.param(lambda: A.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3),
                                           pooling="avg"), 2.0, marks=pytest.mark.slow),
        (lambda: A.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10), 1.5),
    ],
    ids=["VGG16", "ResNet50", "InceptionV3", "MobileNetV2"],
)
def test_application_compresses_and_runs(build, ratio):
    model = build()
    compressed = micik_tf.compress(model, ratio=ratio, verbose=0)
    rep = micik_tf.report(compressed)
    assert abs(rep.ratio / ratio - 1) <= 0.02
    x = np.random.default_rng(0).random((2,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    y = compressed.predict(x, verbose=0)
    assert y.shape == model.predict(x, verbose=0).shape
    assert np.isfinite(y).all()
    # Every Dense/Conv2D is accounted for: factorized, or untouched with a reason.
    names = {l["name"] for l in rep.layers} | {u["name"] for u in rep.untouched}
    for layer in model.layers:
        if layer.weights:
            assert layer.name in names


def test_mobilenet_depthwise_layers_are_untouched_with_reason():
    model = A.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    rep = micik_tf.report(micik_tf.compress(model, ratio=1.5, verbose=0))
    reasons = {u["name"]: u["reason"] for u in rep.untouched}
    depthwise = [l.name for l in model.layers if isinstance(l, keras.layers.DepthwiseConv2D)]
    assert depthwise and all("depthwise" in reasons[name] for name in depthwise)

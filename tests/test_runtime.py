"""What a phone pays, measured on tiny models: latency and runtime memory of
`.tflite` files (shapes and order only, never a time), and the costs that
`report()` shows before exporting."""

import numpy as np
import pytest

import keras
import micik_tf
from micik_tf.deploy import latency, memory
from micik_tf.deploy.macs import forward_macs


def _cnn(width):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    x = np.random.default_rng(0).random((8, 12, 12, 1)).astype("float32")
    paths = {}
    for name, width in (("wide", 96), ("narrow", 4)):
        folder = tmp_path_factory.mktemp(name)
        paths[name] = micik_tf.export(_cnn(width), folder, formats=["tflite"],
                                      check_data=x)["tflite"]["path"]
    return paths, x


def test_latencies_have_a_median_and_a_p90_per_model_and_thread_count(files):
    paths, x = files
    for threads in (1, 2):
        stats = latency.latencies(paths, x[0], threads=threads, block=3, blocks=4)
        assert set(stats) == set(paths)
        for values in stats.values():
            assert 0 < values["median"] <= values["p90"]


def test_runtime_memory_orders_a_wide_model_above_a_narrow_one(files):
    paths, _ = files
    measured = memory.runtime_memory(paths, repeats=1)
    assert set(measured["bytes"]) == set(paths) and measured["method"] == memory.METHOD
    # The wide model's weights alone (2 x 9 x 96 x 96 floats) are 0.66 MB.
    assert measured["bytes"]["wide"] > measured["bytes"]["narrow"] + 300_000
    assert measured["baseline_bytes"] >= 0


def test_report_shows_macs_and_the_int8_weight_bytes(tmp_path):
    model = _cnn(32)
    student = micik_tf.compress(model, ratio=4, verbose=0)
    rep = micik_tf.report(student)
    assert rep.macs == forward_macs(student)["total"] < forward_macs(model)["total"]
    x = np.random.default_rng(0).random((16, 12, 12, 1)).astype("float32")
    int8 = micik_tf.export(student, tmp_path, formats=["tflite_int8"], representative_data=x,
                           check_data=x)["tflite_int8"]
    # A lower bound of the file: its weights, without the graph.
    assert rep.int8_bytes_estimate <= int8["bytes"] <= 2 * rep.int8_bytes_estimate + 20_000
    text = str(rep)
    assert "multiply-adds per example" in text and "int8 .tflite weights" in text
    assert rep.to_dict()["macs"] == rep.macs

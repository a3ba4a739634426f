"""Layers held inside composite layers (keras MultiHeadAttention, a user's
block) and subclassed models: found, replaced, shared, saved and exported."""

import numpy as np
import pytest

import keras
import micik_tf
from micik_tf.deploy.macs import forward_macs
from micik_tf.deploy.pruning import prunable_variables
from micik_tf.layers import CompressedBlock, FactorizedDense, sublayers
from micik_tf.recovery.losses import similarity_layer_names

EXPORT_FORMATS = ["saved_model", "tflite"]


def _attention_model():
    """Two pre-norm attention blocks with keras.layers.MultiHeadAttention."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 16))
    x = inputs
    for i in range(2):
        h = keras.layers.LayerNormalization(name=f"ln{i}")(x)
        x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(2, 8, name=f"mha{i}")(h, h)])
        x = keras.layers.Add()([x, keras.layers.Dense(16, name=f"ffn{i}")(x)])
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


@keras.saving.register_keras_serializable(package="micik_tf_tests")
class Block(keras.layers.Layer):
    """A user's residual feed-forward block: two Dense layers as attributes."""

    def __init__(self, width=16, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.up = keras.layers.Dense(2 * width, activation="relu")
        self.down = keras.layers.Dense(width)

    def call(self, x):
        return x + self.down(self.up(x))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


@keras.saving.register_keras_serializable(package="micik_tf_tests")
class Tower(keras.Model):
    """A subclassed model: a stem, a list of blocks, a head."""

    def __init__(self, depth=3, width=16, classes=4, **kwargs):
        super().__init__(**kwargs)
        self.depth, self.width, self.classes = depth, width, classes
        self.stem = keras.layers.Dense(width)
        self.blocks = [Block(width) for _ in range(depth)]
        self.head = keras.layers.Dense(classes)

    def call(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def get_config(self):
        return {**super().get_config(), "depth": self.depth, "width": self.width,
                "classes": self.classes}


def _tower():
    keras.utils.set_random_seed(1)
    model = Tower(name="tower")
    model(np.zeros((1, 12), "float32"))
    return model


def _bases(model):
    """Every SharedBasis that the wrappers of `model` hold, by user."""
    held = []
    for layer in model.layers:
        inner = [w for _, w in layer.replacements()] if isinstance(layer, CompressedBlock) else [
            layer]
        held += [w.shared_basis for w in inner if getattr(w, "holds_basis", False)]
    return held


def _snapshot(model):
    return [w.numpy().copy() for w in model.weights], [type(l) for l in model._flatten_layers()]


def _unchanged(model, snapshot):
    weights, types = _snapshot(model)
    return all(np.array_equal(a, b) for a, b in zip(weights, snapshot[0])) and types == snapshot[1]


def test_layers_inside_multi_head_attention_are_sites():
    sites, untouched = micik_tf.compression.grouping.find_sites(_attention_model())
    names = {s.name: (s.kind, s.m, s.n, s.held) for s in sites}
    assert names["mha0/query"] == ("einsum", 16, 16, True)
    # The output projection contracts heads and head size: m = 2 * 8.
    assert names["mha1/attention_output"] == ("einsum", 16, 16, True)
    assert names["ffn0"] == ("dense", 16, 16, False)
    assert not untouched or all("LayerNormalization" in why for why in untouched.values())


def test_queries_of_all_blocks_share_one_basis_exactly_and_survive_saving(tmp_path):
    model = _attention_model()
    snapshot = _snapshot(model)
    x = np.random.default_rng(0).normal(size=(4, 6, 16)).astype("float32")
    members = ["mha0/query", "mha1/query", "ffn0"]
    student = micik_tf.compress(model, ranks={name: (16, 0) for name in members},
                                groups=[members], verbose=0)
    assert _unchanged(model, snapshot)
    np.testing.assert_allclose(student(x), model(x), atol=1e-5)
    (group,) = micik_tf.report(student).groups
    assert group["members"] == ["mha0/query", "ffn0", "mha1/query"]
    assert len({id(b) for b in _bases(student)}) == 1 and len(_bases(student)) == 3

    path = str(tmp_path / "student.keras")
    student.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    held = _bases(loaded)
    assert len(held) == 3 and len({id(b) for b in held}) == 1
    assert sum(v is held[0].basis for v in loaded.weights) == 1
    assert loaded.count_params() == student.count_params()
    np.testing.assert_allclose(loaded(x), student(x), atol=1e-6)
    # Training sees the shared basis once.
    ids = [id(v) for v in loaded.trainable_variables]
    assert len(ids) == len(set(ids))


def test_attention_model_compresses_by_ratio_with_calibration_and_exports(tmp_path):
    model = _attention_model()
    x = np.random.default_rng(0).normal(size=(32, 6, 16)).astype("float32")
    student = micik_tf.compress(model, ratio=2, calibration_data=x, verbose=0)
    rep = micik_tf.report(student)
    held = [layer for layer in rep.layers if layer["name"].startswith("mha")]
    assert held, rep
    # Held layers are calibrated on their inputs, recorded inside the block.
    assert {layer["initialization"] for layer in rep.layers} == {"outputs"}
    assert 1.9 < rep.ratio
    results = micik_tf.export(student, tmp_path, formats=EXPORT_FORMATS, check_data=x)
    assert results["saved_model"]["relative_error"] < 1e-5
    assert results["tflite"]["relative_error"] < 1e-4


def test_a_subclassed_model_shares_across_its_blocks(tmp_path):
    model = _tower()
    snapshot = _snapshot(model)
    x = np.random.default_rng(0).normal(size=(8, 12)).astype("float32")
    ups = [f"tower/{b.name}/{b.up.name}" for b in model.blocks]
    student = micik_tf.compress(model, ranks={name: (16, 0) for name in ups}, groups=[ups],
                                share="input", verbose=0)
    assert _unchanged(model, snapshot)
    np.testing.assert_allclose(student(x), model(x), atol=1e-5)
    (block,) = [layer for layer in student.layers if isinstance(layer, CompressedBlock)]
    assert isinstance(block.block, Tower)
    assert all(isinstance(sublayers.get(block.block, at), FactorizedDense)
               for at, _ in block.replacements())
    assert len({id(b) for b in _bases(student)}) == 1

    path = str(tmp_path / "tower.keras")
    student.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == student.count_params()
    np.testing.assert_allclose(loaded(x), student(x), atol=1e-6)
    held = _bases(loaded)
    assert len(held) == 3 and len({id(b.basis) for b in held}) == 1

    results = micik_tf.export(loaded, tmp_path / "export", formats=EXPORT_FORMATS,
                              check_data=x)
    assert results["tflite"]["relative_error"] < 1e-4


def test_a_subclassed_model_compresses_by_ratio_on_calibration_data():
    model = _tower()
    x = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    plain = micik_tf.compress(model, ratio=3, verbose=0)
    student = micik_tf.compress(model, ratio=3, calibration_data=x, verbose=0)
    rep = micik_tf.report(student)
    assert 2.9 < rep.ratio < 3.2
    assert any("/block" in layer["name"] for layer in rep.layers)
    assert {layer["initialization"] for layer in rep.layers} == {"outputs"}

    # Fitting the outputs on the data beats fitting the weights, on that data.
    def error(candidate):
        return float(np.linalg.norm(candidate(x) - model(x)) / np.linalg.norm(model(x)))

    assert error(student) < error(plain)


@keras.saving.register_keras_serializable(package="micik_tf_tests")
class TiedHead(keras.layers.Layer):
    """Reads its Dense layer's kernel directly: cannot take a factorized one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.Dense(16)

    def build(self, shape):
        self.proj.build(shape)

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(self.proj.kernel))


def test_a_block_that_reads_a_kernel_is_named_in_the_error():
    inputs = keras.Input((16,))
    model = keras.Model(inputs, TiedHead(name="tied")(keras.layers.Dense(16)(inputs)))
    with pytest.raises(ValueError, match=r"Layer 'tied' \(TiedHead\) fails once its layers "
                                         r"'dense.*' are factorized.*exclude"):
        micik_tf.compress(model, ranks={"tied/" + model.layers[-1].proj.name: (0, 4)},
                          verbose=0)


def test_an_unbuilt_subclassed_model_gets_one_line():
    with pytest.raises(ValueError, match="must be built on one input"):
        micik_tf.compress(Tower(), ratio=2)


def test_held_layers_are_pruned_and_counted():
    model = _attention_model()
    student = micik_tf.compress(model, ratio=2, verbose=0)
    names = [path for path, _ in prunable_variables(student)]
    assert any("query" in name for name in names), names
    before, after = forward_macs(model), forward_macs(student)
    assert "mha0/query" in before["layers"] and "mha0/query" in after["layers"]
    assert after["layers"]["mha0/query"] < before["layers"]["mha0/query"]


def test_a_held_basis_is_stored_once_in_tflite(tmp_path):
    """A 90x192 basis held by four layers of a subclassed model: storing it
    per layer would give ~5.6 bytes per parameter."""
    keras.utils.set_random_seed(1)
    model = Tower(depth=4, width=96, name="tower")
    model(np.zeros((1, 12), "float32"))
    ups = [f"tower/{b.name}/{b.up.name}" for b in model.blocks]
    student = micik_tf.compress(model, ranks={n: (90, 4) for n in ups}, groups=[ups],
                                share="output", verbose=0)
    results = micik_tf.export(student, tmp_path, formats=["tflite"],
                              check_data=np.ones((4, 12), "float32"))
    assert results["tflite"]["bytes_per_parameter"] < 4.3
    assert results["tflite"]["relative_error"] < 1e-4


def test_the_distiller_compares_attention_blocks_by_default():
    teacher = _attention_model()
    student = micik_tf.compress(teacher, ratio=2, verbose=0)
    distiller = micik_tf.Distiller(teacher, student)
    distiller.compile(optimizer="adam")
    x = np.random.default_rng(0).normal(size=(16, 6, 16)).astype("float32")
    y = np.arange(16) % 3
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    names = similarity_layer_names(teacher, student)
    assert {"mha0", "mha1"} <= set(names), names
    assert np.isfinite(history.history["loss"][-1])


@keras.saving.register_keras_serializable(package="micik_tf_tests")
class Encoder(keras.layers.Layer):
    """A keras-hub-style encoder block: a MultiHeadAttention and a list of
    feed-forward Dense layers, held by a user's layer (composites nested)."""

    def __init__(self, dim=16, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.attention = keras.layers.MultiHeadAttention(2, dim // 2)
        self.norms = [keras.layers.LayerNormalization() for _ in range(2)]
        self.feed_forward = [keras.layers.Dense(2 * dim, activation="gelu"),
                             keras.layers.Dense(dim)]

    def build(self, shape):
        shape = tuple(shape)
        self.attention.build(shape, shape)
        for norm in self.norms:
            norm.build(shape)
        self.feed_forward[0].build(shape)
        self.feed_forward[1].build(shape[:-1] + (2 * self.dim,))

    def call(self, x):
        h = self.norms[0](x)
        x = x + self.attention(h, h)
        h = self.norms[1](x)
        for dense in self.feed_forward:
            h = dense(h)
        return x + h

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def test_attention_nested_in_a_users_encoder(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 16))
    x = inputs
    for i in range(2):
        x = Encoder(name=f"enc{i}")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x)))
    x = np.random.default_rng(0).normal(size=(32, 6, 16)).astype("float32")
    queries = [s.name for s in micik_tf.compression.grouping.find_sites(model)[0]
               if s.name.endswith("/query")]
    assert len(queries) == 2  # enc0/<attention>/query, enc1/<attention>/query
    exact = micik_tf.compress(model, ranks={n: (16, 0) for n in queries}, groups=[queries],
                              share="input", verbose=0)
    np.testing.assert_allclose(exact(x), model(x), atol=1e-5)
    student = micik_tf.compress(model, ratio=2, calibration_data=x, verbose=0)
    path = str(tmp_path / "encoder.keras")
    student.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == student.count_params()
    np.testing.assert_allclose(loaded(x), student(x), atol=1e-6)


def test_the_distiller_takes_a_subclassed_teacher():
    teacher = _tower()
    snapshot = _snapshot(teacher)
    student = micik_tf.compress(teacher, ratio=2, verbose=0)
    distiller = micik_tf.Distiller(teacher, student)
    distiller.compile(optimizer="adam")
    x = np.random.default_rng(0).normal(size=(16, 12)).astype("float32")
    history = distiller.fit(x, np.arange(16) % 4, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert _unchanged(teacher, snapshot)

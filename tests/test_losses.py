"""Tests for micik_tf.recovery.losses: CKA, the recovery losses, and their Distiller use."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from micik_tf.layers import FactorizedDense
from micik_tf.recovery.losses import (
    CrossLayerSimilarity,
    LayerInheritance,
    feature_model,
    linear_cka,
    logits_distillation,
    similarity_layer_names,
    similarity_matrix,
)

NAMES = ["hidden1", "hidden2"]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _features(widths=(6, 5, 7), batch=10, seed=0):
    rng = _rng(seed)
    return [rng.normal(size=(batch, w)).astype("float32") for w in widths]


def _orthogonal(n, seed):
    q, _ = np.linalg.qr(_rng(seed).normal(size=(n, n)))
    return q.astype("float32")


def _value(x):
    return float(keras.ops.convert_to_numpy(x))


def _dense_model(name="teacher", seed=0):
    init = lambda i: keras.initializers.GlorotUniform(seed=seed * 10 + i)  # noqa: E731
    inputs = keras.Input((8,), name="x")
    x = keras.layers.Dense(16, activation="relu", kernel_initializer=init(1), name="hidden1")(inputs)
    x = keras.layers.Dense(16, activation="relu", kernel_initializer=init(2), name="hidden2")(x)
    outputs = keras.layers.Dense(4, kernel_initializer=init(3), name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _weights(model):
    return [np.array(w) for w in model.weights]


# ---------------------------------------------------------------------------
# Linear CKA and the similarity matrix.
# ---------------------------------------------------------------------------


def test_cka_of_a_batch_with_itself_is_one():
    x = _features()[0]
    assert _value(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_cka_across_widths_and_ranks():
    rng = _rng(1)
    x = rng.normal(size=(10, 3, 3, 2)).astype("float32")  # conv-like, D=18
    y = rng.normal(size=(10, 5)).astype("float32")
    value = _value(linear_cka(x, y))
    assert 0.0 < value < 1.0
    # A linear map of x, of another width, is still partly similar to x.
    z = x.reshape(10, -1) @ rng.normal(size=(18, 4)).astype("float32")
    assert _value(linear_cka(x, z)) > value


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y, _ = _features(widths=(6, 5, 5))
    transformed = y @ _orthogonal(5, seed=3) * 3.7
    assert _value(linear_cka(x, transformed)) == pytest.approx(
        _value(linear_cka(x, y)), abs=1e-6
    )


def test_cka_matches_the_feature_space_formula():
    # CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centered X, Y.
    x, y, _ = _features(widths=(6, 5, 5))
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert _value(linear_cka(x, y)) == pytest.approx(expected, abs=1e-6)


def test_cka_computes_in_float32_for_float16_inputs_and_traces():
    x, y, _ = _features()
    expected = _value(linear_cka(x, y))
    result = tf.function(linear_cka)(x.astype("float16"), y.astype("float16"))
    assert result.dtype == tf.float32
    assert float(result) == pytest.approx(expected, abs=1e-3)


def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    features = _features(widths=(6, 5, 7, 3))
    matrix = keras.ops.convert_to_numpy(similarity_matrix(features))
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(matrix), np.ones(4), atol=1e-6)
    assert matrix[0, 2] == pytest.approx(_value(linear_cka(features[0], features[2])), abs=1e-6)


# ---------------------------------------------------------------------------
# The losses on features.
# ---------------------------------------------------------------------------


def _losses():
    return [CrossLayerSimilarity(["a", "b", "c"]), LayerInheritance(["a", "b", "c"])]


@pytest.mark.parametrize("loss", _losses(), ids=lambda l: type(l).__name__)
def test_losses_are_zero_when_the_student_matches_the_teacher(loss):
    features = _features()
    assert _value(loss.compute_loss(features, list(features))) == pytest.approx(0.0, abs=1e-5)


def test_logits_distillation_is_zero_for_equal_logits_and_scaled_by_t_squared():
    logits = _rng(2).normal(size=(6, 4)).astype("float32")
    assert _value(logits_distillation(4.0).compute_loss(logits, logits)) == pytest.approx(0.0, abs=1e-5)
    other = _rng(3).normal(size=(6, 4)).astype("float32")

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    t = 4.0
    p, q = softmax(logits / t), softmax(other / t)
    expected = t**2 * np.mean(np.sum(p * np.log(p / q), axis=-1))
    loss = logits_distillation(t)
    assert isinstance(loss, keras.distillation.LogitsDistillation)
    assert _value(loss.compute_loss(logits, other)) == pytest.approx(expected, rel=1e-4)
    restored = type(loss).from_config(loss.get_config())
    assert _value(restored.compute_loss(logits, other)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss", _losses(), ids=lambda l: type(l).__name__)
def test_losses_are_unchanged_by_orthogonal_transforms_of_the_student(loss):
    teacher = _features(seed=0)
    student = _features(seed=1)
    moved = [f @ _orthogonal(f.shape[1], seed=i) * (1.0 + i) for i, f in enumerate(student)]
    before = _value(loss.compute_loss(teacher, student))
    assert before > 1e-3
    assert _value(loss.compute_loss(teacher, moved)) == pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("loss", _losses(), ids=lambda l: type(l).__name__)
def test_losses_accept_lists_dicts_and_feature_model_outputs(loss):
    teacher, student = _features(seed=0), _features(seed=1)
    expected = _value(loss.compute_loss(teacher, student))
    as_dict = lambda fs: dict(zip(["c", "a", "b"], [fs[2], fs[0], fs[1]]))  # noqa: E731
    logits = np.zeros((10, 4), "float32")
    assert _value(loss.compute_loss(as_dict(teacher), as_dict(student))) == pytest.approx(expected)
    assert _value(loss.compute_loss([logits] + teacher, [logits] + student)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 layers"):
        loss.validate_outputs(teacher[:2], student[:2])
    with pytest.raises(ValueError, match=r"without the layers \['c'\]"):
        loss.compute_loss({"a": teacher[0], "b": teacher[1]}, student)


def test_inheritance_is_the_sum_of_one_minus_cka():
    teacher, student = _features(seed=0), _features(seed=1)
    expected = sum(1.0 - _value(linear_cka(s, t)) for t, s in zip(teacher, student))
    loss = LayerInheritance(["a", "b", "c"])
    assert _value(loss.compute_loss(teacher, student)) == pytest.approx(expected, abs=1e-5)
    single = LayerInheritance("a")
    assert single.teacher_layer_name == single.student_layer_name == "a"
    assert loss.teacher_layer_name is None and loss.student_layer_name is None
    assert _value(single.compute_loss(teacher[0], student[0])) == pytest.approx(
        1.0 - _value(linear_cka(student[0], teacher[0])), abs=1e-6
    )


def test_similarity_weights_far_pairs_by_w_far_only():
    # Layer 1 is constant over the batch, so its similarity to every layer is 0
    # on both sides: changing layer 2 then changes only the far pair (0, 2).
    a, _, c = _features(seed=0)
    c_student = _features(seed=1)[2]
    constant = np.ones((10, 4), "float32")
    teacher, student = [a, constant, c], [a, constant, c_student]
    gap = _value(linear_cka(a, c_student)) - _value(linear_cka(a, c))
    assert abs(gap) > 1e-2

    def loss(**kwargs):
        return _value(CrossLayerSimilarity(["a", "b", "c"], **kwargs).compute_loss(teacher, student))

    assert loss(w_near=1.0, w_far=0.5) == pytest.approx(0.5 * gap**2, rel=1e-4)
    assert loss(w_near=7.0, w_far=0.5) == pytest.approx(loss(w_near=1.0, w_far=0.5), rel=1e-6)
    assert loss(w_near=1.0, w_far=1.5) == pytest.approx(3 * loss(w_near=1.0, w_far=0.5), rel=1e-5)
    # A window of 2 makes the pair near.
    assert loss(window=2, w_near=3.0, w_far=0.0) == pytest.approx(3.0 * gap**2, rel=1e-4)


@pytest.mark.parametrize("loss", _losses(), ids=lambda l: type(l).__name__)
def test_gradients_reach_only_the_student(loss):
    rng = _rng(4)
    x = rng.normal(size=(10, 6)).astype("float32")
    teacher = [tf.Variable(f) for f in _features(seed=0)]
    layers = [keras.layers.Dense(w) for w in (6, 5, 7)]
    with tf.GradientTape(persistent=True) as tape:
        student = [layer(x) for layer in layers]
        value = loss.compute_loss(teacher, student)
    for grad in tape.gradient(value, teacher):
        assert grad is None or not np.any(grad.numpy())
    kernels = [layer.kernel for layer in layers]
    for grad in tape.gradient(value, kernels):
        assert grad is not None and np.any(grad.numpy())


def test_losses_run_in_a_replica_context():
    teacher, student = _features(seed=0), _features(seed=1)
    loss = CrossLayerSimilarity(["a", "b", "c"])
    expected = _value(loss.compute_loss(teacher, student))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    @tf.function
    def step():
        return strategy.run(lambda: loss.compute_loss(teacher, student))

    assert float(strategy.experimental_local_results(step())[0]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------
# Models: feature_model, similarity_layer_names and keras.distillation.Distiller.
# ---------------------------------------------------------------------------


def test_feature_model_returns_the_output_then_the_features():
    model = _dense_model()
    x = _rng(5).normal(size=(3, 8)).astype("float32")
    outputs = feature_model(model, NAMES)(x)
    assert len(outputs) == 3
    np.testing.assert_allclose(outputs[0], model(x), atol=1e-6)
    hidden1 = keras.Model(model.input, model.get_layer("hidden1").output)(x)
    np.testing.assert_allclose(outputs[1], hidden1, atol=1e-6)
    only = feature_model(model, "hidden2", include_output=False)
    assert only(x).shape == (3, 16)


def test_feature_model_of_a_sequential_model():
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")]
    )
    x = _rng(5).normal(size=(2, 8)).astype("float32")
    output, a = feature_model(model, "a")(x)
    np.testing.assert_allclose(output, model(x), atol=1e-6)
    assert a.shape == (2, 5)


def test_feature_model_names_missing_layers_and_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'nope'.*Available layers: \['x', 'hidden1'"):
        feature_model(_dense_model(), ["hidden1", "nope"])


def test_feature_model_refuses_a_model_without_symbolic_inputs():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="symbolic inputs"):
        feature_model(Subclassed(), "hidden1")


def test_similarity_layer_names_matches_compressed_sites_by_name():
    teacher = _dense_model()
    inputs = keras.Input((8,))
    x = FactorizedDense(16, rank_unique=2, activation="relu", name="hidden1")(inputs)
    x = keras.layers.Dropout(0.1, name="hidden2")(x)  # same name, not a site
    outputs = keras.layers.Dense(4, name="logits")(x)
    student = keras.Model(inputs, outputs)
    assert similarity_layer_names(teacher, student) == ["hidden1", "logits"]
    assert similarity_layer_names(teacher, teacher) == ["hidden1", "hidden2", "logits"]


def test_distiller_with_feature_models_trains_only_the_student():
    teacher = _dense_model("teacher", seed=0)
    student = _dense_model("student", seed=1)
    distiller = keras.distillation.Distiller(
        teacher=feature_model(teacher, NAMES),
        student=feature_model(student, NAMES),
        distillation_losses=[
            CrossLayerSimilarity(NAMES),
            LayerInheritance(NAMES),
            # The leading output of a feature model is the logits.
            keras.distillation.LogitsDistillation(
                temperature=2.0, loss=[keras.losses.KLDivergence(), None, None]
            ),
        ],
        student_loss_weight=0.0,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    teacher_before, student_before = _weights(teacher), _weights(student)
    x = _rng(6).normal(size=(32, 8)).astype("float32")
    history = distiller.fit(x, epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    for before, after in zip(teacher_before, _weights(teacher)):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(student_before, _weights(student)))


def test_distiller_with_single_layer_inheritance_and_logits():
    teacher = _dense_model("teacher", seed=0)
    student = _dense_model("student", seed=1)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=[LayerInheritance("hidden1"), logits_distillation(3.0)],
        student_loss_weight=0.5,
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    teacher_before, student_before = _weights(teacher), _weights(student)
    rng = _rng(7)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.integers(0, 4, size=(16,))
    history = distiller.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for before, after in zip(teacher_before, _weights(teacher)):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(student_before, _weights(student)))


def test_distiller_refuses_multi_layer_losses_on_plain_models():
    with pytest.raises(ValueError, match="feature_model"):
        keras.distillation.Distiller(
            teacher=_dense_model("teacher"),
            student=_dense_model("student", seed=1),
            distillation_losses=CrossLayerSimilarity(NAMES),
        )
    with pytest.raises(ValueError, match="'nope'"):
        keras.distillation.Distiller(
            teacher=_dense_model("teacher"),
            student=_dense_model("student", seed=1),
            distillation_losses=LayerInheritance("nope"),
        )


# ---------------------------------------------------------------------------
# Configs and argument checks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        CrossLayerSimilarity(["a", "b", "c"], window=2, w_near=0.3, w_far=0.0),
        LayerInheritance("a"),
        LayerInheritance(["a", "b"]),
    ],
    ids=["similarity", "inheritance_single", "inheritance_multi"],
)
def test_config_round_trip(loss):
    config = loss.get_config()
    restored = type(loss).from_config(config)
    assert restored.get_config() == config
    assert restored.teacher_layer_name == loss.teacher_layer_name
    # Registered, so Keras serialization needs no custom_objects.
    serialized = keras.saving.serialize_keras_object(loss)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is type(loss) and again.get_config() == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer_names": ["a"]}, "layer_names=\\['a'\\]"),
        ({"layer_names": "ab"}, "layer_names='ab'"),
        ({"layer_names": ["a", "a"]}, "layer_names"),
        ({"layer_names": ["a", 3]}, "layer_names"),
        ({"layer_names": NAMES, "window": 0}, "`window`.*window=0"),
        ({"layer_names": NAMES, "window": 1.5}, "`window`.*window=1.5"),
        ({"layer_names": NAMES, "w_near": -1.0}, "`w_near`.*w_near=-1.0"),
        ({"layer_names": NAMES, "w_far": "x"}, "`w_far`.*w_far='x'"),
        ({"layer_names": NAMES, "w_far": float("nan")}, "`w_far`"),
    ],
)
def test_similarity_validates_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossLayerSimilarity(**kwargs)


@pytest.mark.parametrize("layer_names", [[], 3, ["a", ""]])
def test_inheritance_validates_its_arguments(layer_names):
    with pytest.raises(ValueError, match="`layer_names`"):
        LayerInheritance(layer_names)


def test_losses_without_layer_names_take_them_from_the_models():
    teacher, student = _dense_model("teacher"), _dense_model("student", seed=1)
    similarity, inheritance = CrossLayerSimilarity(), LayerInheritance()
    with pytest.raises(ValueError, match="without `layer_names`"):
        similarity.compute_loss(_features(), _features())
    keras.distillation.Distiller(
        teacher=feature_model(teacher, NAMES + ["logits"]),
        student=feature_model(student, NAMES + ["logits"]),
        distillation_losses=[similarity, inheritance],
        student_loss_weight=0.0,
    )
    assert similarity.layer_names == NAMES + ["logits"]
    assert inheritance.layer_names == NAMES + ["logits"]

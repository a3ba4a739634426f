import gzip
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras
import tensorflow as tf

import micik_tf
from micik_tf.deploy.pruning import (
    ConstantSparsity,
    MagnitudePruner,
    PolynomialDecay,
    prunable_variables,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = {"c1": (4, 2), "c2": (4, 2), "c3": (4, 2)}


def conv_stack():
    """Three Conv2D of equal kernel shape (one group) and a Dense head."""
    return keras.Sequential([
        keras.Input((6, 6, 8)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
        keras.layers.Conv2D(8, 3, padding="same", name="c3"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, name="logits"),
    ])


def compressed_stack():
    return micik_tf.compress(
        conv_stack(), ranks=RANKS, groups=[["c1", "c2", "c3"]], verbose=0
    )


def _biases(model):
    return {w.path: w.numpy().copy() for w in model.weights if w.path.endswith("bias")}


# --- schedules ------------------------------------------------------------------


def test_polynomial_decay_values():
    schedule = PolynomialDecay(0.2, 0.8, begin_step=100, end_step=300, power=3, frequency=50)
    assert schedule(100) == (True, pytest.approx(0.2))
    # Middle: p = 1/2, 0.8 + (0.2 - 0.8) * 0.5**3.
    assert schedule(200) == (True, pytest.approx(0.8 - 0.6 / 8))
    assert schedule(300) == (True, pytest.approx(0.8))
    assert schedule(400) == (False, pytest.approx(0.8))  # past end: clipped, no pruning
    assert schedule(50) == (False, pytest.approx(0.2))  # before begin
    assert schedule(225)[0] is False  # off the frequency grid
    assert schedule(250)[0] is True
    linear = PolynomialDecay(0.0, 0.5, 0, 10, power=1, frequency=1)
    assert [linear(s)[1] for s in (0, 5, 10)] == pytest.approx([0.0, 0.25, 0.5])


def test_constant_sparsity_gating():
    forever = ConstantSparsity(0.5, begin_step=10, frequency=5)
    assert forever(10) == (True, 0.5)
    assert forever(12) == (False, 0.5)
    assert forever(5) == (False, 0.5)
    assert forever(10_000_000)[0] is True
    bounded = ConstantSparsity(0.5, begin_step=0, end_step=20, frequency=10)
    assert [bounded(s)[0] for s in (0, 10, 20, 30)] == [True, True, True, False]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PolynomialDecay(0.0, 1.0, 0, 10), "final_sparsity=1.0"),
        (lambda: PolynomialDecay(-0.1, 0.5, 0, 10), "initial_sparsity=-0.1"),
        (lambda: PolynomialDecay(0.0, 0.5, -1, 10), "begin_step=-1"),
        (lambda: PolynomialDecay(0.0, 0.5, 10, 10), "end_step=10"),
        (lambda: PolynomialDecay(0.0, 0.5, 0, -1), "end_step=-1"),
        (lambda: PolynomialDecay(0.0, 0.5, 0, 10, power=0), "power=0"),
        (lambda: PolynomialDecay(0.0, 0.5, 0, 10, frequency=0), "frequency=0"),
        (lambda: ConstantSparsity(1.5, 0), "target_sparsity=1.5"),
        (lambda: ConstantSparsity(0.5, 5, end_step=3), "end_step=3"),
        (lambda: ConstantSparsity(0.5, 0, frequency=0), "frequency=0"),
    ],
)
def test_schedule_validation(make, message):
    with pytest.raises(ValueError, match="Received an invalid value") as info:
        make()
    assert message in str(info.value)


# --- which variables --------------------------------------------------------------


def test_prunable_variables_lists_the_shared_basis_once():
    model = compressed_stack()
    names = [name for name, _ in prunable_variables(model)]
    assert len(names) == len(set(names))
    bases = [n for n in names if n.endswith("/basis")]
    assert len(bases) == 1
    assert sum(n.endswith("/coefficients") for n in names) == 3
    assert sum(n.endswith("/unique_left") for n in names) == 3
    assert not any(n.endswith("bias") or n.startswith("logits") for n in names)
    with_dense = [n for n, _ in prunable_variables(model, include_dense_kernels=True)]
    assert set(with_dense) - set(names) == {"logits/kernel"}
    # Reached through a nested model, still listed once each.
    outer = keras.Sequential([model, keras.layers.Dense(2, name="outer")])
    nested = [n for n, _ in prunable_variables(outer)]
    assert sorted(nested) == sorted(names)


def test_pruner_rejects_a_model_without_factors():
    with pytest.raises(ValueError, match="no prunable variables"):
        MagnitudePruner(conv_stack(), ConstantSparsity(0.5, 0))
    with pytest.raises(ValueError, match="`schedule`"):
        MagnitudePruner(compressed_stack(), 0.5)


# --- pruning ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_prunes_each_factor_to_target_and_zeros_stay(target):
    model = compressed_stack()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 8)).astype("float32")
    y = np.array([0, 1, 2, 3])
    biases = _biases(model)
    before = {n: v.numpy().copy() for n, v in prunable_variables(model)}
    pruner = MagnitudePruner(model, ConstantSparsity(target, begin_step=0, frequency=10))
    assert pruner.update(3) is False and pruner.masks == {}
    assert pruner.update(10) is True

    for name, variable in pruner.variables:
        value = variable.numpy()
        zeros = np.count_nonzero(value == 0)
        assert abs(zeros - target * value.size) <= 1, name
        # The survivors are the largest magnitudes, unchanged.
        kept = value != 0
        np.testing.assert_array_equal(value[kept], before[name][kept])
        assert np.abs(before[name][~kept]).max() <= np.abs(before[name][kept]).min()
    report = pruner.sparsity()
    assert report["overall"] == pytest.approx(target, abs=0.01)
    assert set(report["variables"]) == set(before)
    for name, value in _biases(model).items():
        np.testing.assert_array_equal(value, biases[name])
    assert np.all(np.isfinite(model(x).numpy()))

    # One SGD step moves the pruned weights; apply() puts them back at zero.
    optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert pruner.sparsity()["overall"] < target - 0.05
    pruner.apply()
    for name, variable in pruner.variables:
        np.testing.assert_array_equal(variable.numpy()[~pruner.masks[name]], 0)
    assert pruner.sparsity()["overall"] == pytest.approx(report["overall"])


def test_polynomial_schedule_is_monotone_and_deterministic():
    results = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        model = compressed_stack()
        pruner = MagnitudePruner(model, PolynomialDecay(0.0, 0.8, 0, 4, frequency=2))
        history = []
        for step in range(5):
            pruner.update(step)
            history.append(pruner.sparsity()["overall"])
        results.append((history, {n: m.copy() for n, m in pruner.masks.items()}))
    history = results[0][0]
    assert history == sorted(history) and history[-1] == pytest.approx(0.8, abs=0.01)
    for name, mask in results[0][1].items():
        np.testing.assert_array_equal(mask, results[1][1][name])


def test_ties_are_broken_by_position():
    model = compressed_stack()
    (_, basis), *_ = [(n, v) for n, v in prunable_variables(model) if n.endswith("/basis")]
    basis.assign(np.ones(basis.shape, "float32"))
    pruner = MagnitudePruner(model, ConstantSparsity(0.25, 0, frequency=1))
    pruner.update(0)
    flat = basis.numpy().ravel()
    count = round(0.25 * flat.size)
    assert np.all(flat[:count] == 0) and np.all(flat[count:] == 1)


def test_masks_from_weights_and_not_model_weights(tmp_path):
    model = compressed_stack()
    count = len(model.weights)
    pruner = MagnitudePruner(model, ConstantSparsity(0.5, 0, frequency=1))
    pruner.update(0)
    assert len(model.weights) == count  # masks are not Keras weights
    path = str(tmp_path / "pruned.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    again = MagnitudePruner(reloaded, ConstantSparsity(0.5, 0, frequency=1))
    again.masks_from_weights()
    assert again.sparsity() == pruner.sparsity()
    for name, mask in pruner.masks.items():
        np.testing.assert_array_equal(again.masks[name], mask)


def _gzip_size(model):
    raw = b"".join(np.asarray(w.numpy(), "float32").tobytes() for w in model.weights)
    return len(gzip.compress(raw, compresslevel=9)), len(raw)


def test_gzip_shrinks_at_80_percent():
    model = compressed_stack()
    dense_size, raw = _gzip_size(model)
    pruner = MagnitudePruner(
        model, ConstantSparsity(0.8, 0, frequency=1), include_dense_kernels=True
    )
    pruner.update(0)
    sparse_size, _ = _gzip_size(model)
    # Every weight of the model is counted (biases too), not only the factors.
    assert dense_size > 0.9 * raw  # random floats barely compress
    assert sparse_size < 0.6 * dense_size, (sparse_size, dense_size)


# --- tf.distribute ----------------------------------------------------------------


def test_mirrored_strategy_one_device():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = compressed_stack()
        pruner = MagnitudePruner(model, ConstantSparsity(0.5, 0, frequency=1))
    pruner.update(0)
    assert pruner.sparsity()["overall"] == pytest.approx(0.5, abs=0.01)

    def inside():
        pruner.apply()

    with pytest.raises(RuntimeError, match="cross-replica"):
        strategy.run(inside)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, tensorflow as tf, micik_tf
    from micik_tf.recovery import strategies as distribute
    from micik_tf.deploy.pruning import ConstantSparsity, MagnitudePruner
    from tests.test_pruning import compressed_stack
    distribute.use_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = compressed_stack()
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    pruner = MagnitudePruner(model, ConstantSparsity(0.5, 0, frequency=1))
    pruner.update(0)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x)) / 4.0
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    x = tf.data.Dataset.from_tensor_slices(np.ones((4, 6, 6, 8), "float32")).batch(4)
    for batch in strategy.experimental_distribute_dataset(x):
        strategy.run(tf.function(step), args=(batch,))
    pruner.apply()
    for name, variable in pruner.variables:
        replicas = [v.numpy() for v in variable.value.values]
        assert len(replicas) == 2, name
        for value in replicas:
            np.testing.assert_array_equal(value[~pruner.masks[name]], 0)
        np.testing.assert_array_equal(replicas[0], replicas[1])
    print("OK", pruner.sparsity()["overall"])
    """
)


def test_mirrored_strategy_two_logical_cpus():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 0.5" in result.stdout


# --- inside a compiled step, and LAMP --------------------------------------------------


def test_the_compiled_step_prunes_as_the_eager_update_does():
    schedule = PolynomialDecay(0.0, 0.7, 0, 6, frequency=2)
    eager_model, graph_model = compressed_stack(), compressed_stack()
    graph_model.set_weights(eager_model.get_weights())
    eager = MagnitudePruner(eager_model, schedule)
    graph = MagnitudePruner(graph_model, schedule)
    compiled = tf.function(lambda step: graph.step(step))
    for step in range(8):
        assert bool(compiled(tf.constant(step, tf.int64))) == eager.update(step)
        for (name, a), (_, b) in zip(eager.variables, graph.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name} at {step}")
    for name, mask in eager.masks.items():
        np.testing.assert_array_equal(graph.masks[name], mask)


def test_lamp_prunes_one_global_threshold_and_keeps_every_layer():
    model = compressed_stack()
    pruner = MagnitudePruner(model, ConstantSparsity(0.9, 0, frequency=1),
                             include_dense_kernels=True, scope="lamp")
    sizes = {n: int(np.prod(v.shape)) for n, v in pruner.variables}
    pruner.update(0)
    zeros = {n: int(np.sum(v.numpy() == 0)) for n, v in pruner.variables}
    assert abs(sum(zeros.values()) - 0.9 * sum(sizes.values())) <= 1
    # Unlike one sparsity per layer, the layers end at different sparsities,
    # and none is emptied: each keeps at least its largest entry.
    assert len({round(zeros[n] / sizes[n], 2) for n in sizes}) > 1
    assert all(zeros[n] < sizes[n] for n in sizes)
    # LAMP scores: each entry's squared magnitude over the sum of those at
    # least as large; the largest scores 1.
    from micik_tf.deploy.pruning import lamp_scores

    scores = lamp_scores(np.array([3.0, -1.0, 2.0])).numpy()
    np.testing.assert_allclose(scores, [1.0, 1.0 / 14.0, 4.0 / 13.0])

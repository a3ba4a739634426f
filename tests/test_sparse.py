"""compress(unique="sparse"): its two special cases (global LAMP pruning,
plain MICIK), the budget, `.keras` round trip and exports with the masks and
sharing intact, masks kept in recovery, and the one-line errors."""

import numpy as np
import pytest

import keras
import micik_tf
from micik_tf.compression import decomposition, sparse
from micik_tf.deploy import pruning
from micik_tf.layers import FACTORIZED, SharedBasis


def _cnn():
    """Convolutions of one geometry (so they can share a basis) and Dense."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="c3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(24, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))


def _x(n=64):
    return np.random.default_rng(1).normal(size=(n, 8, 8, 3)).astype("float32")


def _wrappers(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, FACTORIZED)}


def _masks(model):
    return {name: np.asarray(layer.sparse_kernel) != 0
            for name, layer in _wrappers(model).items() if layer.sparse}


def test_without_ranks_it_is_global_lamp_pruning():
    model = _cnn()
    student = micik_tf.compress(model, ratio=6, unique="sparse", sparse_share=1, verbose=0)
    wrappers = _wrappers(student)
    assert {w.rank for w in wrappers.values()} == {0}
    # The baseline: the teacher's kernels pruned by one threshold on LAMP scores.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    pruner = pruning.MagnitudePruner(copy, pruning.ConstantSparsity(0.5, 0),
                                     include_dense_kernels=True, scope="lamp")
    pruner.prune_to(pruning.sparsity_for_ratio(copy, 6))
    expected = {layer.name: decomposition.kernel_matrix(np.asarray(layer.kernel)) != 0
                for layer in copy.layers if hasattr(layer, "kernel")}
    masks = _masks(student)
    assert set(masks) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(masks[name], expected[name], err_msg=name)
    # The kept values are the teacher's, so the two models compute the same.
    x = _x(8)
    np.testing.assert_allclose(student(x), copy(x), rtol=1e-5, atol=1e-5)
    assert abs(micik_tf.report(student).params_after - pruning.stored_parameters(copy)) <= 1
    # Explicit (0, 0) ranks with a ratio are the same allocation.
    again = micik_tf.compress(model, ratio=6, unique="sparse", verbose=0,
                              ranks={name: (0, 0) for name in expected})
    for name, mask in _masks(again).items():
        np.testing.assert_array_equal(mask, expected[name])


def test_without_nonzeros_it_is_micik():
    model = _cnn()
    for objective in ("sum_error", "log_energy"):
        plain = micik_tf.compress(model, ratio=4, objective=objective, verbose=0)
        student = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0,
                                    objective=objective, verbose=0)
        assert not _masks(student)
        assert [w.shape for w in student.weights] == [w.shape for w in plain.weights]
        for a, b in zip(student.weights, plain.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _low_rank_plus_spikes(model):
    """Each kernel set to a rank-2 matrix plus a few large entries: the shape
    where neither low rank nor pruning alone fits well."""
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            shape = tuple(layer.kernel.shape)
            m, n = int(np.prod(shape[:-1])), shape[-1]
            w = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n)) / np.sqrt(m)
            spikes = rng.random((m, n)) < 0.05
            w += spikes * rng.normal(scale=3.0, size=(m, n)) / np.sqrt(m)
            layer.kernel.assign(w.reshape(shape).astype("float32"))
    return model


def test_the_split_search_is_no_worse_than_either_end_and_meets_the_budget():
    model = _low_rank_plus_spikes(_cnn())
    x = _x()
    teacher = model(x)

    def output_error(candidate):
        return float(np.linalg.norm(candidate(x) - teacher) / np.linalg.norm(teacher))

    students = {share: micik_tf.compress(model, ratio=5, unique="sparse", sparse_share=share,
                                         objective="log_energy", calibration_data=x, verbose=0)
                for share in (0, 1, None)}
    # Nonzeros fill the budget to the parameter; ranks alone come in steps.
    for share, student in students.items():
        assert 4.9 < micik_tf.report(student).ratio <= (5.01 if share != 0 else 5.5)
    rep = micik_tf.report(students[None])
    assert any(layer["sparse"] and layer["rank_common"] + layer["rank_unique"]
               for layer in rep.layers), "a mix of ranks and nonzeros was expected"
    assert all(layer["nonzeros"] >= 0 for layer in rep.layers)
    # The allocator's objective is no worse; the outputs agree with it here.
    assert output_error(students[None]) <= 1.02 * min(output_error(students[0]),
                                                      output_error(students[1]))
    assert "nonzeros" in str(rep)


def test_min_rank_0_lets_groups_keep_only_their_sparse_part_where_ranks_do_not_fit():
    model, x = _cnn(), _x()
    options = dict(ratio=10, mode="common_only", unique="sparse", sparse_share=0.75,
                   calibration_data=x, verbose=0)
    with pytest.raises(ValueError, match="too little for their minimum ranks"):
        micik_tf.compress(model, min_rank=1, **options)
    student = micik_tf.compress(model, min_rank=0, **options)
    ranks = {name: layer.rank for name, layer in _wrappers(student).items()}
    assert 0 in ranks.values() and max(ranks.values()) > 0, ranks
    assert 9.9 < micik_tf.report(student).ratio <= 10.01
    # A layer of rank 0 is its sparse part alone; the recovery prunes it as
    # it prunes the others.
    assert sparse.fill_residuals(student, model) == len(ranks)
    np.testing.assert_allclose(student(x), model(x), rtol=1e-4, atol=1e-4)


def test_lamp_gains_are_a_monotone_map_of_lamp_scores():
    rng = np.random.default_rng(0)
    w = rng.normal(size=200)
    scores = np.sort(np.square(w))[::-1]
    gains = sparse.marginal_gains(scores, float(np.sum(scores)), 0.0, "log_energy")
    lamp = np.asarray(pruning.lamp_scores(w.astype("float32")))
    # Sorted by magnitude, LAMP scores and the gains fall together.
    order = np.argsort(-np.abs(w), kind="stable")
    assert np.all(np.diff(gains) <= 0) and np.all(np.diff(lamp[order]) <= 1e-12)
    np.testing.assert_allclose(-np.log1p(-np.minimum(lamp[order], 1 - 1e-16))[1:], gains[1:],
                               rtol=1e-6)
    assert np.isinf(gains[0])
    assert sparse.allocate_nonzeros({"a": gains, "b": gains[:5]}, 7) == {"a": 6, "b": 1} or \
        sum(sparse.allocate_nonzeros({"a": gains, "b": gains[:5]}, 7).values()) == 7


def test_keras_round_trip_keeps_masks_and_sharing(tmp_path):
    model = _cnn()
    x = _x()
    student = micik_tf.compress(model, ratio=3, unique="sparse", sparse_share=0.5,
                                calibration_data=x, verbose=0)
    bases = [layer for layer in student.layers if isinstance(layer, SharedBasis)]
    assert bases, "the convolutions were expected to share a basis"
    path = tmp_path / "student.keras"
    student.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), student(x), rtol=1e-6, atol=1e-6)
    for name, mask in _masks(student).items():
        np.testing.assert_array_equal(_masks(loaded)[name], mask)
    assert loaded.count_params() == student.count_params()
    assert micik_tf.report(loaded).params_after == micik_tf.report(student).params_after
    assert len([l for l in loaded.layers if isinstance(l, SharedBasis)]) == len(bases)


def test_exports_match_keras_and_gzip_sees_the_zeros(tmp_path):
    model = _cnn()
    x = _x()
    pruned = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=1, verbose=0)
    results = micik_tf.export(pruned, tmp_path / "sparse", formats=["saved_model", "tflite"],
                              check_data=x)
    assert results["saved_model"]["relative_error"] < 1e-5
    assert results["tflite"]["relative_error"] < 1e-4
    mixed = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0.5,
                              calibration_data=x, verbose=0)
    checked = micik_tf.export(mixed, tmp_path / "mixed", formats=["tflite"], check_data=x)
    assert checked["tflite"]["relative_error"] < 1e-4
    # Stored dense with zeros: a quarter of the parameters, far fewer bytes
    # once gzip'd than raw.
    dense = micik_tf.export(model, tmp_path / "dense", formats=["tflite"], check_data=x)
    assert results["tflite"]["bytes"] >= 0.9 * dense["tflite"]["bytes"]
    assert results["tflite"]["gzip_bytes"] < 0.6 * dense["tflite"]["gzip_bytes"]


def test_fit_with_the_distiller_keeps_the_masks():
    model = _cnn()
    x, y = _x(), np.random.default_rng(2).integers(0, 5, 64)
    student = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0.5, verbose=0)
    masks = _masks(student)
    before = {n: np.asarray(w.sparse_kernel).copy() for n, w in _wrappers(student).items()
              if w.sparse}
    distiller = micik_tf.Distiller(model, student)
    distiller.compile(keras.optimizers.Adam(1e-2))
    distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for name, mask in _masks(student).items():
        np.testing.assert_array_equal(mask, masks[name])
        after = np.asarray(_wrappers(student)[name].sparse_kernel)
        assert not np.array_equal(after, before[name]), "the kept entries should train"


def test_the_recovery_job_keeps_the_masks(tmp_path, teacher_file):
    from micik_tf import files, job

    config = job.RunConfig(model_dir=str(tmp_path / "run"), teacher=teacher_file, ratio=3,
                           unique="sparse", sparse_share=0.5, sequential=True, epochs=1,
                           batch_size=32, steps_per_epoch=4, calibration_batches=2, verbose=0,
                           export=("keras",), evaluate_teacher=False)
    report = job.run(config)
    start = files.load_model(str(tmp_path / "run" / "student_init.keras"))
    end = files.load_model(report["exports"]["keras"]["path"])
    assert _masks(start) and set(_masks(start)) == set(_masks(end))
    for name, mask in _masks(start).items():
        np.testing.assert_array_equal(_masks(end)[name], mask)
    moved = [name for name in _masks(start) if not np.array_equal(
        np.asarray(_wrappers(start)[name].sparse_kernel),
        np.asarray(_wrappers(end)[name].sparse_kernel))]
    assert moved, "the kept entries should train"
    assert abs(report["ratio"] - 3) < 0.1


@pytest.mark.parametrize("sequential", [False, True])
def test_inputs_that_are_always_zero_get_no_nonzeros(sequential):
    """The gains are measured in the covariance without its damping: an input
    channel that is always zero changes no output, whatever its weights."""
    model = _cnn()
    data = _x()
    data[..., 0] = 0.0
    # Large weights there: damped, the dead channel's entries would win.
    kernel = np.asarray(model.get_layer("c1").kernel).copy()
    kernel[:, :, 0, :] *= 100.0
    model.get_layer("c1").kernel.assign(kernel)
    student = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0.5,
                                calibration_data=data, sequential=sequential, verbose=0)
    assert sum(layer.nonzeros() for layer in _wrappers(student).values())
    kernel = np.asarray(_wrappers(student)["c1"].sparse_kernel).reshape(3, 3, 3, 12)
    assert not np.count_nonzero(kernel[:, :, 0, :])


def test_filled_residuals_give_back_the_original_and_prune_back_to_the_budget():
    model = _cnn()
    x = _x(8)
    student = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0.5,
                                calibration_data=_x(), verbose=0)
    budget = {name: layer.nonzeros() for name, layer in _wrappers(student).items()}
    assert sum(budget.values()) and max(abs(np.asarray(student(x) - model(x))).ravel()) > 1e-3
    pruner = pruning.from_residuals(student, total_steps=100)
    assert sparse.fill_residuals(student, model) == len(budget)
    np.testing.assert_allclose(student(x), model(x), rtol=1e-4, atol=1e-4)
    assert micik_tf.report(student).params_after > micik_tf.report(model).params_before / 4
    # The schedule ends at as many nonzeros as the budget gave, spread by
    # LAMP scores (not necessarily as compress() spread them).
    pruner.prune_to(pruner.final_sparsity)
    assert sum(layer.nonzeros() for layer in _wrappers(student).values()) == sum(budget.values())
    assert abs(micik_tf.report(student).ratio - 4) < 0.05


def test_filled_residuals_of_attention_projections():
    """EinsumDense kernels inside MultiHeadAttention: the matrix of a kernel
    is its contracted axes against the rest, in and out."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 16))
    x = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    tokens = np.random.default_rng(0).normal(size=(4, 6, 16)).astype("float32")
    student = micik_tf.compress(model, ratio=3, unique="sparse", sparse_share=0.5, verbose=0)
    sparse.fill_residuals(student, model)
    np.testing.assert_allclose(student(tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_filling_needs_a_sparse_student_and_its_original():
    model = _cnn()
    with pytest.raises(ValueError, match="no sparse unique part"):
        sparse.fill_residuals(micik_tf.compress(model, ratio=4, verbose=0), model)
    student = micik_tf.compress(model, ratio=4, unique="sparse", sparse_share=0.5, verbose=0)
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(12, 1, name="c1")(inputs))
    with pytest.raises(ValueError, match="Layer 'c1' has no kernel of shape"):
        sparse.fill_residuals(student, other)


def test_the_recovery_job_prunes_filled_residuals_back_to_the_budget(tmp_path, teacher_file):
    from micik_tf import files, job

    config = job.RunConfig(model_dir=str(tmp_path / "run"), teacher=teacher_file, ratio=3,
                           unique="sparse", sparse_share=0.5, sparse_masks="gradual", epochs=2,
                           batch_size=32, steps_per_epoch=10, calibration_batches=2, verbose=0,
                           export=("keras",), evaluate_teacher=False)
    report = job.run(config)
    start = files.load_model(str(tmp_path / "run" / "student_init.keras"))
    end = files.load_model(report["exports"]["keras"]["path"])
    budget = sum(layer.nonzeros() for layer in _wrappers(start).values())
    assert sum(layer.nonzeros() for layer in _wrappers(end).values()) <= budget
    # The masks moved: chosen again from the trained residuals.
    assert any(not np.array_equal(mask, _masks(end)[name]) for name, mask in _masks(start).items())
    assert abs(report["ratio"] - 3) < 0.1
    # The best epoch is one at the final sparsity (here the last).
    assert report["history"][-1]["best_eligible"] and not report["history"][0]["best_eligible"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unique="dense"), "`unique`"),
        (dict(unique="sparse", sparse_share=1.5), "`sparse_share`"),
        (dict(sparse_share=0.5), "needs unique='sparse'|only unique='sparse'"),
        (dict(unique="sparse", ranks={"c1": (0, 0)}), "give `ratio` too"),
        (dict(ranks={"c1": (0, 0)}), "needs unique='sparse'"),
        (dict(unique="sparse", ratio=30, ranks={"c1": (0, 12), "c2": (0, 12)}),
         "`ranks` alone take"),
        (dict(unique="sparse", ratio=6, sparse_share=0.99, min_rank=4),
         "sparse_share=0.99 leaves the low-rank parts 1% of the budget"),
        (dict(min_rank=0), "min_rank=0 lets a layer keep no low-rank part"),
        (dict(unique="sparse", min_rank=-1), "`min_rank`"),
    ],
)
def test_bad_input_gets_one_line(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message) as error:
        micik_tf.compress(_cnn(), verbose=0, **kwargs)
    assert "\n" not in str(error.value)

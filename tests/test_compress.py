import json
import os

import numpy as np
import pytest

import keras

import micik_tf
from micik_tf.compression.report import LEFT_WHOLE
from micik_tf.layers import FactorizedConv2D, SharedBasis
from tests.models import branchy_cnn, images, vgg_like, weights_of


def _kernel_norms(model):
    return {
        layer.name: float(np.sum(np.square(np.array(layer.kernel))))
        for layer in model.layers
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    }


def overall_error(original, compressed):
    """sqrt(sum ||W - W_hat||^2 / sum ||W||^2) over all Dense/Conv2D layers."""
    norms = _kernel_norms(original)
    rep = micik_tf.report(compressed, reference=original)
    lost = sum(l["relative_error"] ** 2 * norms[l["name"]] for l in rep.layers)
    return float(np.sqrt(lost / sum(norms.values())))


# --- exactness and allocation -------------------------------------------------


def test_full_rank_is_exact():
    model = branchy_cnn()
    x = images()
    ranks = {
        "c1": (0, 16),  # m=27, n=16: full unique rank
        "c2": (32, 0),  # c2, c3 share a 144 x 32 basis spanning both kernels
        "c3": (32, 0),
        "c4": (0, 16),
        "c5": (0, 16),
        "d1": (0, 32),
        "logits": (0, 10),
    }
    compressed = micik_tf.compress(model, ranks=ranks, verbose=0)
    np.testing.assert_allclose(
        compressed.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )
    rep = micik_tf.report(compressed, reference=model)
    assert max(l["relative_error"] for l in rep.layers) < 1e-5
    assert [g["members"] for g in rep.groups] == [["c2", "c3"]]


@pytest.mark.parametrize("mode", ["micik", "per_layer"])
def test_ratio_reached_within_two_percent_and_counted_honestly(mode):
    model = vgg_like()
    for ratio in (2.0, 4.0, 8.0, 12.0):
        compressed = micik_tf.compress(model, ratio=ratio, mode=mode, verbose=0)
        rep = micik_tf.report(compressed)
        assert rep.params_before == model.count_params()
        assert rep.params_after == compressed.count_params()
        # Count by hand: every distinct variable once, biases included.
        distinct = {id(v): int(np.prod(v.shape)) for v in compressed.weights}
        assert rep.params_after == sum(distinct.values())
        assert abs(rep.ratio / ratio - 1) <= 0.02, (ratio, rep.ratio)


def test_common_only_may_keep_a_group_dense():
    """The shared-parts-only ablation at a budget where some groups are best
    left dense (it used to fail with "no feasible choice")."""
    model = vgg_like()
    for ratio in (1.5, 4.0):
        compressed = micik_tf.compress(model, ratio=ratio, mode="common_only", min_rank=1, verbose=0)
        rep = micik_tf.report(compressed)
        assert rep.ratio >= ratio * 0.98
        assert all(l["rank_unique"] == 0 for l in rep.layers)


def test_error_never_increases_as_ratio_shrinks():
    model = vgg_like()
    errors = [
        overall_error(model, micik_tf.compress(model, ratio=r, verbose=0))
        for r in (12.0, 8.0, 4.0, 2.0, 1.5)
    ]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def _shared_structure_model(seed=0):
    """Three conv layers whose kernels live in one 12-dim column space, plus
    a little noise: the case a shared basis is made for."""
    model = vgg_like(widths=(32, 32, 32, 32), dense=32)
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((9 * 32, 12)).astype("float32")
    for name in ("conv1", "conv2", "conv3"):
        layer = model.get_layer(name)
        kernel = common @ rng.standard_normal((12, 32)).astype("float32")
        kernel += 0.05 * rng.standard_normal(kernel.shape).astype("float32")
        layer.kernel.assign(kernel.reshape(layer.kernel.shape) / 10)
    return model


def test_sharing_pays_where_structure_is_shared():
    model = _shared_structure_model()
    micik = micik_tf.compress(model, ratio=4.0, verbose=0)
    per_layer = micik_tf.compress(model, ratio=4.0, mode="per_layer", verbose=0)
    rep = micik_tf.report(micik)
    shared = [g for g in rep.groups if set(g["members"]) >= {"conv1", "conv2", "conv3"}]
    assert shared and shared[0]["rank_common"] >= 8
    assert micik_tf.report(per_layer).groups == []
    # Equal parameter counts (within 2%), lower error.
    assert abs(micik.count_params() / per_layer.count_params() - 1) < 0.02
    assert overall_error(model, micik) < overall_error(model, per_layer)


def test_no_sharing_where_it_does_not_pay():
    # Random kernels have unrelated column spaces: a basis costs more than
    # it saves, so the allocator must answer r_c = 0.
    model = vgg_like()
    rep = micik_tf.report(micik_tf.compress(model, ratio=4.0, share="input", verbose=0))
    assert rep.groups == []
    assert all(l["rank_common"] == 0 for l in rep.layers)


def test_default_ratio_is_documented_value():
    rep = micik_tf.report(micik_tf.compress(vgg_like(), verbose=0))
    assert abs(rep.ratio / micik_tf.DEFAULT_RATIO - 1) <= 0.02


def _linear_model():
    inputs = keras.Input((24,))
    h = keras.layers.Dense(24, name="mix")(inputs)
    outputs = keras.layers.Dense(16, name="target")(h)
    return keras.Model(inputs, outputs)


def _anisotropic(n, seed):
    # Inputs that live mostly in 4 directions: what real activations look like.
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((4, 24))
    return (rng.standard_normal((n, 4)) @ mixing + 0.01 * rng.standard_normal((n, 24))).astype("float32")


def test_data_aware_init_lowers_output_error():
    model = _linear_model()
    calibration, held_out = _anisotropic(256, 1), _anisotropic(256, 2)
    feature = keras.Model(model.inputs, model.get_layer("target").output)
    reference = feature.predict(held_out, verbose=0)
    errors = {}
    for name, data in (("weights", None), ("data", calibration)):
        compressed = micik_tf.compress(
            model, ranks={"target": (0, 3)}, calibration_data=data, verbose=0
        )
        out = keras.Model(compressed.inputs, compressed.get_layer("target").output)
        errors[name] = np.linalg.norm(out.predict(held_out, verbose=0) - reference)
    assert errors["data"] < 0.5 * errors["weights"], errors


def test_calibration_accepts_datasets_and_recalibrates_batchnorm():
    import tensorflow as tf

    model = branchy_cnn()
    x = images(64)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(16)
    compressed = micik_tf.compress(model, ratio=2.0, calibration_data=ds, verbose=0)
    bn_new = compressed.get_layer("bn")
    bn_old = model.get_layer("bn")
    # The teacher's statistics (fresh: 0 and 1) were re-estimated on the data.
    assert not np.allclose(np.array(bn_new.moving_mean), np.array(bn_old.moving_mean))
    assert np.isfinite(compressed.predict(x, verbose=0)).all()


# --- the input model is never modified -----------------------------------------


def test_input_model_untouched_on_success_and_failure():
    model = branchy_cnn()
    x = images()
    before_weights = weights_of(model)
    before_config = json.dumps(model.get_config(), sort_keys=True, default=str)
    before_out = model.predict(x, verbose=0)
    before_layers = list(model.layers)
    micik_tf.compress(model, ratio=3.0, calibration_data=x, verbose=0)
    with pytest.raises(ValueError):
        micik_tf.compress(model, ratio=0.5, verbose=0)
    with pytest.raises(ValueError):
        micik_tf.compress(model, groups=[["c1", "d1"]], verbose=0)
    assert list(model.layers) == before_layers
    assert json.dumps(model.get_config(), sort_keys=True, default=str) == before_config
    for a, b in zip(before_weights, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before_out)
    # The original graph has no new call sites.
    assert model.get_layer("c2").output is model.get_layer("c2").output


# --- model kinds ------------------------------------------------------------------


def _nested_model():
    block = keras.Sequential(
        [keras.Input((8, 8, 4)),
         keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="inner1"),
         keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="inner2")],
        name="block",
    )
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", name="outer")(inputs)
    x = keras.layers.Conv2D(4, 1, name="squeeze")(x)
    x = block(x)
    head_in = keras.Input((8,))
    head = keras.Model(head_in, keras.layers.Dense(5, name="head_dense")(head_in), name="head")
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, head(x), name="nested")


def _shared_layer_model():
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(6, activation="tanh", name="shared_dense")
    x = dense(dense(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize(
    "build, ratio",
    [(vgg_like, 4.0), (branchy_cnn, 2.0), (_nested_model, 1.5), (_shared_layer_model, 1.3)],
    ids=["sequential", "functional_branches", "nested", "shared_layer"],
)
def test_model_kinds_compress_and_run(build, ratio, tmp_path):
    model = build()
    x = np.random.default_rng(0).random((4,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    compressed = micik_tf.compress(model, ratio=ratio, verbose=0)
    y = compressed.predict(x, verbose=0)
    assert y.shape == model.predict(x, verbose=0).shape
    assert micik_tf.report(compressed).ratio > 1
    path = tmp_path / "m.keras"
    compressed.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0), y, rtol=1e-5, atol=1e-6)


def test_nested_model_exact_at_full_rank_and_names_paths():
    model = _nested_model()
    x = np.random.default_rng(0).random((2, 8, 8, 4)).astype("float32")
    compressed = micik_tf.compress(
        model, ranks={"block/inner1": (0, 8), "inner2": (0, 8), "head/head_dense": (0, 5)}, verbose=0
    )
    np.testing.assert_allclose(compressed.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    names = {l["name"] for l in micik_tf.report(compressed).layers}
    assert names == {"block/inner1", "block/inner2", "head/head_dense"}
    assert isinstance(compressed.get_layer("block").get_layer("inner1"), FactorizedConv2D)


def test_subclassed_model_that_cannot_be_copied_gets_one_line():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed model 'net' through get_config") as error:
        micik_tf.compress(net, ratio=2.0, verbose=0)
    assert "\n" not in str(error.value)


# --- serialization, summary, mixed precision, progress --------------------------


def test_keras_round_trip_keeps_the_basis_shared(tmp_path):
    model = _shared_structure_model()
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
    compressed = micik_tf.compress(model, ratio=4.0, verbose=0)
    path = tmp_path / "student.keras"
    compressed.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), compressed.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert loaded.count_params() == compressed.count_params()
    bases = [l for l in loaded.layers if isinstance(l, SharedBasis)]
    assert len(bases) == 1
    basis = bases[0]
    members = [l for l in loaded.layers if isinstance(l, FactorizedConv2D) and l.group == basis.name]
    assert len(members) >= 3
    # One variable: in the model's weights once, and changing it changes
    # every member's output.
    assert sum(w is basis.basis for w in loaded.weights) == 1
    features = keras.Model(loaded.inputs, [m.output for m in members])
    before = features.predict(x, verbose=0)
    basis.basis.assign(np.array(basis.basis) * 2)
    after = features.predict(x, verbose=0)
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_summary_shows_the_sharing():
    compressed = micik_tf.compress(_shared_structure_model(), ratio=4.0, verbose=0)
    lines = []
    compressed.summary(print_fn=lambda line, **kw: lines.append(line))
    text = "\n".join(lines)
    assert "SharedBasis" in text and "FactorizedConv2D" in text
    basis = next(l for l in compressed.layers if isinstance(l, SharedBasis))
    assert basis.name[:15] in text
    assert "stored once" in str(micik_tf.report(compressed))


def test_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    model = vgg_like()
    compressed = micik_tf.compress(model, ratio=4.0, verbose=0)
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    y = compressed(x)
    assert y.dtype == "float16"
    assert all(w.dtype == "float32" for w in compressed.weights)
    assert np.isfinite(np.array(y, dtype="float32")).all()


def test_progress_lines_and_silence(capsys):
    model = vgg_like()
    micik_tf.compress(model, ratio=4.0, verbose=1)
    out = capsys.readouterr().out
    assert "[micik] group" in out and "parameters" in out
    micik_tf.compress(model, ratio=4.0, verbose=0)
    assert capsys.readouterr().out == ""


def test_report_to_dict_is_json_safe_and_complete():
    compressed = micik_tf.compress(_shared_structure_model(), ratio=4.0, verbose=0)
    data = micik_tf.report(compressed).to_dict()
    json.dumps(data)
    assert {"params_before", "params_after", "ratio", "groups", "layers", "untouched"} <= set(data)
    group = data["groups"][0]
    assert {"name", "members", "rank_common", "basis_shape"} <= set(group)
    layer = data["layers"][0]
    assert {"name", "group", "rank_common", "rank_unique", "relative_error"} <= set(layer)


# --- groups, exclude and bad input ------------------------------------------------


def test_groups_and_exclude(tmp_path, capsys):
    model = branchy_cnn()
    compressed = micik_tf.compress(
        model, ranks={"c2": (4, 2), "c3": (4, 2), "c5": (4, 1)},
        groups=[["c2", "c3", "c5"]], exclude=["logits"], verbose=0,
    )
    rep = micik_tf.report(compressed)
    assert [sorted(g["members"]) for g in rep.groups] == [["c2", "c3", "c5"]]
    assert isinstance(compressed.get_layer("logits"), keras.layers.Dense)
    compressed = micik_tf.compress(model, ratio=2.0, exclude=["logits"], verbose=1)
    # The progress log names the specific cause; the report reads what the
    # model records, which is the same before and after saving.
    assert "logits (excluded by the user (`exclude`))" in capsys.readouterr().out
    rep = micik_tf.report(compressed)
    assert {"name": "logits", "reason": LEFT_WHOLE} in rep.untouched
    assert any(u["name"] == "bn" and "BatchNormalization" in u["reason"] for u in rep.untouched)
    compressed.save(tmp_path / "c.keras")
    reloaded = micik_tf.report(keras.models.load_model(tmp_path / "c.keras"))
    assert reloaded.untouched == rep.untouched


def test_unreachable_ratio_names_the_largest_reachable():
    model = branchy_cnn()
    exclude = ["c1", "c2", "c3", "c4", "d1"]
    with pytest.raises(ValueError, match=r"largest reachable ratio is ([0-9.]+)") as info:
        micik_tf.compress(model, ratio=50.0, exclude=exclude, verbose=0)
    reachable = float(info.value.args[0].split("largest reachable ratio is ")[1].split(".")[0] + "." + info.value.args[0].split("largest reachable ratio is ")[1].split(".")[1][:2])
    rep = micik_tf.report(micik_tf.compress(model, ratio=reachable, exclude=exclude, verbose=0))
    assert rep.ratio >= reachable * 0.98


class _FakeTfKerasModel:
    pass


_FakeTfKerasModel.__module__ = "tf_keras.src.engine.training"


def _unbuilt():
    return keras.Sequential([keras.layers.Dense(3)])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: micik_tf.compress("model"), TypeError, "takes a keras.Model"),
        (lambda m: micik_tf.compress(_FakeTfKerasModel()), TypeError, "tf_keras(?!.*interop)"),
        (lambda m: micik_tf.compress(_unbuilt()), ValueError, "not built"),
        (lambda m: micik_tf.compress(m, ratio=1.0), ValueError, "`ratio`, expected a finite number > 1"),
        (lambda m: micik_tf.compress(m, ratio=-3), ValueError, "`ratio`"),
        (lambda m: micik_tf.compress(m, ratio=float("nan")), ValueError, "`ratio`"),
        (lambda m: micik_tf.compress(m, ratio="8"), TypeError, "`ratio` must be a number"),
        (lambda m: micik_tf.compress(m, ratio=True), TypeError, "`ratio`"),
        (lambda m: micik_tf.compress(m, exclude=["cc1"]), ValueError, r"Unknown layer names in `exclude`: 'cc1' \(did you mean"),
        (lambda m: micik_tf.compress(m, exclude="c1"), TypeError, "list of layer names"),
        (lambda m: micik_tf.compress(m, groups=[["c1", "nope"]]), ValueError, "Unknown layer names in `groups`"),
        (lambda m: micik_tf.compress(m, groups=[["bn", "c1"]]), ValueError, "Only Dense, EinsumDense, Conv1D and Conv2D"),
        (lambda m: micik_tf.compress(m, groups=[["c1", "c2"]]), ValueError, "C_in=3.*C_in=16"),
        (lambda m: micik_tf.compress(m, groups=[["c2", "c3"]], mode="per_layer"), ValueError, "per_layer"),
        (lambda m: micik_tf.compress(m, mode="svd"), ValueError, "`mode`"),
        (lambda m: micik_tf.compress(m, ratio=2, ranks={"c1": (0, 2)}), ValueError, "not both"),
        (lambda m: micik_tf.compress(m, ranks={"c2": (3, 1), "c3": (2, 1)}), ValueError, "must agree"),
        (lambda m: micik_tf.compress(m, exclude=["c1", "c2", "c3", "c4", "c5", "d1", "logits"]), ValueError, "No layer is left"),
        (lambda m: micik_tf.compress(keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization()])), ValueError, "no compressible layers"),
        (lambda m: micik_tf.compress(m, calibration_data="data"), TypeError, "calibration_data"),
    ],
)
def test_bad_input_is_explained(call, error, message):
    model = branchy_cnn()
    with pytest.raises(error, match=message):
        call(model)


def test_a_model_saved_before_the_layout_change_still_loads():
    """tests/data/legacy_compressed.keras was saved by micik_tf when the layers
    lived in a flat package; it must load with no custom_objects, compute the
    same outputs, and keep its basis shared."""
    data = os.path.join(os.path.dirname(__file__), "data")
    saved = np.load(os.path.join(data, "legacy_compressed_io.npz"))
    model = keras.models.load_model(os.path.join(data, "legacy_compressed.keras"))
    np.testing.assert_allclose(np.asarray(model(saved["x"])), saved["y"], rtol=1e-5, atol=1e-6)
    assert model.count_params() == int(saved["params"])
    bases = [l for l in model.layers if isinstance(l, SharedBasis)]
    assert len(bases) == 1
    rep = micik_tf.report(model)
    assert sorted(rep.groups[0]["members"]) == ["c2", "c3"]


# --- calibration in bounded memory -------------------------------------------------


@pytest.mark.parametrize("padding, strides, dilation", [("same", 1, 1), ("valid", 2, 1),
                                                          ("same", 2, 1), ("same", 1, 2)])
def test_sampled_calibration_rows_are_the_layer_patches(padding, strides, dilation):
    """Rows are cut only at sampled positions; each is a row of the full patch
    matrix that `x W` would multiply."""
    from micik_tf.compression import calibration
    from micik_tf.compression.grouping import find_sites

    inputs = keras.Input((9, 9, 3))
    outputs = keras.layers.Conv2D(4, 3, strides=strides, dilation_rate=dilation,
                                  padding=padding, name="c")(inputs)
    site = find_sites(keras.Model(inputs, outputs))[0][0]
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype("float32")
    full = keras.ops.convert_to_numpy(keras.ops.image.extract_patches(
        x, size=(3, 3), strides=(strides, strides), dilation_rate=(dilation, dilation),
        padding=padding))
    per_image = full.shape[1] * full.shape[2]
    rows = calibration.sampled_rows(site, x, 5, np.random.default_rng(1))
    assert rows.shape == (2 * min(5, per_image), 27)
    for i, row in enumerate(rows):
        candidates = full[i // min(5, per_image)].reshape(-1, 27)
        assert np.min(np.max(np.abs(candidates - row), axis=1)) < 1e-6


def test_calibration_refuses_nan_inputs_in_one_line():
    model = branchy_cnn()
    bad = images(8)
    bad[3, 2, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"calibration_data` holds NaN or infinite values"):
        micik_tf.compress(model, ratio=2.0, calibration_data=bad, verbose=0)


def test_wide_layers_fall_back_to_a_diagonal_covariance_and_the_report_says_so(monkeypatch):
    from micik_tf.compression import calibration

    model = branchy_cnn()
    monkeypatch.setattr(calibration, "FULL_COVARIANCE_MAX", 60)  # d1 (m = 32) keeps full
    compressed = micik_tf.compress(model, ratio=2.0, calibration_data=images(16), verbose=0)
    initialization = {l["name"]: l["initialization"] for l in micik_tf.report(compressed).layers}
    assert initialization["d1"] == "outputs"
    assert {initialization[n] for n in initialization if n.startswith("c")} <= {"outputs_diagonal"}
    assert micik_tf.report(micik_tf.compress(model, ratio=2.0, verbose=0)).layers[0][
        "initialization"] == "weights"


def test_timings_name_every_step():
    timings = {}
    micik_tf.compress(branchy_cnn(), ratio=2.0, calibration_data=images(8), verbose=0,
                      timings=timings)
    assert {"calibration", "per_layer_spectra", "common_ranks", "allocation",
            "building"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())


def test_calibration_pairs_are_tuples_and_lists_are_data():
    from micik_tf.compression import calibration

    x, y = np.ones((5, 4, 4, 1), np.float32), np.zeros((5,), np.int64)
    (batch,) = list(calibration.as_batches((x, y), max_batches=4, batch_size=8))
    assert batch.shape == (5, 4, 4, 1)
    # Two examples in a list are two examples, not an (x, y) pair.
    (batch,) = list(calibration.as_batches([x[0], x[1]], max_batches=4, batch_size=8))
    assert batch.shape == (2, 4, 4, 1)

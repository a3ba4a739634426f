"""Each benchmark suite runs end to end in --smoke mode, so the code can't rot."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *args,
         f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT),
    )


def _smoke(suite, tmp_path, *args, png=None):
    result = _run(tmp_path, f"--suite={suite}", "--smoke", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / f"{suite}.json") as f:
        data = json.load(f)
    assert data["smoke"] is True
    assert (tmp_path / f"{suite}.md").read_text().startswith(f"# {suite} (smoke)")
    assert (tmp_path / (png or f"{suite}.png")).stat().st_size > 10_000
    assert data["command"].startswith(f"python tools/benchmark.py --suite={suite}")
    return data


@pytest.mark.slow  # four minutes; also `make benchmark-smoke` (kept out to hold CI under 10)
def test_curve_quick_smoke(tmp_path):
    """The --quick protocol end to end (on digits, tiny, two worker processes):
    every core method at the same stored-parameter budget, tfmot in its own
    process, the plots."""
    data = _smoke("curve", tmp_path, "--quick", "--workers=2")
    assert data["quick"] is True
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"micik", "micik_sparse", "per_layer", "pruning", "channels", "tfmot",
                         "thin", "thin_teacher_budget"}
    for method, row in rows.items():
        assert row.get("error") is None, (method, row.get("error"))
        # The same stored-parameter budget (thin: the closest width; tiny
        # smoke models round channels coarsely).
        assert abs(row["achieved_ratio"] / 4 - 1) <= (0.05 if "thin" in method else 0.02), method
        assert row["tflite_int8_gzip_bytes"] < row["tflite_int8_bytes"]
        if method != "tfmot":
            # The int8 file is scored on the whole (small) test split, as Keras is.
            assert row["tflite_int8_test_examples"] == data["teacher"]["test_examples"]
    assert rows["tfmot"]["tfmot_version"] and rows["tfmot"]["sparsity_per_kernel"] > 0
    # The teacher budget trains the thin network for the teacher's epochs.
    teacher = data["teacher"]
    assert rows["thin_teacher_budget"]["epochs"] == data["protocol"]["teacher_epochs"]
    assert len(teacher["val_accuracy"]) == teacher["epochs"]
    for name in ("curve_bytes.png", "curve_teacher.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    # In this process (each tool run pays TensorFlow's import): --progress
    # renders the recorded runs without running any (here all of them), and
    # the table is rebuilt from the JSON alone (--rerender).
    from benchmarks import curve

    partial, _ = curve.progress(curve.QUICK_SMOKE, str(tmp_path))
    assert partial["partial"] == {"runs_done": 8, "runs_planned": 8}
    assert len(partial["rows"]) == len(data["rows"])
    assert "(partial: 8 of 8 runs" in curve.markdown(dict(data, **partial), data["command"])
    assert curve.markdown(data, data["command"]) == (tmp_path / "curve.md").read_text()
    # What a phone pays for each cell, from the files the cells exported.
    axes = _smoke("deploy_axes", tmp_path, png="deploy_axes_curve.png")
    measured = axes["suites"]["curve"]["rows"]
    assert {r["method"] for r in measured} == {"teacher"} | set(rows) - {"tfmot"}
    for r in measured:
        assert 0 < r["int8_latency_2"]["median"] <= r["int8_latency_2"]["p90"]
        assert r["int8_memory_bytes"] >= 0 and r["int8_gzip_bytes"] < r["int8_bytes"]
    assert {r["files"] for r in measured} == {"exported"}
    # A cell whose run kept no files here (another session ran it) is measured
    # on its starting student's export; its bytes stay those its run recorded.
    import shutil

    shutil.rmtree(tmp_path / ".curve_work" / "exports" / "limited-micik-4")
    again = _smoke("deploy_axes", tmp_path, png="deploy_axes_curve.png")
    cell = next(r for r in again["suites"]["curve"]["rows"] if r["method"] == "micik")
    assert cell["files"] == "starting student" and cell["int8_latency_1"]["median"] > 0
    assert cell["int8_gzip_bytes"] == rows["micik"]["tflite_int8_gzip_bytes"]
    assert "1 of 7 cells were measured on the export" in (tmp_path / "deploy_axes.md").read_text()


def test_curve_runs_the_compared_methods_of_a_seed_before_its_ablations(tmp_path):
    from benchmarks import curve

    keys = curve._Suite(curve.SMOKE, str(tmp_path), print).pending("cells")
    is_ablation = [key[1] in curve.ABLATION_METHODS for key in keys]
    assert any(is_ablation) and not all(is_ablation)
    assert is_ablation == sorted(is_ablation)  # one seed: every ablation after the rest


def test_a_suite_makes_only_the_students_of_its_own_pending_runs(tmp_path):
    from benchmarks import curve, vit_mha

    # vit_mha tunes nothing: the curve's tuned methods (channels, which a
    # transformer cannot take) are not its students.
    needed = curve._Suite(vit_mha.PROTOCOL, str(tmp_path), print).needed_students()
    assert {method for _, method, _ in needed} == set(vit_mha.METHODS)
    assert len(needed) == len(vit_mha.METHODS) * 3  # ratios 2, 4, 8; one training share


def test_curve_runs_only_the_methods_asked_for_and_keeps_the_rest_pending(tmp_path):
    from benchmarks import curve

    everything = curve._Suite(curve.QUICK_SMOKE, str(tmp_path), print)
    some = curve._Suite(curve.QUICK_SMOKE, str(tmp_path), print, methods=["pruning", "thin"])
    assert {key[1] for key in some.pending("cells")} == {"pruning", "thin"}
    assert set(everything.pending("cells")) > set(some.pending("cells"))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--suite=curve",
         "--methods=pruning,nonsense", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode != 0 and "unknown method(s) nonsense" in result.stderr


def test_which_to_use_names_the_most_accurate_method_that_fits():
    from benchmarks import deploy_axes

    def row(method, ratio, accuracy, gzip, memory, latency):
        return {"regime": "limited", "method": method, "ratio": ratio, "accuracy": accuracy,
                "accuracy_std": 0.0, "int8_gzip_bytes_ratio": gzip,
                "int8_memory_bytes_ratio": memory, "int8_latency_2_ratio": latency}

    suite = {"regime": "limited", "rows": [
        row("micik_sparse", 16, 0.90, 1 / 20, 0.9, 0.9),
        row("pruning", 16, 0.91, 1 / 12, 1.0, 1.0),
        row("channels", 16, 0.85, 1 / 15, 1 / 9, 1 / 3),
        row("thin", 64, 0.80, 1 / 60, 1 / 40, 1 / 30)]}
    table = {(e["constraint"], e["target"]): e for e in deploy_axes.which_to_use(suite)}
    # Bytes at 16x: pruning is more accurate but too big; MICIK fits and leads.
    bytes16 = table[("gzip'd bytes", 16.0)]
    assert bytes16["method"] == "micik_sparse" and bytes16["micik_leads"]
    assert table[("gzip'd bytes", 8.0)]["method"] == "pruning"
    assert table[("runtime memory", 8.0)]["method"] == "channels"
    assert table[("latency (2 threads)", 2.0)]["method"] == "channels"
    assert table[("latency (2 threads)", 32.0)]["method"] is None
    assert table[("latency (2 threads)", 32.0)]["cheapest"] == "thin"
    assert "At 16x, gzip'd bytes: micik_sparse (0.9000)" in deploy_axes._leaders(suite)


def test_deploy_axes_leaves_out_a_cell_whose_file_failed_its_check(tmp_path):
    import types

    from benchmarks import deploy_axes

    failed = {"regime": "limited", "method": "micik_sparse_gradual", "ratio": 64.0, "seed": 0,
              "accuracy": 0.18, "tflite_float32_bytes": 1000, "tflite_float32_gzip_bytes": 900,
              "tflite_int8_bytes": None, "tflite_int8_gzip_bytes": None,
              "tflite_int8_error": "does not run"}
    cells, _, left_out = deploy_axes._cells(types.SimpleNamespace(work=str(tmp_path)),
                                            {"rows": [failed]}, log=lambda *_: None)
    assert cells == {} and left_out == [["limited", "micik_sparse_gradual", 64.0, "run"]]
    sentence = deploy_axes._origins({"rows": [{"files": "exported"}], "left_out": left_out})
    assert "Left out, as their runs'" in sentence
    assert "limited-micik_sparse_gradual-64." in sentence


def test_deploy_axes_leaves_out_a_cell_whose_starting_students_file_fails(tmp_path,
                                                                          monkeypatch):
    import types

    from benchmarks import deploy_axes

    def fails(*_):
        raise ValueError("Format 'tflite_int8': the converted file does not run")

    monkeypatch.setattr(deploy_axes, "_starting_model", lambda *_: str(tmp_path / "s.keras"))
    monkeypatch.setattr(deploy_axes, "_export_once", fails)
    row = {"regime": "full", "method": "micik_sparse", "ratio": 64.0, "seed": 0,
           "accuracy": 0.5, **{f"tflite_{fmt}_{kind}": 1000 for fmt in ("float32", "int8")
                               for kind in ("bytes", "gzip_bytes")}}
    lines = []
    cells, _, left_out = deploy_axes._cells(types.SimpleNamespace(work=str(tmp_path)),
                                            {"rows": [row]}, log=lines.append)
    assert cells == {} and left_out == [["full", "micik_sparse", 64.0, "starting student"]]
    assert "fails its check" in lines[-1]
    sentence = deploy_axes._origins({"rows": [{"files": "exported"}], "left_out": left_out})
    assert "their starting students' file" in sentence and "full-micik_sparse-64." in sentence


def test_curve_verdicts_count_only_margins_beyond_the_spread():
    from benchmarks import curve

    def row(method, accuracy, seed):
        return {"regime": "limited", "method": method, "ratio": 16.0, "seed": seed,
                "accuracy": accuracy, "accuracy_before_recovery": 0.1, "params": 100,
                "achieved_ratio": 16.0, "tflite_int8_gzip_bytes": 1000, "wall_seconds": 1.0}

    rows = [row("micik", 0.90, 0), row("micik", 0.92, 1), row("per_layer", 0.80, 0),
            row("per_layer", 0.82, 1), row("thin", 0.905, 0), row("thin", 0.925, 1),
            row("thin_teacher_budget", 0.95, 0), row("thin_teacher_budget", 0.95, 1),
            row("micik_no_sequential", 0.88, 0), row("micik_no_sequential", 0.88, 1)]
    summary = curve.summarize(rows)
    (verdict,) = curve.compare(summary)
    # thin is the best equal-budget baseline; 0.5 points apart is within the
    # spread (std 0.0141 each), so a tie; the teacher-budget thin wins.
    assert verdict["baseline"] == "thin" and verdict["baseline_verdict"] == "tie"
    assert verdict["thin_teacher_budget_verdict"] == "loss"
    (worth,) = curve.ablation_worth(summary)
    assert worth["part"] == "sequential calibration" and abs(worth["worth_points"] - 3.0) < 1e-9


def test_a_seed_whose_int8_file_failed_keeps_its_accuracy_in_the_cell():
    from benchmarks import curve

    rows = [{"regime": "limited", "method": "micik", "ratio": 64.0, "seed": seed,
             "accuracy": accuracy, "accuracy_before_recovery": 0.1, "params": 100,
             "achieved_ratio": 64.0, "tflite_int8_gzip_bytes": size, "wall_seconds": 1.0}
            for seed, accuracy, size in ((0, 0.5, 1000), (1, 0.7, None))]
    (cell,) = curve.summarize(rows)
    assert cell["seeds"] == 2 and abs(cell["accuracy_mean"] - 0.6) < 1e-9
    assert cell["tflite_int8_gzip_bytes"] == 1000
    rows[0]["tflite_int8_gzip_bytes"] = None
    (cell,) = curve.summarize(rows)
    assert cell["tflite_int8_gzip_bytes"] is None



@pytest.mark.slow  # also `make benchmark-smoke`
def test_cost_and_paper_smoke(tmp_path):
    cost = _smoke("cost", tmp_path, "--ratios=8")
    speedups = cost["speedups"]
    assert speedups["params_reduction"] > 7 and speedups["macs_reduction"] > 1
    # The speed-ups are the ratios of the two timings recorded beside them.
    pair = cost["pair"]
    throughput, latency = pair["train_examples_per_second"], pair["tflite_latency_seconds"]
    assert speedups["train_throughput_speedup"] == pytest.approx(
        throughput["compressed"] / throughput["original"])
    assert speedups["tflite_latency_speedup"] == pytest.approx(
        latency["original"] / latency["compressed"])
    paper = _smoke("paper", tmp_path)
    rows = {r["network"]: r for r in paper["rows"]}
    assert abs(rows["VGG-16"]["achieved_ratio"] / 16 - 1) <= 0.02
    assert abs(rows["GoogLeNet"]["achieved_ratio"] / 6 - 1) <= 0.02
    assert all("tools/train.py --flagfile=flags/imagenet_" in r["command"] for r in rows.values())


@pytest.mark.slow  # also `make benchmark-smoke`; export's checks are test_export's
def test_deploy_smoke(tmp_path):
    data = _smoke("deploy", tmp_path, "--ratios=4")
    models = {r["model"] for r in data["rows"]}
    assert models == {"teacher", "micik", "micik_pruned_ptq", "micik_pruned_qat"}
    formats = {r["format"] for r in data["rows"]}
    assert formats == {"keras", "tflite", "tflite_fp16", "tflite_int8_dynamic", "tflite_int8"}
    for row in data["rows"]:
        assert row["bytes"] > row["gzip_bytes"] > 0 and row["accuracy"] is not None
        if row["format"].startswith("tflite"):
            assert row["latency_median_us"] > 0
    teacher = {r["format"]: r for r in data["rows"] if r["model"] == "teacher"}
    assert teacher["tflite"]["latency_ratio_vs_teacher"] == 1.0
    stacked = data["stacked"]["micik_pruned_qat"]
    assert stacked["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert stacked["gzip_size_ratio"] == pytest.approx(
        teacher["tflite"]["gzip_bytes"] / stacked["gzip_bytes"])
    assert stacked["raw_size_ratio"] == pytest.approx(teacher["tflite"]["bytes"] / stacked["bytes"])


def test_scale_rerun_of_some_parts_keeps_the_others_with_their_commit(tmp_path, monkeypatch):
    from benchmarks import scale

    old = {"smoke": False, "git_commit": "aaaa111", "targets": scale.TARGETS,
           "pipeline": [{"examples": 5, "peak_rss_gb": 1.0, "examples_per_second": 3.0}],
           "compress": {"runs": []}}
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(old))
    fresh = {"compress": {"model_params": 1, "runs": [{"mode": "micik", "ratio": 4.0}]}}
    monkeypatch.setattr(scale, "run_suite", lambda smoke, parts, log: dict(fresh))
    monkeypatch.setattr(scale, "verdicts", lambda result: [])
    result = scale.rerun_parts(["compress"], str(path), "bbbb222", log=lambda *_: None)
    assert result["pipeline"] == old["pipeline"]
    assert result["compress"] == fresh["compress"]
    assert result["part_commits"] == {"pipeline": "aaaa111", "compress": "bbbb222"}
    with pytest.raises(ValueError, match="unknown"):
        scale.rerun_parts(["pipelin"], str(path), "c")


@pytest.mark.slow
@pytest.mark.parametrize("suite, arch", [("vit", "vit_tiny"), ("vit_mha", "vit_mha")])
def test_vit_smoke(tmp_path, suite, arch):
    """The ViT suites end to end, tiny: MICIK and per-layer SVD at one budget."""
    # vit_mha shares its runs between two worker processes, as the curve can.
    data = _smoke(suite, tmp_path, *(["--workers=2"] if suite == "vit_mha" else []))
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"micik", "per_layer"}
    assert all(r["accuracy"] is not None for r in data["rows"])
    assert data["teacher"]["params"] > 0 and data["protocol"]["arch"] == arch
    # The learning rates named are those of the methods the suite ran, not
    # every method of the curve it borrows them from.
    rates = re.search(r"every method \(([^;]*); not tuned", (tmp_path / f"{suite}.md").read_text())
    assert {part.split()[0] for part in rates.group(1).split(", ")} == methods


def test_vit_mha_names_its_protocols_for_worker_processes_and_shows_progress(tmp_path):
    """A worker process is started on a protocol by name, so vit_mha's
    protocols must have names; --progress reads vit_mha's own scratch folder
    (not the curve's)."""
    from benchmarks import curve, vit_mha

    named = curve._named_protocols()
    assert named["vit_mha"] is vit_mha.PROTOCOL and named["vit_mha_smoke"] is vit_mha.SMOKE
    assert len({id(p) for p in named.values()}) == len(named)  # each name finds one protocol
    with pytest.raises(ValueError, match=r"\.vit_mha_work: start the suite first"):
        vit_mha.progress(False, str(tmp_path))


def test_the_thin_transformer_skips_widths_too_narrow_to_build():
    from benchmarks import curve, vit_mha

    teacher = {"input_shape": [28, 28, 1], "num_classes": 10}
    # The narrowest widths give MultiHeadAttention a key_dim of 0.
    model = curve.thin_model(vit_mha.PROTOCOL, teacher, 136_394 / 8, search=50)
    assert abs(model.count_params() - 136_394 / 8) < 0.25 * 136_394 / 8

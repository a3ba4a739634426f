"""Each benchmark suite runs end to end in --smoke mode, so the code can't rot."""

import json
import os
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


def _smoke(suite, tmp_path, *args):
    result = _run(tmp_path, f"--suite={suite}", "--smoke", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / f"{suite}.json") as f:
        data = json.load(f)
    assert data["smoke"] is True
    assert (tmp_path / f"{suite}.md").read_text().startswith(f"# {suite} (smoke)")
    assert (tmp_path / f"{suite}.png").stat().st_size > 10_000
    assert data["command"].startswith(f"python tools/benchmark.py --suite={suite}")
    return data


def test_compress_speed_smoke(tmp_path):
    data = _smoke("compress_speed", tmp_path, "--ratios=4,8")
    assert {r["mode"] for r in data["runs"]} == {"micik", "per_layer"}
    for run in data["runs"]:
        assert abs(run["achieved_ratio"] / run["target_ratio"] - 1) <= 0.02


def test_curve_smoke_every_method_at_equal_budget(tmp_path):
    from benchmarks import curve

    data = _smoke("curve", tmp_path, "--ratios=3", "--seeds=1")
    assert 0 <= data["teacher_accuracy"] <= 1
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == set(curve.METHOD_ORDER)
    assert rows["micik_no_common"]["same_run_as"] == "per_layer_kd"
    for method in ("micik", "per_layer_kd", "per_layer_ft", "pruning", "micik_no_sim", "micik_no_kd"):
        row = rows[method]
        assert set(row) >= {"method", "ratio", "seed", "params", "accuracy_before_recovery", "accuracy"}
        # The same number of stored parameters, within the allocator's 2%.
        assert abs(row["achieved_ratio"] / 3 - 1) <= 0.02, method
    assert not (tmp_path / ".curve_work").exists()  # resumable state is removed at the end
    # The table and plot can be rebuilt from the JSON alone.
    (tmp_path / "curve.md").unlink()
    assert _run(tmp_path, "--suite=curve", "--rerender").returncode == 0
    assert (tmp_path / "curve.md").exists()


def test_cost_and_paper_smoke(tmp_path):
    cost = _smoke("cost", tmp_path, "--ratios=8")
    speedups = cost["speedups"]
    assert speedups["params_reduction"] > 7 and speedups["macs_reduction"] > 1
    assert speedups["train_throughput_speedup"] > 0 and speedups["tflite_latency_speedup"] > 0
    paper = _smoke("paper", tmp_path)
    rows = {r["network"]: r for r in paper["rows"]}
    assert abs(rows["VGG-16"]["achieved_ratio"] / 16 - 1) <= 0.02
    assert abs(rows["GoogLeNet"]["achieved_ratio"] / 6 - 1) <= 0.02
    assert all("tools/train.py --flagfile=flags/imagenet_" in r["command"] for r in rows.values())


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
    assert stacked["size_ratio_vs_teacher_float32"] == pytest.approx(
        teacher["tflite"]["bytes"] / stacked["gzip_bytes"])

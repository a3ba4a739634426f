"""Each benchmark suite runs end to end in --smoke mode, so the code can't rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("suite, ratios", [("compress_speed", "4,8"), ("recovery", "4")])
def test_suite_smoke(suite, ratios, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), f"--suite={suite}",
         "--smoke", f"--ratios={ratios}", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / f"{suite}.json") as f:
        data = json.load(f)
    assert data["smoke"] is True and data["runs"]
    for run in data["runs"]:
        assert abs(run["achieved_ratio"] / run["target_ratio"] - 1) <= 0.02
    assert (tmp_path / f"{suite}.md").read_text().startswith(f"# {suite} (smoke)")

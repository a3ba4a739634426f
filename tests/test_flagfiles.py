"""The flagfiles in flags/ parse, and the TFDS ones run on mock data."""

import glob
import importlib.util
import json
import os

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))


@pytest.fixture(scope="module")
def train_tool():
    spec = importlib.util.spec_from_file_location("micik_train_tool", os.path.join(ROOT, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if "ratio" not in flags.FLAGS:
        module.define_flags()
    return module


def _parse(argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", *argv])


@pytest.mark.parametrize("path", [p for p in FLAGFILES if "compress_speed" not in p],
                         ids=os.path.basename)
def test_flagfile_parses(path, train_tool, tmp_path):
    _parse([f"--flagfile={path}", f"--model_dir={tmp_path}"])
    assert flags.FLAGS.ratio > 1


def test_cifar10_flagfile_runs_on_mock_tfds(train_tool, tmp_path):
    import tensorflow_datasets as tfds

    _parse([
        f"--flagfile={os.path.join(ROOT, 'flags', 'cifar10_vgg16.cfg')}",
        f"--model_dir={tmp_path}", "--epochs=1", "--steps_per_epoch=2",
        "--teacher_epochs=1", "--batch_size=8", "--calibration_batches=0",
        "--ratio=4", "--verbose=0",
    ])
    with tfds.testing.mock_data(num_examples=24):
        assert train_tool.main(["train.py"]) == 0
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["dataset"].startswith("cifar10")
    assert abs(report["ratio"] / 4 - 1) <= 0.02
    assert report["steps"] == 2
    assert os.path.exists(tmp_path / "student.keras")
    assert os.path.exists(tmp_path / "training_curves.png")


@pytest.mark.parametrize("name, teacher_flags", [
    # ImageNet weights cannot be downloaded here: the architecture only.
    ("imagenet_vgg16.cfg", ["--teacher_weights=none"]),
    ("imagenet_googlenet.cfg", ["--teacher_epochs=1"]),
])
def test_paper_flagfiles_run_on_mock_tfds(name, teacher_flags, train_tool, tmp_path):
    """The paper-scale settings, a few steps on mock ImageNet at 32x32, on
    the CPU: everything but the data size, the device and the precision is
    the flagfile's own (teacher, ratio, losses, optimizer)."""
    import tensorflow_datasets as tfds

    path = os.path.join(ROOT, "flags", name)
    _parse([
        f"--flagfile={path}", f"--model_dir={tmp_path}", "--image_size=32",
        "--epochs=1", "--steps_per_epoch=2", "--batch_size=4", "--calibration_batches=0",
        "--strategy=default", "--num_gpus=0", "--nomixed_precision", "--verbose=0",
        *teacher_flags,
    ])
    ratio = flags.FLAGS.ratio
    with tfds.testing.mock_data(num_examples=8):
        assert train_tool.main(["train.py"]) == 0
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["dataset"].startswith("imagenet2012")
    assert abs(report["ratio"] / ratio - 1) <= 0.02
    assert report["steps"] == 2

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


@pytest.mark.parametrize("path", FLAGFILES,
                         ids=os.path.basename)
def test_flagfile_parses(path, train_tool, tmp_path):
    _parse([f"--flagfile={path}", f"--model_dir={tmp_path}"])
    assert flags.FLAGS.ratio > 1


@pytest.mark.slow  # the job on TFDS data is also test_data's and the ImageNet flagfile's
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


@pytest.mark.slow  # two minutes: a 138M-parameter teacher; its pipeline is checked below
@pytest.mark.parametrize("name, teacher_flags", [
    # ImageNet weights cannot be downloaded here: the architecture only. The
    # GoogLeNet flagfile is parsed and its pipeline checked above; GoogLeNet
    # itself compresses and runs in test_models (its run here took minutes).
    ("imagenet_vgg16.cfg", ["--teacher_weights=none"]),
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


def _dataset_ops(dataset):
    """`(op type, node)` of every node in a tf.data pipeline's graph."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())  # noqa: SLF001 (test only)
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return graph, nodes


def _constant(graph, name):
    import tensorflow as tf

    node = next(n for n in graph.node if n.name == name.split(":")[0].lstrip("^"))
    return int(tf.make_ndarray(node.attr["value"].tensor))


@pytest.mark.parametrize("name", ["imagenet_vgg16.cfg", "imagenet_googlenet.cfg"])
def test_imagenet_pipelines_hold_no_cache_and_a_bounded_shuffle(name, train_tool, tmp_path):
    """At ImageNet size the pipelines must neither cache the split nor shuffle
    more than --shuffle_buffer examples (the whole split would be ~770 GB)."""
    import tensorflow_datasets as tfds

    from micik_tf.job.data import load_data

    _parse([f"--flagfile={os.path.join(ROOT, 'flags', name)}", f"--model_dir={tmp_path}",
            "--image_size=32"])
    config = train_tool.config_from_flags()
    assert config.shuffle_buffer <= 2048 and config.cache == "auto"
    with tfds.testing.mock_data(num_examples=8):
        data = load_data(config)
        pipelines = [data.train_epoch(0), data.validation, data.test, data.calibration]
        assert not data.cached
        for pipeline in pipelines:
            graph, nodes = _dataset_ops(pipeline)
            ops = [n.op for n in nodes]
            assert not any(op.startswith("CacheDataset") for op in ops), ops
            for node in nodes:
                if node.op.startswith("ShuffleDataset"):
                    assert _constant(graph, node.input[1]) <= config.shuffle_buffer
        assert any(n.op.startswith("ShuffleDataset") for n in _dataset_ops(pipelines[0])[1])

"""Tests for `micik_tf.recovery.datasets` and `pipeline`: every source offline, and the pipeline's contract."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from micik_tf.recovery import datasets, pipeline

DIGITS_SIZE = 1797


def _examples(ds):
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in ds])
    return np.stack(images), np.array(labels)


def _check_examples(source, ds):
    image_spec, label_spec = ds.element_spec
    assert image_spec.dtype == tf.float32
    assert label_spec.dtype == tf.int32
    assert tuple(image_spec.shape) == source.input_shape
    images, labels = _examples(ds)
    assert images.shape[1:] == source.input_shape
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < source.num_classes
    return images, labels


# --- digits ---------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    source = datasets.load("digits", split_seed=0)
    return source, _examples(source.train), _examples(source.test)


def test_digits_shapes_range_and_classes(digits):
    source, _, _ = digits
    assert source.name == "digits"
    assert source.num_classes == 10
    assert source.input_shape == (8, 8, 1)
    train_images, train_labels = _check_examples(source, source.train)
    test_images, test_labels = _check_examples(source, source.test)
    assert train_images.max() == 1.0  # 16/16: scaled, not clipped
    assert source.train_size == len(train_labels)
    assert len(train_labels) + len(test_labels) == DIGITS_SIZE
    assert 0.2 < len(test_labels) / DIGITS_SIZE < 0.3
    assert set(train_labels) == set(test_labels) == set(range(10))


def test_digits_split_is_deterministic_per_seed(digits):
    _, _, (test_images, test_labels) = digits
    again = datasets.load("digits", split_seed=0)
    images, labels = _examples(again.test)
    np.testing.assert_array_equal(images, test_images)
    np.testing.assert_array_equal(labels, test_labels)
    other, _ = _examples(datasets.load("digits", split_seed=1).test)
    assert not np.array_equal(other, test_images)


def test_digits_image_size_resizes():
    source = datasets.load("digits", image_size=(16, 12))
    assert source.input_shape == (16, 12, 1)
    _check_examples(source, source.test.take(8))


# --- TFDS (mocked: nothing reaches the network) ----------------------------


@pytest.mark.parametrize(
    "name, image_size, input_shape",
    [
        ("mnist", None, (28, 28, 1)),
        ("tfds:mnist", 14, (14, 14, 1)),
        ("cifar10", None, (32, 32, 3)),
        ("tfds:cifar10", (16, 8), (16, 8, 3)),
    ],
)
def test_tfds_mocked(tmp_path, name, image_size, input_shape):
    with tfds.testing.mock_data(num_examples=6):
        source = datasets.load(name, data_dir=str(tmp_path), image_size=image_size)
        assert source.name == name.removeprefix("tfds:")
        assert source.num_classes == 10
        assert source.input_shape == input_shape
        _, labels = _check_examples(source, source.train)
        assert len(labels) == 6
        _check_examples(source, source.test)


def test_tfds_variable_size_images_need_image_size(tmp_path):
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="vary in size.*image_size"):
            datasets.load("imagenet2012", data_dir=str(tmp_path))
        source = datasets.load("imagenet2012", data_dir=str(tmp_path), image_size=8)
        assert source.num_classes == 1000
        assert source.input_shape == (8, 8, 3)
        _check_examples(source, source.test)


def test_tfds_not_prepared_and_not_downloadable(tmp_path, monkeypatch):
    def no_network(self, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(ValueError, match="not prepared") as error:
        datasets.load("mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert "'mnist'" in message and "tfds build" in message
    assert "Network is unreachable" in message


def test_tfds_eval_split_choice():
    assert datasets._pick_eval_split("cifar10", {"train": 1, "test": 1}) == "test"
    assert datasets._pick_eval_split("imagenette", {"train": 1, "validation": 1}) == (
        "validation"
    )
    # ImageNet's test split is unlabeled (label -1).
    splits = {"train": 1, "validation": 1, "test": 1}
    assert datasets._pick_eval_split("imagenet2012", splits) == "validation"
    with pytest.raises(ValueError, match="no 'train' split"):
        datasets._pick_eval_split("imagenet_v2", {"test": 1})


# --- image folders ---------------------------------------------------------

CLASSES = ("ant", "bee", "cat")


def _write_images(directory, classes=CLASSES, per_class=6, size=(10, 10)):
    for label, name in enumerate(classes):
        os.makedirs(directory / name, exist_ok=True)
        for i in range(per_class):
            # The red channel encodes the class, so labels can be checked
            # against pixel values after loading.
            pixels = np.full((*size, 3), 40 + 80 * label, dtype=np.uint8)
            pixels[..., 1] = 10 * i
            png = tf.io.encode_png(tf.constant(pixels))
            tf.io.write_file(str(directory / name / f"{i:03d}.png"), png)


def _check_labels_match_pixels(images, labels):
    red = images[..., 0].mean(axis=(1, 2)) * 255.0
    np.testing.assert_allclose(red, 40 + 80 * labels, atol=1.0)


def _image_ids(images, labels):
    """(class, index) of each image written by `_write_images`."""
    index = np.round(images[:, 0, 0, 1] * 255.0 / 10.0).astype(int)
    return set(zip(labels.tolist(), index.tolist()))


def test_folder_split(tmp_path):
    folder = tmp_path / "shapes"
    _write_images(folder)
    source = datasets.load(str(folder), image_size=8, test_fraction=0.25)
    assert source.name == "shapes"
    assert source.num_classes == 3
    assert source.input_shape == (8, 8, 3)
    train_images, train_labels = _check_examples(source, source.train)
    test_images, test_labels = _check_examples(source, source.test)
    assert source.train_size == len(train_labels) == 12
    # Stratified: round(0.25 * 6) = 2 test images of each class.
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]
    _check_labels_match_pixels(train_images, train_labels)
    _check_labels_match_pixels(test_images, test_labels)
    assert not _image_ids(train_images, train_labels) & _image_ids(
        test_images, test_labels
    )
    # Every pass yields the same order, and the split depends only on the seed.
    np.testing.assert_array_equal(_examples(source.train)[0], train_images)
    again = datasets.load(f"folder:{folder}", image_size=8, test_fraction=0.25)
    np.testing.assert_array_equal(_examples(again.test)[0], test_images)
    other = datasets.load(str(folder), image_size=8, test_fraction=0.25, split_seed=1)
    assert not np.array_equal(_examples(other.test)[0], test_images)


def test_folder_train_test_layout(tmp_path):
    _write_images(tmp_path / "train", per_class=4)
    _write_images(tmp_path / "test", per_class=2)
    source = datasets.load(f"folder:{tmp_path}")
    assert source.num_classes == 3
    assert source.input_shape == (32, 32, 3)  # the folder default size
    assert source.train_size == 12
    train_images, train_labels = _check_examples(source, source.train)
    test_images, test_labels = _check_examples(source, source.test)
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]
    _check_labels_match_pixels(train_images, train_labels)
    _check_labels_match_pixels(test_images, test_labels)


# --- pipeline --------------------------------------------------------------


def _numbered(n=20, size=4):
    """Examples whose image is filled with their index, to trace the order."""
    images = np.arange(n, dtype=np.float32)[:, None, None, None] / n
    images = np.broadcast_to(images, (n, size, size, 1))
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32)))


def _epoch(ds):
    return np.concatenate([labels.numpy() for _, labels in ds])


def test_pipeline_batches_and_keeps_eval_order():
    ds = pipeline.pipeline(_numbered(), batch_size=6, training=False)
    shapes = [tuple(images.shape) for images, _ in ds]
    assert shapes == [(6, 4, 4, 1)] * 3 + [(2, 4, 4, 1)]
    np.testing.assert_array_equal(_epoch(ds), np.arange(20))
    dropped = pipeline.pipeline(_numbered(), 6, training=False, drop_remainder=True)
    assert [int(labels.shape[0]) for _, labels in dropped] == [6, 6, 6]


def test_pipeline_shuffle_is_deterministic_per_seed():
    first = pipeline.pipeline(_numbered(), 5, training=True, seed=3)
    again = pipeline.pipeline(_numbered(), 5, training=True, seed=3)
    other = pipeline.pipeline(_numbered(), 5, training=True, seed=4)
    epoch_1, epoch_2 = _epoch(first), _epoch(first)
    np.testing.assert_array_equal(np.sort(epoch_1), np.arange(20))
    assert not np.array_equal(epoch_1, np.arange(20))
    assert not np.array_equal(epoch_1, epoch_2)  # reshuffled every epoch
    np.testing.assert_array_equal(_epoch(again), epoch_1)
    assert not np.array_equal(_epoch(other), epoch_1)


@pytest.mark.parametrize(
    "augment", [("flip",), ("crop",), ("shift",), ("flip", "crop")]
)
def test_pipeline_augments_training_only(augment):
    source = datasets.load("digits")
    ds = source.train.take(64)
    plain, _ = next(iter(pipeline.pipeline(ds, 64, training=False)))
    evaluated, _ = next(iter(pipeline.pipeline(ds, 64, training=False, augment=augment)))
    np.testing.assert_array_equal(evaluated.numpy(), plain.numpy())

    def trained(seed):
        return pipeline.pipeline(ds, 64, training=True, seed=seed, augment=augment)

    images, labels = next(iter(trained(0)))
    assert images.shape == (64, 8, 8, 1) and images.dtype == tf.float32
    assert images.numpy().min() >= 0.0 and images.numpy().max() <= 1.0
    again, _ = next(iter(trained(0)))
    np.testing.assert_array_equal(again.numpy(), images.numpy())
    # The same seed shuffles the same way with or without augmentation, so
    # the batches hold the same examples: only the pixels may differ.
    unaugmented, same_labels = next(iter(pipeline.pipeline(ds, 64, True, seed=0)))
    np.testing.assert_array_equal(labels.numpy(), same_labels.numpy())
    assert not np.array_equal(images.numpy(), unaugmented.numpy())


def test_pipeline_rejects_unknown_augmentation():
    with pytest.raises(ValueError, match="`augment`.*crop.*flip.*shift.*'rotate'"):
        pipeline.pipeline(_numbered(), 4, training=True, augment=("flip", "rotate"))
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.pipeline(_numbered(), 0, training=True)


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["foo", "tfds:foo_not_a_dataset"])
def test_unknown_dataset(name):
    with pytest.raises(ValueError, match="Unknown dataset") as error:
        datasets.load(name)
    message = str(error.value)
    assert name.removeprefix("tfds:") in message
    assert "digits" in message and "cifar10" in message
    assert "\n" not in message  # one line, not TFDS's list of every dataset


@pytest.mark.parametrize("prefix", ["", "folder:"])
def test_missing_folder(tmp_path, prefix):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="does not exist") as error:
        datasets.load(prefix + str(missing))
    assert str(missing) in str(error.value)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        datasets.load(str(tmp_path))
    (tmp_path / "cat").mkdir()  # a class folder, but no images in it
    with pytest.raises(ValueError, match="has no images") as error:
        datasets.load(f"folder:{tmp_path}")
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, None])
def test_folder_invalid_test_fraction(tmp_path, test_fraction):
    _write_images(tmp_path, per_class=2)
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.load(str(tmp_path), test_fraction=test_fraction)


@pytest.mark.parametrize("image_size", [0, (8,), (8, -1), "big", 2.5])
def test_invalid_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        datasets.load("digits", image_size=image_size)


# --- Fashion-MNIST: TFDS in data_dir, else IDX files, else one line ------------


def _write_idx(path, array):
    import gzip
    import struct

    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder, train=60, test=20):
    """Tiny IDX files in Fashion-MNIST's layout: 28x28 images whose first pixel
    encodes their label, 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), np.uint8)
        images[:, 0, 0] = labels * 20
        images[:, 1, :] = np.arange(count)[:, None] % 256  # distinct images
        _write_idx(folder / f"{part}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels)
    return folder


def test_fashion_mnist_from_idx_files_with_fixed_splits(tmp_path):
    folder = _fake_fashion_mnist(tmp_path / "fmnist")
    source = datasets.load("fashion_mnist", data_dir=str(folder), validation_fraction=0.2,
                           train_fraction=0.5)
    assert source.name == "fashion_mnist" and source.input_shape == (28, 28, 1)
    assert source.num_classes == 10
    train_images, train_labels = _check_examples(source, source.train)
    val_images, val_labels = _check_examples(source, source.validation)
    test_images, test_labels = _check_examples(source, source.test)
    # Stratified rounding: 0.2 of 6 per class is 1, and 30 of the 50 left.
    assert len(val_labels) == 10 and len(train_labels) == 30 == source.train_size
    assert len(test_labels) == 20
    # Labels match the images, and validation never overlaps training.
    for images, labels in ((train_images, train_labels), (val_images, val_labels)):
        np.testing.assert_array_equal(np.round(images[:, 0, 0, 0] * 255 / 20), labels)
    rows = lambda images: {tuple(np.round(i[1, :3, 0] * 255).astype(int)) for i in images}  # noqa: E731
    assert not rows(train_images) & rows(val_images)
    # Stratified: every class on both sides.
    assert set(train_labels) == set(val_labels) == set(range(10))
    # The same splits on every load: they depend on no run seed.
    again = datasets.load("fashion_mnist", data_dir=str(folder), validation_fraction=0.2,
                          train_fraction=0.5)
    np.testing.assert_array_equal(_examples(again.validation)[0], val_images)
    # The limited regime's examples are a subset of the full regime's.
    full = datasets.load("fashion_mnist", data_dir=str(folder), validation_fraction=0.2)
    full_images, _ = _examples(full.train)
    assert len(full_images) == 50 and rows(train_images) <= rows(full_images)
    np.testing.assert_array_equal(_examples(full.validation)[0], val_images)


def test_fashion_mnist_prefers_tfds_prepared_in_data_dir(tmp_path, monkeypatch):
    _fake_fashion_mnist(tmp_path)
    monkeypatch.setattr(datasets, "_tfds_prepared", lambda name, data_dir: True)
    with tfds.testing.mock_data(num_examples=7):
        source = datasets.load("fashion_mnist", data_dir=str(tmp_path))
        assert len(_examples(source.test)[1]) == 7  # TFDS's mock, not the 20 IDX images


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(ValueError) as error:
        datasets.load("fashion_mnist", data_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "tfds build fashion_mnist" in message


def test_a_corrupt_idx_file_is_named(tmp_path):
    from micik_tf.recovery import idx

    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05" * 3 + b"short")
    with pytest.raises(ValueError, match="cut short"):
        idx.read_idx(str(bad))
    bad.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.read_idx(str(bad))


def test_tfds_validation_and_train_fractions_become_percent_slices():
    from micik_tf.recovery.splits import TrainSplit

    assert TrainSplit(0.01, 1.0).percent_slices() == ("train[1%:100%]", "train[:1%]")
    assert TrainSplit(0.1, 0.1).percent_slices() == ("train[10%:20%]", "train[:10%]")
    assert TrainSplit(0.0, 1.0).percent_slices() == ("train[0%:100%]", None)
    with pytest.raises(ValueError, match="whole percents"):
        TrainSplit(0.005, 1.0).percent_slices()


def test_cache_is_decided_by_size():
    assert pipeline.should_cache(200 << 20) and not pipeline.should_cache(100 << 30)
    assert not pipeline.should_cache(None)
    assert pipeline.should_cache(100 << 30, "on") and not pipeline.should_cache(1, "off")

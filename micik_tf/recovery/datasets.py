"""Data sources: `load()` turns a dataset name into fixed, unbatched splits.

    from micik_tf.recovery import datasets, pipeline

    source = datasets.load("fashion_mnist", validation_fraction=0.1)
    train = pipeline.pipeline(source.train, 128, training=True, augment=("flip",))
    test = pipeline.pipeline(source.test, 256, training=False)

Every source yields `(image float32 in [0, 1], label int32)` examples, so the
trainer and the calibration code see them alike:

- `"digits"`: scikit-learn's bundled handwritten digits (8x8x1). It ships
  inside scikit-learn, so it is the offline default: demos and tests run with
  no network and no prepared data. A fixed, stratified quarter is the test split.
- `"fashion_mnist"`: 70,000 28x28x1 images in 10 classes, 10,000 of them the
  official test split. Read through TFDS when it is prepared in `data_dir`,
  else from the original IDX files (`FASHION_MNIST_DIRS`), which the Debian
  package `dataset-fashion-mnist` installs.
- `"tfds:<name>"` or a bare TFDS name (`"cifar10"`, `"imagenet2012"`): read
  through `tfds.load`, from `data_dir` when given.
- `"folder:<path>"` or an existing directory: image folders
  (`micik_tf.recovery.image_folders`).

The validation split is carved out of the official training split, and the
optional `train_fraction` keeps a fixed share of it (`splits.TrainSplit`);
both are functions of a split seed, never of a run's seed. TFDS sources are
sliced by TFDS itself (`train[:10%]`), which reads by file and never shuffles
a whole split in memory.

TensorFlow Datasets and scikit-learn are imported only inside the branch that
needs them: `import micik_tf` stays cheap, and a missing optional package only
breaks the one source that uses it.
"""

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

from micik_tf.errors import first_line
from micik_tf.recovery import idx, image_folders
from micik_tf.recovery.splits import SPLIT_SEED, TrainSplit, stratified_mask

DIGITS = "digits"
FASHION_MNIST = "fashion_mnist"
# The digits test split: a quarter of each class, so both splits see every
# class in its natural proportion.
DIGITS_TEST_FRACTION = 0.25
# Where the Fashion-MNIST IDX files are looked for after `data_dir`: the
# Debian package's folder, then the Keras cache (keras.datasets.fashion_mnist).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.keras/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# TFDS datasets whose "test" split has no labels (label -1): evaluate on
# "validation" instead.
_UNLABELED_TEST_SPLIT = ("imagenet2012",)
# Bytes per value of a decoded image (float32), for the size of a cache.
_DECODED_BYTES = 4


@dataclasses.dataclass
class DataSource:
    """A dataset's splits and what a model needs to know about them.

    Every split yields the same examples in the same order on every pass
    (`pipeline()` does the shuffling).

    Attributes:
        train: unbatched `(image, label)` examples, `image` float32 in
            `[0, 1]` with shape `input_shape`, `label` an int32 scalar.
        validation: held out from the official training split (None when
            `validation_fraction` is 0); never trained on.
        test: the official held-out split, only for reported accuracies.
        num_classes: the number of classes; labels are `0..num_classes - 1`.
        input_shape: the shape of one image, e.g. `(8, 8, 1)`.
        train_size: the number of training examples, or `None` if unknown
            (e.g. TFDS metadata without split sizes).
        name: a short name for logs and reports.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    num_classes: int
    input_shape: tuple
    train_size: int | None
    name: str

    def train_bytes(self):
        """What caching the decoded training split would hold in memory, or None."""
        if self.train_size is None or None in self.input_shape:
            return None
        return self.train_size * math.prod(self.input_shape) * _DECODED_BYTES


def load(dataset, data_dir=None, image_size=None, validation_fraction=0.0,
         train_fraction=1.0, test_fraction=0.2, split_seed=SPLIT_SEED):
    """Loads a dataset by name as a `DataSource` of unbatched examples.

    Args:
        dataset: `"digits"`, `"fashion_mnist"`, `"tfds:<name>"` or a bare TFDS
            name (e.g. `"cifar10"`), or `"folder:<path>"` or the path of an
            existing image folder.
        data_dir: where prepared data is read from: the TFDS data directory
            (TFDS sources), or a folder holding the Fashion-MNIST IDX files.
            `None` means TFDS's default (`~/tensorflow_datasets`).
        image_size: an int or an `(height, width)` pair to resize images to.
            `None` keeps the dataset's own size; image folders then use
            `image_folders.DEFAULT_IMAGE_SIZE`.
        validation_fraction: the share of the training split held out as
            `validation`, in [0, 1).
        train_fraction: the share of the whole training split kept for
            training, in (0, 1], taken from what validation leaves.
        test_fraction: the share of each class of an image folder held out
            as the test split, when the folder has no `train/` and `test/`
            folders.
        split_seed: the seed of every split made here (not a run's seed).

    Returns:
        A `DataSource`.

    Raises:
        ValueError: for an unknown dataset, data that is neither prepared nor
            found nor downloadable, or a missing or empty image folder. The
            message names the problem and the fix, in one line.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(
            "Received an invalid value for `dataset`, expected a non-empty "
            f"string. Received: dataset={dataset!r}"
        )
    size = _image_size_pair(image_size)
    split = TrainSplit(validation_fraction, train_fraction)
    if dataset == DIGITS:
        return _from_arrays(DIGITS, *_digits_arrays(split_seed), size, split, split_seed)
    if dataset == FASHION_MNIST:
        return _load_fashion_mnist(data_dir, size, split, split_seed)
    if dataset.startswith("tfds:"):
        return _load_tfds(dataset[len("tfds:"):], data_dir, size, split)
    if dataset.startswith("folder:"):
        return _load_folder(dataset[len("folder:"):], size, split, test_fraction, split_seed)
    if os.path.isdir(os.path.expanduser(dataset)) or _looks_like_path(dataset):
        return _load_folder(dataset, size, split, test_fraction, split_seed)
    return _load_tfds(dataset, data_dir, size, split)


# --- arrays in memory: digits and IDX files ----------------------------------


def _from_arrays(name, train_x, train_y, test_x, test_y, size, split, split_seed):
    """A `DataSource` from image arrays (uint8, or floats in [0, 1])."""
    train_mask, validation_mask = split.masks(train_y, split_seed)

    def examples(images, labels):
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
        return ds.map(lambda x, y: _to_example(x, y, size), num_parallel_calls=tf.data.AUTOTUNE)

    train = examples(train_x[train_mask], train_y[train_mask])
    return DataSource(
        train=train,
        validation=examples(train_x[validation_mask], train_y[validation_mask])
        if validation_mask.any() else None,
        test=examples(test_x, test_y),
        num_classes=int(max(train_y.max(), test_y.max())) + 1,
        input_shape=tuple(train.element_spec[0].shape),
        train_size=int(train_mask.sum()),
        name=name,
    )


def _digits_arrays(split_seed):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]  # 0..16 pixels
    labels = bunch.target.astype(np.int32)
    is_test = stratified_mask(labels, DIGITS_TEST_FRACTION, split_seed)
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]


def _load_fashion_mnist(data_dir, size, split, split_seed):
    """TFDS data prepared in `data_dir`, else the IDX files, else one line on how
    to get them."""
    if data_dir and _tfds_prepared(FASHION_MNIST, data_dir):
        return _load_tfds(FASHION_MNIST, data_dir, size, split)
    folders = ([data_dir, os.path.join(data_dir, "fashion-mnist")] if data_dir else [])
    folders += [os.path.expanduser(d) for d in FASHION_MNIST_DIRS]
    for folder in folders:
        paths = {part: [idx.find_idx(folder, stem) for stem in stems]
                 for part, stems in FASHION_MNIST_FILES.items()}
        if all(p for pair in paths.values() for p in pair):
            (train_x, train_y), (test_x, test_y) = (
                [idx.read_idx(p) for p in paths[part]] for part in ("train", "test"))
            return _from_arrays(FASHION_MNIST, train_x[..., None], train_y,
                                test_x[..., None], test_y, size, split, split_seed)
    raise ValueError(
        "Fashion-MNIST not found: looked for TFDS data in --data_dir and for its IDX "
        f"files in {', '.join(folders)}. Install them with `apt-get install "
        "dataset-fashion-mnist` (Debian), or run `tfds build fashion_mnist "
        "--data_dir=DIR` where there is network access and pass --data_dir=DIR."
    )


# --- TFDS ------------------------------------------------------------------------


def _tfds_prepared(name, data_dir):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # an unreadable folder: not prepared, look elsewhere
        return False


def _unknown_dataset(dataset):
    return ValueError(
        f"Unknown dataset {dataset!r}: use 'digits', 'fashion_mnist', a TFDS name "
        "(e.g. 'cifar10', with --data_dir pointing to prepared data), or an image "
        "folder path."
    )


def _pick_eval_split(name, splits):
    """The split to evaluate on: "test", else "validation".

    `splits` is empty when TFDS does not know them yet (a builder whose data
    has no metadata, as under `tfds.testing.mock_data`); then the usual name
    is assumed and `tfds.load` reports it if it does not exist.
    """
    base = name.split("/")[0].split(":")[0]
    order = ("test", "validation")
    if base.startswith(_UNLABELED_TEST_SPLIT):
        order = ("validation", "test")
    if not splits:
        return order[0]
    if "train" not in splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no 'train' split (it has "
            f"{sorted(splits)}): use a dataset with 'train' and 'test' or "
            "'validation' splits."
        )
    for candidate in order:
        if candidate in splits:
            return candidate
    raise ValueError(
        f"TFDS dataset {name!r} has neither a 'test' nor a 'validation' split "
        f"(it has {sorted(splits)}): use a dataset with one of them."
    )


def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds

    if not name:
        raise _unknown_dataset("tfds:")
    where = data_dir or "the default data_dir (~/tensorflow_datasets)"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists every registered dataset (thousands of
        # lines); one line that says what to pass instead is more useful.
        raise _unknown_dataset(name) from None
    except Exception as error:
        raise ValueError(
            f"Could not open TFDS dataset {name!r} ({first_line(error)}): "
            "check the name, and that --data_dir points to prepared data."
        ) from error
    # The split names and sizes are only known once the data is prepared, so
    # prepare first (a no-op when it already is, or under mock_data).
    if not builder.info.splits:
        try:
            builder.download_and_prepare()
        except Exception as error:
            raise ValueError(
                f"TFDS dataset {name!r} is not prepared in {where} and could "
                f"not be downloaded ({first_line(error)}). Prepare it where "
                f"there is network access with `tfds build {name} "
                "--data_dir=DIR`, then pass --data_dir=DIR."
            ) from error
    return builder


def _load_tfds(name, data_dir, size, split):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    splits = dict(builder.info.splits)
    train_split, validation_split = split.percent_slices()
    wanted = [train_split, _pick_eval_split(name, splits)] + (
        [validation_split] if validation_split else [])
    # Decode in parallel; no TFDS auto-cache: whether to cache is the
    # pipeline's decision (by size, `DataSource.train_bytes`).
    read_config = tfds.ReadConfig(try_autocache=False,
                                  num_parallel_calls_for_decode=tf.data.AUTOTUNE)
    try:
        loaded, info = tfds.load(name, data_dir=data_dir, split=wanted, as_supervised=True,
                                 with_info=True, download=False, read_config=read_config)
    except Exception as error:
        raise ValueError(
            f"Could not read TFDS dataset {name!r} from "
            f"{data_dir or 'the default data_dir'} ({first_line(error)}). Prepare it "
            f"with `tfds build {name} --data_dir=DIR` and pass --data_dir=DIR."
        ) from error
    label_key = (info.supervised_keys or (None, "label"))[1]
    num_classes = getattr(info.features[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(
            f"TFDS dataset {name!r} has no class labels (feature {label_key!r} "
            "is not a ClassLabel): use an image classification dataset."
        )

    def prepare(ds):
        return ds.map(lambda x, y: _to_example(x, y, size), num_parallel_calls=tf.data.AUTOTUNE)

    train, test = prepare(loaded[0]), prepare(loaded[1])
    input_shape = tuple(train.element_spec[0].shape)
    if None in input_shape:
        raise ValueError(
            f"Images of TFDS dataset {name!r} vary in size (shape "
            f"{input_shape}): pass image_size (e.g. --image_size=224) to resize "
            "them to one size."
        )
    total = splits["train"].num_examples if "train" in splits else None
    return DataSource(
        train=train,
        validation=prepare(loaded[2]) if validation_split else None,
        test=test,
        num_classes=int(num_classes),
        input_shape=input_shape,
        train_size=round(total * min(split.train_fraction, 1 - split.validation_fraction))
        if total else None,
        name=name,
    )


# --- image folders ---------------------------------------------------------------


def _looks_like_path(dataset):
    """Whether a string that is not a directory was meant as a path.

    TFDS names contain "/" (for configs) but never start with one of these.
    """
    return dataset.startswith(("/", "./", "../", "~", ".\\", "..\\")) or (
        os.sep != "/" and os.sep in dataset
    )


def _load_folder(path, size, split, test_fraction, split_seed):
    folder = image_folders.load_folder(path, size, test_fraction, split_seed)
    train_mask, validation_mask = split.masks(folder.train_labels, split_seed)
    train = image_folders.select(folder.train, train_mask)
    return DataSource(
        train=train,
        validation=image_folders.select(folder.train, validation_mask)
        if validation_mask.any() else None,
        test=folder.test,
        num_classes=len(folder.class_names),
        input_shape=tuple(train.element_spec[0].shape),
        train_size=int(train_mask.sum()),
        name=folder.name,
    )


# --- examples ----------------------------------------------------------------------


def _image_size_pair(image_size):
    """`None`, an int or a pair -> `None` or an `(height, width)` tuple."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    try:
        size = tuple(int(n) for n in image_size)
        ok = len(size) == 2 and all(n > 0 for n in size)
        ok = ok and all(int(n) == n for n in image_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "Received an invalid value for `image_size`, expected a positive "
            f"integer or a (height, width) pair. Received: image_size={image_size!r}"
        )
    return size


def _to_example(image, label, size):
    """Any image dtype -> float32 in [0, 1], resized to `size`; label -> int32."""
    # convert_image_dtype scales integer images by their dtype's maximum
    # (uint8 / 255), which is what every TFDS image feature is stored as.
    image = tf.image.convert_image_dtype(image, tf.float32)
    if size is not None:
        image = tf.image.resize(image, size, antialias=True)
        # Antialiased resampling can overshoot by a rounding error; keep the
        # documented [0, 1] range exact.
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image, tf.cast(label, tf.int32)

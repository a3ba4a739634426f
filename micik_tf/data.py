"""Input pipelines for training and evaluation: `load()` then `pipeline()`.

    from micik_tf import data

    source = data.load("cifar10", data_dir="/data/tfds")
    train = data.pipeline(source.train, 128, training=True, augment=("flip", "crop"))
    test = data.pipeline(source.test, 256, training=False)

`load()` turns a dataset string into a `DataSource` of *unbatched*
`(image float32 in [0, 1], label int32)` examples, so every source looks the
same to the trainer and the calibration code:

- `"digits"`: scikit-learn's bundled handwritten digits (8x8x1). It ships
  inside scikit-learn, so it is the offline default: demos and tests run with
  no network and no prepared data.
- `"tfds:<name>"` or a bare TFDS name (`"cifar10"`, `"imagenet2012"`): read
  through `tfds.load`, from `data_dir` when given.
- `"folder:<path>"` or an existing directory: one subfolder per class, or
  `train/` and `test/` (or `validation/`, `val/`) folders that each hold one.

`pipeline()` batches and prefetches one split. The split stays unbatched until
then so that caching, shuffling and per-image augmentation all happen before
batching, and the batch size is decided by the caller (it depends on the
distribution strategy's replica count, which `load()` does not know).

TensorFlow Datasets and scikit-learn are imported only inside the branch that
needs them: `import micik_tf` stays cheap, and a missing optional package only
breaks the one source that uses it.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

import keras

DIGITS = "digits"
# The folder source needs a fixed size to batch images of mixed sizes; 32x32 is
# the CIFAR size, the usual scale of the models this project compresses.
DEFAULT_FOLDER_IMAGE_SIZE = (32, 32)
# The digits test split: a quarter of each class, so both splits see every
# class in its natural proportion.
DIGITS_TEST_FRACTION = 0.25
# Names of the evaluation folder in the `train/` + `test/` folder layout, in the
# order they are looked for.
FOLDER_EVAL_SPLITS = ("test", "validation", "val")
# The file types `keras.utils.image_dataset_from_directory` reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# TFDS datasets whose "test" split has no labels (label -1): evaluate on
# "validation" instead.
_UNLABELED_TEST_SPLIT = ("imagenet2012",)


@dataclasses.dataclass
class DataSource:
    """A dataset's two splits and what a model needs to know about them.

    Both splits yield the same examples in the same order on every pass
    (`pipeline()` does the shuffling), so a caller may carve a fixed
    validation slice out of `train` with `take`/`skip`.

    Attributes:
        train: unbatched `(image, label)` examples, `image` float32 in
            `[0, 1]` with shape `input_shape`, `label` an int32 scalar.
        test: the held-out split, same structure as `train`.
        num_classes: the number of classes; labels are `0..num_classes - 1`.
        input_shape: the shape of one image, e.g. `(8, 8, 1)`.
        train_size: the number of training examples, or `None` if unknown
            (e.g. TFDS metadata without split sizes).
        name: a short name for logs and reports (`"digits"`, `"cifar10"`,
            or the image folder's name).
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    input_shape: tuple
    train_size: int | None
    name: str


def load(dataset, data_dir=None, image_size=None, validation_split=0.2, seed=0):
    """Loads a dataset by name as a `DataSource` of unbatched examples.

    Args:
        dataset: `"digits"`, `"tfds:<name>"` or a bare TFDS name (e.g.
            `"cifar10"`), or `"folder:<path>"` or the path of an existing
            image folder.
        data_dir: the TFDS data directory, where prepared datasets are read
            from (TFDS sources only). `None` means TFDS's default
            (`~/tensorflow_datasets`).
        image_size: an int or an `(height, width)` pair to resize images to.
            `None` keeps the dataset's own size; image folders then use
            `DEFAULT_FOLDER_IMAGE_SIZE`.
        validation_split: the fraction of each class of an image folder held
            out as the test split, when the folder has no `train/` and
            `test/` folders.
        seed: the seed of the digits split and of the image folder split.

    Returns:
        A `DataSource`.

    Raises:
        ValueError: for an unknown dataset, a TFDS dataset that is neither
            prepared nor downloadable, or a missing or empty image folder.
            The message names the problem and the fix.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(
            "Received an invalid value for `dataset`, expected a non-empty "
            f"string. Received: dataset={dataset!r}"
        )
    size = _image_size_pair(image_size)
    if dataset == DIGITS:
        return _load_digits(size, seed)
    if dataset.startswith("tfds:"):
        return _load_tfds(dataset[len("tfds:") :], data_dir, size)
    if dataset.startswith("folder:"):
        return _load_folder(dataset[len("folder:") :], size, validation_split, seed)
    if os.path.isdir(os.path.expanduser(dataset)) or _looks_like_path(dataset):
        return _load_folder(dataset, size, validation_split, seed)
    return _load_tfds(dataset, data_dir, size)


def pipeline(
    ds,
    batch_size,
    training,
    seed=0,
    augment=(),
    cache=True,
    shuffle_buffer=10000,
    drop_remainder=False,
):
    """Batches one split for training or evaluation.

    The order is cache, shuffle, augment, batch, prefetch: caching first keeps
    the decoded images (not one epoch's augmented copies) in memory, and
    shuffling before batching mixes examples rather than whole batches.

    Args:
        ds: unbatched `(image, label)` examples, e.g. `DataSource.train`.
        batch_size: the (global) batch size, a positive integer.
        training: whether this is the training split. Only training data is
            shuffled and augmented; evaluation data keeps its order.
        seed: the seed of the shuffle and of the augmentations. The same seed
            gives the same order and the same augmented images, epoch by epoch.
        augment: names of augmentations applied in order, from `AUGMENTATIONS`:
            `"flip"` (random horizontal flip), `"crop"` (pad 4 pixels, crop
            back at a random offset) and `"shift"` (a random translation of up
            to 1 pixel).
        cache: whether to cache the examples in memory after the first epoch.
            Turn it off for datasets that do not fit in memory.
        shuffle_buffer: the size of the shuffle buffer, in examples.
        drop_remainder: whether to drop the last, smaller batch (useful where
            every step must see the same batch shape, e.g. on TPUs).

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches, prefetched.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            "Received an invalid value for `batch_size`, expected a positive "
            f"integer. Received: batch_size={batch_size!r}"
        )
    if not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 1:
        raise ValueError(
            "Received an invalid value for `shuffle_buffer`, expected a "
            f"positive integer. Received: shuffle_buffer={shuffle_buffer!r}"
        )
    if isinstance(augment, str):
        augment = (augment,)
    augment = tuple(augment)
    # Validate even when not training, so that a typo in a flag fails at once
    # and not only once the training job reaches its first epoch.
    unknown = [name for name in augment if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"Unknown augmentation(s) {unknown}: valid names are "
            f"{sorted(AUGMENTATIONS)}. Received: augment={augment!r}"
        )

    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment:
            ds = _augmented(ds, augment, seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def _flip(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)


def _pad_and_crop(pad):
    """An augmentation that zero-pads `pad` pixels a side and crops back."""

    def augmentation(image, seed):
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed)
        # The crop size is a tensor, so the static shape is lost; restore it so
        # that batches keep a known image shape for Keras.
        cropped.set_shape(image.shape)
        return cropped

    return augmentation


AUGMENTATIONS = {
    "flip": _flip,
    "crop": _pad_and_crop(4),
    "shift": _pad_and_crop(1),
}


def _augmented(ds, names, seed):
    """Applies the augmentations `names` with per-example stateless seeds.

    Stateless ops with seeds drawn from a seeded `Dataset.random` make the
    augmentation reproducible even with a parallel `map` (a stateful random
    op would depend on the order the parallel calls run in), while
    `rerandomize_each_iteration` still gives new augmentations every epoch.
    """
    if not (isinstance(ds.element_spec, tuple) and len(ds.element_spec) == 2):
        raise ValueError(
            "Augmentation expects `(image, label)` examples. Received a "
            f"dataset with element_spec={ds.element_spec}"
        )
    functions = [AUGMENTATIONS[name] for name in names]
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    seeds = seeds.batch(2)  # stateless ops take a seed of shape [2]

    def augment_one(example_seed, example):
        image, label = example
        op_seeds = tf.random.experimental.stateless_split(
            example_seed, num=len(functions)
        )
        for i, function in enumerate(functions):
            image = function(image, op_seeds[i])
        return image, label

    return tf.data.Dataset.zip((seeds, ds)).map(
        augment_one, num_parallel_calls=tf.data.AUTOTUNE
    )


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


def _stratified_test_mask(labels, fraction, seed):
    """Marks about `fraction` of each class as test, by a seeded permutation.

    Stratified, so both splits see every class in its natural proportion, and
    a function of `seed` only, so runs with the same seed are compared on the
    same test examples. A class with two or more examples keeps at least one
    on each side.
    """
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        is_test[members[:n_test]] = True
    return is_test


def _load_digits(size, seed):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]  # 0..16 pixels
    labels = bunch.target.astype(np.int32)
    is_test = _stratified_test_mask(labels, DIGITS_TEST_FRACTION, seed)

    def split(mask):
        ds = tf.data.Dataset.from_tensor_slices((images[mask], labels[mask]))
        return ds.map(
            lambda x, y: _to_example(x, y, size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    train = split(~is_test)
    return DataSource(
        train=train,
        test=split(is_test),
        num_classes=int(labels.max()) + 1,
        input_shape=tuple(train.element_spec[0].shape),
        train_size=int((~is_test).sum()),
        name=DIGITS,
    )


def _unknown_dataset(dataset):
    return ValueError(
        f"Unknown dataset {dataset!r}: use 'digits', a TFDS name (e.g. "
        "'cifar10', with --data_dir pointing to prepared data), or an image "
        "folder path."
    )


def _first_line(error, limit=200):
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    for split in order:
        if split in splits:
            return split
    raise ValueError(
        f"TFDS dataset {name!r} has neither a 'test' nor a 'validation' split "
        f"(it has {sorted(splits)}): use a dataset with one of them."
    )


def _load_tfds(name, data_dir, size):
    import tensorflow_datasets as tfds

    if not name:
        raise _unknown_dataset("tfds:")
    where = data_dir or "the default data_dir (~/tensorflow_datasets)"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # TFDS's own message lists every registered dataset (thousands of
        # lines); one line that says what to pass instead is more useful.
        raise _unknown_dataset(name) from None
    except Exception as error:
        raise ValueError(
            f"Could not open TFDS dataset {name!r} ({_first_line(error)}): "
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
                f"not be downloaded ({_first_line(error)}). Prepare it where "
                f"there is network access with `tfds build {name} "
                "--data_dir=DIR`, then pass --data_dir=DIR."
            ) from error
    splits = dict(builder.info.splits)
    eval_split = _pick_eval_split(name, splits)

    try:
        (train, test), info = tfds.load(
            name,
            data_dir=data_dir,
            split=["train", eval_split],
            as_supervised=True,
            with_info=True,
            download=False,
        )
    except Exception as error:
        raise ValueError(
            f"Could not read TFDS dataset {name!r} from {where} "
            f"({_first_line(error)}). Prepare it with `tfds build {name} "
            "--data_dir=DIR` and pass --data_dir=DIR."
        ) from error

    label_key = (info.supervised_keys or (None, "label"))[1]
    num_classes = getattr(info.features[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(
            f"TFDS dataset {name!r} has no class labels (feature {label_key!r} "
            "is not a ClassLabel): use an image classification dataset."
        )

    def prepare(ds):
        return ds.map(
            lambda x, y: _to_example(x, y, size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    train, test = prepare(train), prepare(test)
    input_shape = tuple(train.element_spec[0].shape)
    if None in input_shape:
        raise ValueError(
            f"Images of TFDS dataset {name!r} vary in size (shape "
            f"{input_shape}): pass image_size (e.g. --image_size=224) to resize "
            "them to one size."
        )
    train_size = splits["train"].num_examples if "train" in splits else None
    return DataSource(
        train=train,
        test=test,
        num_classes=int(num_classes),
        input_shape=input_shape,
        train_size=int(train_size) if train_size else None,
        name=name,
    )


def _looks_like_path(dataset):
    """Whether a string that is not a directory was meant as a path.

    TFDS names contain "/" (for configs) but never start with one of these.
    """
    return dataset.startswith(("/", "./", "../", "~", ".\\", "..\\")) or (
        os.sep != "/" and os.sep in dataset
    )


def _image_folder(directory, size, **kwargs):
    """`keras.utils.image_dataset_from_directory`, unbatched, in [0, 1]."""
    try:
        result = keras.utils.image_dataset_from_directory(
            directory,
            labels="inferred",
            label_mode="int",
            image_size=size,
            # batch_size=None returns single examples: the same unbatched
            # form as the other sources, so `pipeline()` batches them all.
            batch_size=None,
            verbose=False,
            **kwargs,
        )
    except ValueError as error:
        raise ValueError(
            f"Could not read image folder {directory!r} ({_first_line(error)}). "
            "Expected one subfolder per class holding its images, e.g. "
            f"{os.path.join(directory, 'cat', '001.png')}."
        ) from error
    # Keras yields float32 pixels in [0, 255]; the labels are already int32.
    scaled = result.map(
        lambda x, y: (x / 255.0, tf.cast(y, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return scaled, result.class_names, result.file_paths


def _select(ds, mask):
    """The examples of `ds` whose position is marked in the bool array `mask`."""
    mask = tf.constant(mask)
    return (
        ds.enumerate()
        .filter(lambda i, example: tf.gather(mask, i))
        .map(lambda i, example: example)
    )


def _has_subfolders(directory):
    return any(entry.is_dir() for entry in os.scandir(directory))


def _has_images(directory):
    for _, _, files in os.walk(directory, followlinks=False):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


def _load_folder(path, size, validation_split, seed):
    directory = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(directory):
        raise ValueError(
            f"Image folder {path!r} does not exist ({directory}): pass an "
            "existing folder with one subfolder per class, or a dataset name "
            "such as 'digits' or 'cifar10'."
        )
    if not _has_subfolders(directory):
        raise ValueError(
            f"Image folder {path!r} is empty (no class subfolders): put each "
            "class's images in its own subfolder, e.g. "
            f"{os.path.join(directory, 'cat', '001.png')}."
        )
    # Checked here because Keras's own error for this case names neither the
    # formats it looks for nor the layout it expects.
    if not _has_images(directory):
        raise ValueError(
            f"Image folder {path!r} has no images in its class subfolders: "
            f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}, e.g. "
            f"{os.path.join(directory, 'cat', '001.png')}."
        )
    size = size or DEFAULT_FOLDER_IMAGE_SIZE
    eval_dirs = [
        os.path.join(directory, name)
        for name in FOLDER_EVAL_SPLITS
        if os.path.isdir(os.path.join(directory, name))
    ]
    train_dir = os.path.join(directory, "train")
    # Keras is asked not to shuffle: its shuffle reorders the examples on every
    # pass, which would break the `DataSource` promise of a fixed order (and
    # with it any validation slice carved out of `train`). `pipeline()`
    # shuffles instead.
    if os.path.isdir(train_dir) and eval_dirs:
        # The folder brings its own split.
        train, class_names, train_files = _image_folder(
            train_dir, size, shuffle=False
        )
        # The test folder must use the training folder's classes, in the same
        # order, or its labels would silently mean other classes.
        test, _, _ = _image_folder(
            eval_dirs[0], size, shuffle=False, class_names=class_names
        )
        train_size = len(train_files)
    else:
        if not (
            isinstance(validation_split, (int, float, np.floating))
            and 0.0 < validation_split < 1.0
        ):
            raise ValueError(
                "Received an invalid value for `validation_split`, expected a "
                "fraction strictly between 0 and 1. Received: "
                f"validation_split={validation_split!r}"
            )
        examples, class_names, files = _image_folder(directory, size, shuffle=False)
        # Keras's own `validation_split` is not stratified and only comes with
        # its reshuffling, so split by file here, with the digits' rule. The
        # labels come from the paths (`<directory>/<class>/...`), not from
        # decoding the images.
        label_of = {name: i for i, name in enumerate(class_names)}
        labels = np.array(
            [label_of[os.path.relpath(f, directory).split(os.sep)[0]] for f in files]
        )
        is_test = _stratified_test_mask(labels, float(validation_split), seed)
        if is_test.all() or not is_test.any():
            raise ValueError(
                f"Image folder {path!r} has too few images ({len(files)}) to "
                f"hold out validation_split={validation_split}: add images, or "
                "use separate train/ and test/ folders."
            )
        # Each split still decodes the other's images before dropping them;
        # `pipeline(cache=True)` pays that once, on the first pass.
        train = _select(examples, ~is_test)
        test = _select(examples, is_test)
        train_size = int((~is_test).sum())
    return DataSource(
        train=train,
        test=test,
        num_classes=len(class_names),
        input_shape=tuple(train.element_spec[0].shape),
        train_size=train_size,
        name=os.path.basename(directory.rstrip(os.sep)) or directory,
    )

"""Image folders as a data source: one subfolder per class, or `train/` and
`test/` (or `validation/`, `val/`) folders that each hold one."""

import dataclasses
import os

import numpy as np
import tensorflow as tf

import keras

from micik_tf.errors import first_line
from micik_tf.recovery.splits import stratified_mask
from micik_tf.validation import fraction

# The folder source needs a fixed size to batch images of mixed sizes; 32x32 is
# the CIFAR size, the usual scale of the models this project compresses.
DEFAULT_IMAGE_SIZE = (32, 32)
# Names of the evaluation folder in the `train/` + `test/` folder layout, in the
# order they are looked for.
FOLDER_EVAL_SPLITS = ("test", "validation", "val")
# The file types `keras.utils.image_dataset_from_directory` reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


@dataclasses.dataclass
class Folder:
    """An image folder's two splits, unbatched, and the training labels (read
    from the paths, so splitting them needs no decoding)."""

    train: tf.data.Dataset
    train_labels: np.ndarray
    test: tf.data.Dataset
    class_names: list
    name: str


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
            f"Could not read image folder {directory!r} ({first_line(error)}). "
            "Expected one subfolder per class holding its images, e.g. "
            f"{os.path.join(directory, 'cat', '001.png')}."
        ) from error
    # Keras yields float32 pixels in [0, 255]; the labels are already int32.
    scaled = result.map(
        lambda x, y: (x / 255.0, tf.cast(y, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return scaled, result.class_names, result.file_paths


def select(ds, mask):
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


def load_folder(path, size, test_fraction, split_seed):
    """Reads an image folder as a `Folder`; the test split is the folder's own
    `test/` (or `validation/`, `val/`), else `test_fraction` of each class."""
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
    size = size or DEFAULT_IMAGE_SIZE
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
        train_labels = _labels(train_files, train_dir, class_names)
        # The test folder must use the training folder's classes, in the same
        # order, or its labels would silently mean other classes.
        test, _, _ = _image_folder(
            eval_dirs[0], size, shuffle=False, class_names=class_names
        )
    else:
        fraction("test_fraction", test_fraction, low_open=True)
        examples, class_names, files = _image_folder(directory, size, shuffle=False)
        # Keras's own `validation_split` is not stratified and only comes with
        # its reshuffling, so split by file here, with the digits' rule.
        labels = _labels(files, directory, class_names)
        is_test = stratified_mask(labels, float(test_fraction), split_seed)
        if is_test.all() or not is_test.any():
            raise ValueError(
                f"Image folder {path!r} has too few images ({len(files)}) to "
                f"hold out test_fraction={test_fraction}: add images, or "
                "use separate train/ and test/ folders."
            )
        # Each split still decodes the other's images before dropping them;
        # a cached pipeline pays that once, on the first pass.
        train, train_labels = select(examples, ~is_test), labels[~is_test]
        test = select(examples, is_test)
    return Folder(train, train_labels, test, class_names,
                  os.path.basename(directory.rstrip(os.sep)) or directory)


def _labels(files, directory, class_names):
    """Class ids from the paths (`<directory>/<class>/...`), without decoding."""
    label_of = {name: i for i, name in enumerate(class_names)}
    return np.array(
        [label_of[os.path.relpath(f, directory).split(os.sep)[0]] for f in files],
        dtype=np.int32,
    )

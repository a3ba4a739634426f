"""Batching one split for training or evaluation: `pipeline()`, the
augmentations it applies, and whether to cache a split.

The split comes unbatched from `micik_tf.recovery.datasets.load()`; shuffling
and per-image augmentation happen before batching, and the batch size is the
caller's (it depends on the distribution strategy's replica count).

Caching is decided once per split, by its size (`should_cache`), and done
once (`ds.cache()` on the unbatched split, before any per-epoch pipeline is
built from it), so the cache fills on the first epoch and serves the rest.
"""

import numpy as np
import tensorflow as tf

from micik_tf.validation import all_of, one_of, positive_int

# The default shuffle buffer, in examples: a bound on memory whatever the
# split's size (224x224 float32 images: about 6 GB per 10,000 examples at
# most, and usually far less as the buffer holds decoded uint8 until mapped).
DEFAULT_SHUFFLE_BUFFER = 10_000
# `cache="auto"` caches a split whose decoded examples take at most this much
# memory (CIFAR-10: 0.6 GB; Fashion-MNIST: 0.2 GB; ImageNet: far beyond).
CACHE_LIMIT_BYTES = 2 << 30
CACHE_CHOICES = ("auto", "on", "off")


def should_cache(split_bytes, mode="auto"):
    """Whether to cache a split in memory: `mode` "on"/"off", or for "auto"
    whether its decoded size is known and at most `CACHE_LIMIT_BYTES`."""
    one_of("cache", mode, CACHE_CHOICES)
    if mode != "auto":
        return mode == "on"
    return split_bytes is not None and split_bytes <= CACHE_LIMIT_BYTES


def pipeline(ds, batch_size, training, seed=0, augment=(),
             shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, drop_remainder=False):
    """Batches one split for training or evaluation.

    The order is shuffle, augment, batch, prefetch: shuffling before batching
    mixes examples rather than whole batches. Cache `ds` beforehand (once)
    if it fits in memory.

    Args:
        ds: unbatched `(image, label)` examples, e.g. `DataSource.train`.
        batch_size: the (global) batch size, a positive integer.
        training: whether this is the training split. Only training data is
            shuffled and augmented; evaluation data keeps its order.
        seed: the seed of the shuffle and of the augmentations. The same seed
            gives the same order and the same augmented images.
        augment: names of augmentations applied in order, from `AUGMENTATIONS`:
            `"flip"` (random horizontal flip), `"crop"` (pad 4 pixels, crop
            back at a random offset) and `"shift"` (a random translation of up
            to 1 pixel).
        shuffle_buffer: the size of the shuffle buffer, in examples: it
            bounds the memory the shuffle holds, whatever the split's size.
        drop_remainder: whether to drop the last, smaller batch (useful where
            every step must see the same batch shape, e.g. on TPUs).

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches, prefetched.
    """
    positive_int("batch_size", batch_size)
    positive_int("shuffle_buffer", shuffle_buffer)
    augment = all_of("augment", augment, AUGMENTATIONS)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment:
            ds = _augmented(ds, augment, seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                  num_parallel_calls=tf.data.AUTOTUNE)
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



def to_arrays(ds, limit=None):
    """The first `limit` (all, if None) examples of an unbatched `(x, y)`
    dataset as two stacked numpy arrays."""
    if limit is not None:
        ds = ds.take(limit)
    xs, ys = [], []
    for x, y in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("The dataset is empty: there is nothing to stack.")
    return np.stack(xs), np.stack(ys)

"""The job's data: the source's fixed splits, batched for training,
validation, testing and calibration.

The validation split (carved from the training split by the source, the same
for every seed) picks the best epoch; the official test split is only ever
used for the reported accuracies.
"""

import dataclasses

import tensorflow as tf

from micik_tf import models
from micik_tf.job.config import UsageError
from micik_tf.recovery import datasets, pipeline

# Evaluation batches are at least this large: evaluation holds no gradients.
MIN_EVAL_BATCH = 64
# Examples per epoch assumed when a source does not know its size.
UNKNOWN_TRAIN_SIZE = 1000
# The shuffle seed of the calibration and representative examples: fixed, so
# every seed of a run compresses and quantizes from the same examples.
CALIBRATION_SEED = 0


@dataclasses.dataclass
class RunData:
    """Attributes:
        source: the `DataSource`.
        train: the unbatched training split (cached when it fits, once).
        train_size: its size (or `UNKNOWN_TRAIN_SIZE`).
        validation: batched validation split, or None (validation_fraction 0).
        test: batched official test split.
        calibration: batched training examples for compress()'s calibration.
        steps_per_epoch: training steps per epoch.
        cached: whether the training split is cached in memory.
    """

    source: datasets.DataSource
    train: tf.data.Dataset
    train_size: int
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    calibration: tf.data.Dataset
    steps_per_epoch: int
    cached: bool
    config: object

    def train_epoch(self, epoch):
        """One epoch of training batches, shuffled by `seed + epoch`, so a
        resumed run replays exactly the batches it had not seen."""
        config = self.config
        ds = pipeline.pipeline(self.train, config.batch_size, training=True,
                               seed=config.seed + epoch, augment=config.augment,
                               shuffle_buffer=config.shuffle_buffer, drop_remainder=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        return ds.with_options(options).take(self.steps_per_epoch)


def load_data(config):
    """Loads the dataset and batches its splits; `UsageError` on bad data."""
    try:
        source = datasets.load(config.dataset, data_dir=config.data_dir,
                               image_size=config.image_size,
                               validation_fraction=config.validation_fraction,
                               train_fraction=config.train_fraction)
    except ValueError as error:
        raise UsageError(str(error)) from None
    source = _with_application_preprocessing(source, config.teacher)
    cached = pipeline.should_cache(source.train_bytes(), config.cache)
    # Cached once, here: every epoch's pipeline reads the same cache.
    train = source.train.cache() if cached else source.train
    train_size = source.train_size or UNKNOWN_TRAIN_SIZE
    if train_size < config.batch_size:
        raise UsageError(
            f"--batch_size={config.batch_size} is larger than the training split "
            f"({train_size} examples): lower --batch_size or raise --train_fraction."
        )
    steps = max(1, train_size // config.batch_size)
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    eval_batch = max(config.batch_size, MIN_EVAL_BATCH)

    def evaluation(ds):
        return pipeline.pipeline(ds.cache() if cached else ds, eval_batch, training=False)

    return RunData(
        source=source, train=train, train_size=train_size,
        validation=evaluation(source.validation) if source.validation is not None else None,
        test=evaluation(source.test),
        # Shuffled (with a fixed seed, and no augmentation): a source stored
        # class by class (an image folder) would otherwise calibrate on one class.
        calibration=pipeline.pipeline(train, config.batch_size, training=True,
                                      seed=CALIBRATION_SEED, shuffle_buffer=config.shuffle_buffer),
        steps_per_epoch=steps, cached=cached, config=config,
    )


def _with_application_preprocessing(source, teacher):
    """keras.applications weights expect their own input scaling."""
    preprocess = (models.application_preprocessing(teacher[len("app:"):])
                  if teacher.startswith("app:") else None)
    if preprocess is None:
        return source

    def mapped(ds):
        return None if ds is None else ds.map(lambda x, y: (preprocess(x), y),
                                              num_parallel_calls=tf.data.AUTOTUNE)

    return dataclasses.replace(source, train=mapped(source.train),
                               validation=mapped(source.validation), test=mapped(source.test))

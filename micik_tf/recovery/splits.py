"""Fixed, stratified splits of a labelled set.

Every split here is a function of the labels and a *split seed* only, never
of a run's seed: runs with different seeds are compared on the same test and
validation examples, and a teacher trained on one seed's training examples
never sees another seed's test examples.
"""

import dataclasses

import numpy as np

from micik_tf.validation import fraction

# The split seed used unless a caller asks for another: every run of the
# toolkit (every seed, every method) sees the same splits.
SPLIT_SEED = 0


def stratified_mask(labels, share, seed):
    """Marks about `share` of each class, by a seeded permutation.

    Stratified, so both sides see every class in its natural proportion. For
    `0 < share < 1`, a class with two or more examples keeps at least one on
    each side; `share` 0 marks nothing and 1 marks everything.
    """
    labels = np.asarray(labels)
    if share <= 0:
        return np.zeros(len(labels), dtype=bool)
    if share >= 1:
        return np.ones(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    marked = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(share * len(members))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        marked[members[:count]] = True
    return marked


@dataclasses.dataclass(frozen=True)
class TrainSplit:
    """How the official training split is divided.

    Attributes:
        validation_fraction: the share of the training split held out for
            validation (choosing the best epoch, tuning): never trained on.
        train_fraction: the share of the *whole* training split trained on,
            taken from what validation leaves, and at most all of that (so
            1.0 means every example validation leaves; 0.1 is the "limited
            data" regime of compressing a model whose training data you only
            partly have).
    """

    validation_fraction: float = 0.0
    train_fraction: float = 1.0

    def __post_init__(self):
        fraction("validation_fraction", self.validation_fraction)
        fraction("train_fraction", self.train_fraction, low_open=True, high_open=False)

    def masks(self, labels, seed=SPLIT_SEED):
        """`(train, validation)` boolean masks over the training split."""
        labels = np.asarray(labels)
        validation = stratified_mask(labels, self.validation_fraction, seed)
        rest = np.flatnonzero(~validation)
        wanted = min(round(self.train_fraction * len(labels)), len(rest))
        train = np.zeros(len(labels), dtype=bool)
        if len(rest):
            keep = stratified_mask(labels[rest], wanted / len(rest), seed + 1)
            train[rest[keep]] = True
        return train, validation

    def percent_slices(self, split="train"):
        """TFDS split strings `(train, validation)`, sliced by whole percents.

        TFDS slices a split by files and records, never by shuffling it, so
        carving a validation set costs nothing even on ImageNet.
        """
        val, train = (round(100 * f) for f in (self.validation_fraction, self.train_fraction))
        for name, value, pct in (("validation_fraction", self.validation_fraction, val),
                                 ("train_fraction", self.train_fraction, train)):
            if abs(100 * value - pct) > 1e-6:
                raise ValueError(
                    f"TFDS sources slice the training split in whole percents; "
                    f"`{name}`={value:g} is {100 * value:g}%. Use a multiple of 0.01."
                )
        validation = f"{split}[:{val}%]" if val else None
        return f"{split}[{val}%:{min(100, val + train)}%]", validation

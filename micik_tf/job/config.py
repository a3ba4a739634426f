"""The recovery job's settings: what each may be, and what a resumed run must match.

`RunConfig` holds one job's settings, named as `tools/train.py`'s flags are.
`RULES` says what each setting may be; the flags register the same rules as
absl validators (so a bad value is refused at parse time, before any work),
and `RunConfig.validate()` applies them to a config built in Python.
`fingerprint()` lists every setting that changes the result, which a resumed
run must match unless the user allows the change (`--allow_changes`).
"""

import dataclasses
import hashlib
import math
import os

from micik_tf import models
from micik_tf.compression import MODES as COMPRESSION_MODES
from micik_tf.compression.compress import UNIQUE_KINDS
from micik_tf.compression.allocation import OBJECTIVES
from micik_tf.compression.grouping import SHARE_CHOICES
from micik_tf.deploy import FORMATS
from micik_tf.recovery.pipeline import AUGMENTATIONS, CACHE_CHOICES, DEFAULT_SHUFFLE_BUFFER
from micik_tf.recovery.strategies import STRATEGIES
from micik_tf.recovery.trainer import OPTIMIZERS, SCHEDULES, RecoveryConfig

# The baseline that does not factorize: the teacher itself, magnitude-pruned
# during recovery to as many nonzero parameters as `ratio` allows.
PRUNING_MODE = "magnitude_pruning"
MODES = COMPRESSION_MODES + (PRUNING_MODE,)
# --quantize: the TFLite format each choice adds to the exports; "int8" also
# trains the final QAT_FRACTION of the recovery steps on int8-rounded weights.
QUANTIZE_FORMATS = {"none": None, "fp16": "tflite_fp16", "int8": "tflite_int8"}
QAT_FRACTION = 0.3
# What recovery does with the masks of sparse unique parts: keeps those
# compress() chose, or starts from the whole residuals and prunes them back
# to the budget on the pruning baseline's schedule.
SPARSE_MASKS = ("fixed", "gradual")
# Settings a resumed run may change when the user names them in
# --allow_changes: they change how the rest of the run trains, not what the
# student is or which data it sees (those need a new --model_dir).
CHANGEABLE = ("epochs", "learning_rate", "schedule", "optimizer", "weight_decay",
              "clip_norm", "alpha", "beta", "gamma", "temperature", "window", "w_near",
              "w_far", "mixed_precision")
# Changes after which the optimizer's checkpointed state no longer fits (its
# slots, a loss-scale wrapper, a learning-rate variable): a resume that makes
# one restores the student and the position, and starts a fresh optimizer.
OPTIMIZER_CHANGES = ("optimizer", "schedule", "learning_rate", "weight_decay", "clip_norm",
                     "mixed_precision")


class UsageError(ValueError):
    """Bad input from the user: reported as one line, without a traceback."""


class ExportError(UsageError):
    """A finished run whose deployment files did not all pass their checks.

    Recovery's result is not lost: `report` is the run's report (also in
    its `report.json`), with the failed formats' `{"error": ...}` among its
    exports and the ones that passed kept.
    """

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def _optional(check):
    return lambda v: v is None or check(v)


def _names_in(choices):
    return lambda v: set(v) <= set(choices)


def _finite(check):
    return lambda v: math.isfinite(v) and check(v)


# Setting -> (check, what it must be). Shared by the flags and `validate()`.
RULES = {
    "ratio": (_finite(lambda v: v > 1), "a number > 1 (parameters before / after), e.g. 16"),
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "share": (lambda v: v in SHARE_CHOICES, f"one of {', '.join(SHARE_CHOICES)}"),
    "min_rank": (_optional(lambda v: v >= 0), "an integer >= 0 (0 only with --unique=sparse)"),
    "objective": (lambda v: v in ("auto",) + OBJECTIVES,
                  f"one of auto, {', '.join(OBJECTIVES)}"),
    "unique": (lambda v: v in UNIQUE_KINDS, f"one of {', '.join(UNIQUE_KINDS)}"),
    "sparse_share": (_optional(lambda v: 0 <= v <= 1),
                     "a share of the budget in [0, 1] (unset: the allocator chooses)"),
    "sparse_masks": (lambda v: v in SPARSE_MASKS, f"one of {', '.join(SPARSE_MASKS)}"),
    "calibration_batches": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "prune_sparsity": (lambda v: 0 <= v < 1, "a sparsity in [0, 1) (0: off)"),
    "quantize": (lambda v: v in QUANTIZE_FORMATS, f"one of {', '.join(QUANTIZE_FORMATS)}"),
    "teacher_arch": (lambda v: v in models.ARCHITECTURES,
                     f"one of {', '.join(models.ARCHITECTURES)}"),
    "teacher_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "teacher_learning_rate": (_finite(lambda v: v > 0), "a positive number"),
    "image_size": (_optional(lambda v: v >= 1), "a positive integer"),
    "augment": (_names_in(AUGMENTATIONS), f"names from {', '.join(AUGMENTATIONS)}"),
    "validation_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "train_fraction": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "shuffle_buffer": (lambda v: v >= 1, "a positive integer (examples)"),
    "cache": (lambda v: v in CACHE_CHOICES, f"one of {', '.join(CACHE_CHOICES)}"),
    "alpha": (lambda v: v >= 0, "a non-negative weight"),
    "beta": (lambda v: v >= 0, "a non-negative weight"),
    "gamma": (lambda v: v >= 0, "a non-negative weight"),
    "temperature": (_finite(lambda v: v > 0), "a positive number"),
    "window": (lambda v: v >= 1, "an integer >= 1"),
    "w_near": (lambda v: v >= 0, "a non-negative weight"),
    "w_far": (lambda v: v >= 0, "a non-negative weight"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "learning_rate": (_finite(lambda v: v > 0), "a positive number"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "clip_norm": (_optional(lambda v: v > 0), "a positive number"),
    "epochs": (lambda v: v >= 0, "an integer >= 0"),
    "batch_size": (lambda v: v >= 1, "a positive integer"),
    "steps_per_epoch": (_optional(lambda v: v >= 1), "a positive integer"),
    "checkpoint_every": (lambda v: v >= 1, "a positive integer (steps)"),
    "strategy": (lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "num_gpus": (lambda v: v >= 0, "an integer >= 0"),
    "export": (_names_in(FORMATS), f"names from {', '.join(FORMATS)}"),
    "allow_changes": (_names_in(CHANGEABLE), f"names from {', '.join(CHANGEABLE)}"),
    "model_dir": (lambda v: bool(v) and not os.path.isfile(v),
                  "a folder for this run (not an existing file)"),
}

# Checks across settings: (settings, check of a {name: value} dict, message).
CROSS_RULES = (
    (("mode", "prune_sparsity"),
     lambda s: not (s["mode"] == PRUNING_MODE and s["prune_sparsity"]),
     f"--mode={PRUNING_MODE} sets its own sparsity from --ratio; leave "
     "--prune_sparsity at 0"),
    (("mode", "unique"),
     lambda s: not (s["mode"] == PRUNING_MODE and s["unique"] != "low_rank"),
     f"--mode={PRUNING_MODE} factorizes nothing; drop --unique"),
    (("unique", "prune_sparsity"),
     lambda s: not (s["unique"] == "sparse" and s["prune_sparsity"]),
     "--unique=sparse keeps its sparse parts' masks fixed through recovery; "
     "leave --prune_sparsity at 0"),
    (("unique", "sparse_share"),
     lambda s: s["sparse_share"] is None or s["unique"] == "sparse",
     "--sparse_share needs --unique=sparse"),
    (("unique", "min_rank"),
     lambda s: s["min_rank"] != 0 or s["unique"] == "sparse",
     "--min_rank=0 leaves a layer only its sparse part; it needs --unique=sparse"),
    (("unique", "sparse_masks"),
     lambda s: s["sparse_masks"] == "fixed" or s["unique"] == "sparse",
     "--sparse_masks=gradual prunes sparse unique parts; it needs --unique=sparse"),
    (("sequential", "calibration_batches"),
     lambda s: not (s["sequential"] and not s["calibration_batches"]),
     "--sequential fits each layer on calibration data; set --calibration_batches > 0"),
)


def passes(check, value):
    """Whether `value` passes `check`; a value of the wrong type does not."""
    try:
        return bool(check(value))
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass
class RunConfig(RecoveryConfig):
    """One recovery job's settings; each is the flag of the same name in
    `tools/train.py` (see its `--help` for what each does). The recovery
    settings (losses, optimizer, schedule, batch, seed) are the inherited
    `RecoveryConfig` fields, which the trainer reads."""

    model_dir: str = ""
    # Data.
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    augment: tuple = ()
    validation_fraction: float = 0.1
    train_fraction: float = 1.0
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    cache: str = "auto"
    # Teacher.
    teacher: str = "train"
    teacher_arch: str = "vgg_style"
    teacher_epochs: int = 20
    teacher_learning_rate: float = 2e-3
    teacher_weights: str = "imagenet"
    # Student.
    student: str = ""
    ratio: float = 16.0
    mode: str = "micik"
    share: str = "auto"
    min_rank: int | None = None
    unique: str = "low_rank"
    sparse_share: float | None = None
    objective: str = "auto"
    sequential: bool = False
    sparse_masks: str = "fixed"
    calibration_batches: int = 8
    prune_sparsity: float = 0.0
    quantize: str = "none"
    steps_per_epoch: int | None = None
    # The run.
    strategy: str = "default"
    num_gpus: int = 0
    tpu: str = ""
    export: tuple = ("keras",)
    allow_changes: tuple = ()
    evaluate_teacher: bool = True
    verbose: int = 1

    def validate(self):
        """Applies `RULES` and `CROSS_RULES`; raises `UsageError` naming the flag."""
        for name, (check, expected) in RULES.items():
            value = getattr(self, name)
            if not passes(check, value):
                raise UsageError(f"--{name}={_shown(value)}: expected {expected}.")
        values = dataclasses.asdict(self)
        for _, check, message in CROSS_RULES:
            if not check(values):
                raise UsageError(f"{message}.")
        return self

    def fingerprint(self):
        """Every setting that changes the result, by flag name.

        A teacher or student given as a file is fingerprinted by its
        contents too, so a file replaced between two runs is noticed.
        """
        # What does not change the result: where and how the run executes,
        # what it exports, and whether the decoded data is cached.
        excluded = {"model_dir", "strategy", "num_gpus", "tpu", "checkpoint_every",
                    "export", "allow_changes", "evaluate_teacher", "verbose", "cache"}
        prints = {f.name: _jsonable(getattr(self, f.name))
                  for f in dataclasses.fields(self) if f.name not in excluded}
        for name in ("teacher", "student"):
            path = getattr(self, name)
            if path and os.path.isfile(path):
                prints[f"{name} (file contents)"] = _sha256(path)
        return prints


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

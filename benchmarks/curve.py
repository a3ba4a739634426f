"""The accuracy-compression curve on Fashion-MNIST: MICIK against the strongest
alternatives at equal size, leak-free.

Protocol (`PROTOCOL`):

- **Data.** Fashion-MNIST's official training split; a fixed, stratified 10%
  of it is the validation split (best epoch, learning-rate tuning), the same
  for every seed and method; the official test split (10,000 images) is used
  only for the reported accuracies.
- **Teacher.** `vgg_compact` (VGG-16's shape in miniature), trained once on
  the rest of the training split to a plateau (a cosine decay to 0), cached.
  Seeds vary only what happens after compression.
- **Regimes.** *limited*: a fixed 10% of the training split (6,000 images),
  3 recovery epochs (279 steps), every method and ablation, 3 seeds, ratios
  8, 16, 32, 64; *limited_long*: the same data for 15 epochs (about 1,400
  steps), long enough to tell whether a method that starts behind recovers,
  the main methods, 3 seeds; *full*: the whole training split, 1 epoch, the
  main methods at 16x and 64x, 1 seed.
- **Methods** (`METHODS`), at the same stored-parameter budget (within 2%),
  with the same recovery steps, data order and best-epoch rule (the best
  validation epoch, once pruning has reached its final sparsity):
  MICIK (low-rank unique parts), MICIK with sparse unique parts, and its
  best mode found, `B A + S` with the sparse part pruned gradually from the
  whole residuals at a larger nonzero share and without sequential
  calibration (`micik_common_sparse_gradual_no_sequential`; with it,
  `micik_common_sparse_gradual`; neither in the quick protocol); per-layer
  SVD with the same losses (these with sequential calibration, an
  initialisation each can use, whose ablation rows say what it is worth after
  recovery); magnitude pruning of the teacher (one global
  threshold on LAMP scores, BatchNorm re-estimated); structured pruning of
  the teacher (whole channels, `micik_tf.prune_channels`: a smaller dense
  network, the peer on the latency and memory axes); tfmot's own
  `prune_low_magnitude` as its users run it (`tfmot_baseline.py`, a tf_keras
  twin in a subprocess); the same architecture thinned to the same size and
  trained from scratch with the same distillation, for the recovery budget
  and for the teacher's; and int8 post-training quantization of the teacher,
  a point on the bytes axis.
- **Learning rate.** Tuned per method, once, from `LR_GRID` on the
  validation split (limited regime, 32x, seed 0), and reused everywhere,
  both budgets included.
- **Ablations** (`ABLATIONS`): sequential calibration (in both modes), the
  sparse unique part (MICIK sparse against MICIK), the allocator's objective
  (the log-energy cost instead of the sum of errors), the unique part and the
  common part (= per-layer SVD, the same run). The loss terms' ablations were
  measured at d7690df (worth nothing beyond noise) and are not rerun.

Every row records parameters and the gzip'd int8 `.tflite` bytes. State is
saved after every run under `<output>/.curve_work/` (the teacher, the tuned
learning rates, the rows, a killed run's checkpoints), so a rerun with the
same options continues where it stopped, also after a restart.
"""

import argparse
import dataclasses
import glob
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time

from micik_tf.files import read_json, write_figure, write_json

from benchmarks.common import figure, git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Method -> the job settings that make it (None: a method run another way).
# Every factorized method gets the sequential refit (an initialisation any
# of them can use); the ablations take one part away at a time.
METHODS = {
    "micik": dict(mode="micik", sequential=True),
    "micik_sparse": dict(mode="micik", unique="sparse", sequential=True),
    "per_layer": dict(mode="per_layer", sequential=True),
    "pruning": dict(mode="magnitude_pruning"),
    # Structured pruning: whole channels removed (micik_tf.prune_channels),
    # a smaller dense network recovered like the others.
    "channels": dict(channels=True),
    "tfmot": None,
    "thin": dict(thin=True),
    "thin_teacher_budget": dict(thin=True, teacher_budget=True),
    "micik_no_sequential": dict(mode="micik"),
    "micik_sparse_no_sequential": dict(mode="micik", unique="sparse"),
    # The sparse parts pruned gradually from the whole residuals during
    # recovery, as the pruning baseline prunes the teacher (same student).
    "micik_sparse_gradual": dict(mode="micik", unique="sparse", sequential=True,
                                 sparse_masks="gradual"),
    # W_l ~= B_g A_l + S_l: the unique part sparse instead of low-rank.
    "micik_common_sparse": dict(mode="common_only", unique="sparse", sequential=True),
    # MICIK's best mode found: `B A + S` with S pruned gradually from the whole
    # residuals, as the pruning baseline prunes the teacher. The one-shot split
    # search is meaningless when S starts dense, so nonzeros take the largest
    # of these shares at which the minimum ranks fit (`_compressed`): 0.75
    # (0.375 at 64x). Chosen on seed 0's validation accuracy in exploratory
    # runs at 16x and 32x (0.75 against the search's 0.25-0.375).
    "micik_common_sparse_gradual": dict(mode="common_only", unique="sparse", sequential=True,
                                        sparse_masks="gradual",
                                        sparse_share=(0.75, 0.5, 0.375, 0.25)),
    # The same without sequential calibration: the limited regime's ablation
    # rows said it costs accuracy after recovery from 16x on (micik, micik
    # sparse), and seed 0's validation at 16x and 32x agreed here (0.9013 and
    # 0.8695 against 0.9012 and 0.8552, exploratory runs, not among the rows).
    "micik_common_sparse_gradual_no_sequential": dict(
        mode="common_only", unique="sparse", sparse_masks="gradual",
        sparse_share=(0.75, 0.5, 0.375, 0.25)),
    "micik_log_energy": dict(mode="micik", objective="log_energy", sequential=True),
    "micik_no_unique": dict(mode="common_only", sequential=True),
}
# Methods whose configuration is another's: their rows are that run's.
ALIASES = {"micik_no_common": "per_layer"}
BASELINES = ("per_layer", "pruning", "channels", "tfmot", "thin")
# MICIK's modes, each compared with the best baseline.
MICIK_MODES = ("micik", "micik_sparse", "micik_common_sparse_gradual",
               "micik_common_sparse_gradual_no_sequential")
# (method, its ablation, the part the ablation takes away): the part's worth
# is the method's accuracy minus the ablation's.
ABLATIONS = (
    ("micik", "micik_no_sequential", "sequential calibration"),
    ("micik_sparse", "micik_sparse_no_sequential", "sequential calibration (sparse)"),
    ("micik_sparse", "micik", "sparse unique part"),
    ("micik_sparse", "micik_sparse_gradual", "masks fixed at compress() (vs pruned gradually)"),
    ("micik_sparse", "micik_common_sparse", "low-rank unique part beside the sparse one"),
    ("micik_common_sparse_gradual", "micik_common_sparse",
     "gradual masks at a larger share (B A + S)"),
    ("micik_common_sparse_gradual", "micik_common_sparse_gradual_no_sequential",
     "sequential calibration (B A + S, gradual)"),
    ("micik", "micik_log_energy", "sum-of-errors allocator (vs log-energy)"),
    ("micik", "micik_no_unique", "unique part"),
    ("micik", "micik_no_common", "common part"),
)
ABLATION_METHODS = ("micik_no_sequential", "micik_sparse_no_sequential", "micik_sparse_gradual",
                    "micik_common_sparse", "micik_log_energy", "micik_no_unique",
                    "micik_no_common")
CORE = ("micik", "micik_sparse", "per_layer", "pruning", "channels", "tfmot", "thin",
        "thin_teacher_budget")
# MICIK's modes beyond CORE's two, in every regime but the quick ones: the
# best found (B A + S, gradual, no sequential calibration) and the same with
# sequential calibration, the best found before it (its ablation).
BEST_MODES = ("micik_common_sparse_gradual_no_sequential", "micik_common_sparse_gradual")
# The long budget (15 epochs) exceeds the teacher's 12: its thin network
# already has more than the teacher's budget.
LONG = ("micik", "micik_sparse", "per_layer", "pruning", "channels", "tfmot", "thin",
        *BEST_MODES)
FULL_METHODS = ("micik", "micik_sparse", "per_layer", "pruning", "channels", "thin",
                "thin_teacher_budget", *BEST_MODES)
# Which method's tuned learning rate each uses.
LR_OF = {"thin_teacher_budget": "thin", "micik_sparse_no_sequential": "micik_sparse",
         "micik_sparse_gradual": "micik_sparse", "micik_common_sparse": "micik_sparse",
         **{m: "micik" for m in ("micik_no_sequential", "micik_log_energy", "micik_no_unique")}}
TUNED = ("micik", "micik_sparse", "per_layer", "pruning", "channels", "tfmot", "thin",
         *BEST_MODES)
LR_GRID = (5e-4, 2e-3, 5e-3)
# A row's keys for a file that failed its check (float32, int8): the run's
# accuracy stands, the file's bytes are None.
EXPORT_ERRORS = ("tflite_error", "tflite_int8_error")
DEFAULT_LR = 2e-3


def cell_name(regime, method, ratio):
    """`regime-method-ratio`: the name of a cell's kept export folder."""
    return f"{regime}-{method}-{ratio:g}"


@dataclasses.dataclass(frozen=True)
class Regime:
    train_fraction: float
    epochs: int
    ratios: tuple
    seeds: int
    methods: tuple


@dataclasses.dataclass(frozen=True)
class Protocol:
    dataset: str = "fashion_mnist"
    arch: str = "vgg_compact"
    width: float = 1.0
    teacher_epochs: int = 12
    teacher_learning_rate: float = 3e-3
    teacher_batch: int = 128
    augment: tuple = ("flip",)
    validation_fraction: float = 0.1
    batch_size: int = 64
    regimes: tuple = (
        ("limited", Regime(0.1, 3, (8.0, 16.0, 32.0, 64.0), 3,
                           CORE + BEST_MODES + ABLATION_METHODS)),
        # 10% of the data for 15 epochs (about 1,400 steps): long enough for a
        # method that starts behind to show whether its structure recovers.
        ("limited_long", Regime(0.1, 15, (8.0, 16.0, 32.0, 64.0), 3, LONG)),
        ("full", Regime(1.0, 1, (16.0, 64.0), 1, FULL_METHODS)),
    )
    tune_at: tuple = ("limited", 32.0)
    lr_grid: tuple = LR_GRID
    tune: bool = True
    steps_per_epoch: int | None = None  # a cap, for smoke runs

    def regime(self, name):
        return dict(self.regimes)[name]

    def rows_key(self):
        """What a recorded row's result depends on beyond its own key
        (regime, method, ratio, seed): everything but the lists of methods,
        ratios and seeds, so that a suite which grows keeps its rows."""
        regimes = tuple((name, r.train_fraction, r.epochs) for name, r in self.regimes)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "regimes"}
        return hashlib.sha256(repr((fields, regimes)).encode()).hexdigest()[:12]

    def teacher_key(self):
        recipe = (self.dataset, self.arch, self.width, self.teacher_epochs,
                  self.teacher_learning_rate, self.teacher_batch, self.augment,
                  self.validation_fraction, self.steps_per_epoch)
        return hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]


PROTOCOL = Protocol()
# 1 seed, ratios 16 and 64, the limited regime, no ablations; the learning
# rates of a full run when it has tuned them, else DEFAULT_LR.
QUICK = dataclasses.replace(
    PROTOCOL, regimes=(("limited", Regime(0.1, 3, (16.0, 64.0), 1, CORE)),), tune=False)
# Everything, tiny: the bundled digits, a quarter-width teacher, two steps.
SMOKE = Protocol(
    dataset="digits", width=0.25, teacher_epochs=1, augment=(), batch_size=32,
    regimes=(("limited", Regime(0.5, 1, (4.0,), 1, CORE + BEST_MODES + ABLATION_METHODS)),
             ("limited_long", Regime(0.5, 2, (4.0,), 1, LONG)),
             ("full", Regime(1.0, 1, (4.0,), 1, FULL_METHODS))),
    tune_at=("limited", 4.0), lr_grid=(1e-3, 2e-3), steps_per_epoch=2,
)
QUICK_SMOKE = dataclasses.replace(
    SMOKE, regimes=(("limited", Regime(0.5, 1, (4.0,), 1, CORE)),), tune=False)


PROTOCOLS = {"full": PROTOCOL, "quick": QUICK, "smoke": SMOKE, "quick_smoke": QUICK_SMOKE}


def _named_protocols():
    """The protocols a worker process can be started on, by name: the
    curve's and those of the suites built on it (imported here, not at the
    top, because they import this module)."""
    from benchmarks import vit_mha

    return dict(PROTOCOLS, vit_mha=vit_mha.PROTOCOL, vit_mha_smoke=vit_mha.SMOKE)


def protocol_for(quick, smoke):
    name = ("quick_smoke" if smoke else "quick") if quick else ("smoke" if smoke else "full")
    return PROTOCOLS[name]


def _key(row):
    base = (row["regime"], row["method"], row["ratio"], row["seed"])
    return base + (row["learning_rate"],) if row["phase"] == "tune" else base


def run_suite(protocol, output_dir, log=print, workers=1, work_name=".curve_work",
              methods=None):
    """Runs every cell of `protocol`; returns `(results, scratch folder)`.

    With `workers` > 1 the runs of each phase (the learning-rate trials, then
    the cells) are shared among that many processes, one TensorFlow thread
    each: the single-threaded parts of a run (tracing, conversion, Python)
    then overlap, about 1.2x the throughput of one two-thread process on 2
    cores. A run's result does not depend on the process it ran in.
    `work_name`: the scratch folder in `output_dir` (one per suite).
    `methods`: run only these methods' runs now (the others stay pending, and
    the results say they are partial), e.g. the methods a change to the code
    leaves alone, while it is being made.
    """
    work = os.path.join(output_dir, work_name)
    suite = _Suite(protocol, work, log, methods=methods)
    suite.teacher()
    suite.prepare_students()
    for phase in ("tune", "cells"):
        if phase == "tune" and not protocol.tune:
            continue
        if workers > 1 and len(suite.pending(phase)) > 1:
            _run_workers(protocol, output_dir, phase, workers, log, work_name, methods)
            suite.load()
        else:
            suite.run(phase)
    # The teacher, the compressed students, the tuned learning rates and the
    # rows stay (a rerun re-renders at once); a killed run's checkpoints go.
    results = suite.results()
    partial = suite.partial()
    if partial["runs_planned"] > partial["runs_done"]:  # only with `methods`
        results["partial"] = partial
    return results, os.path.join(work, "runs")


def progress(protocol, output_dir, work_name=".curve_work"):
    """The results of the runs recorded so far, without running anything
    (`partial` says how many of the planned runs they are); `(results, None)`.

    A full suite takes hours; this shows where it stands, from the same rows
    the finished suite will render, so nothing in it is provisional except
    the cells not run yet."""
    work = os.path.join(output_dir, work_name)
    suite = _Suite(protocol, work, print)
    if not os.path.exists(os.path.join(suite.teacher_dir, "teacher.json")):
        raise ValueError(f"no trained teacher in {work}: start the suite first")
    suite.teacher()
    return dict(suite.results(), partial=suite.partial()), None


def _run_workers(protocol, output_dir, phase, workers, log, work_name=".curve_work",
                 methods=None):
    name = next(k for k, v in _named_protocols().items() if v == protocol)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    only = [f"--methods={','.join(methods)}"] if methods else []
    processes = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--protocol={name}", f"--phase={phase}",
         f"--worker={k}", f"--workers={workers}", f"--output_dir={output_dir}",
         f"--work_name={work_name}", *only],
        cwd=ROOT, env=env) for k in range(workers)]
    failed = [k for k, process in enumerate(processes) if process.wait() != 0]
    if failed:
        raise RuntimeError(f"curve: worker(s) {failed} of phase {phase!r} failed; rerun to "
                           "continue where they stopped.")


class _Suite:
    """The suite's state on disk, and one method per step of the protocol."""

    def __init__(self, protocol, work, log, worker=None, methods=None):
        self.protocol, self.work, self.log, self.worker = protocol, work, log, worker
        # The methods to run now (None: all); the rows of every method load.
        self.methods = set(methods) if methods else None
        self.teacher_dir = os.path.join(work, f"teacher-{protocol.teacher_key()}")
        self.options = protocol.rows_key()
        self.load()

    def load(self):
        """Every row recorded so far, by any process (one file each)."""
        self.rows = []
        for path in sorted(glob.glob(os.path.join(self.work, f"rows-{self.options}-*.json"))):
            self.rows += read_json(path)
        mine = f"rows-{self.options}-{'main' if self.worker is None else self.worker}.json"
        self.rows_path = os.path.join(self.work, mine)
        self.own_rows = read_json(self.rows_path) if os.path.exists(self.rows_path) else []

    def record(self, row):
        self.rows.append(row)
        self.own_rows.append(row)
        write_json(self.rows_path, self.own_rows)

    def done(self, phase):
        return {_key(r) for r in self.rows if r["phase"] == phase}

    # -- data and teacher -----------------------------------------------------------

    def data(self, train_fraction=1.0):
        from micik_tf.recovery import datasets

        return datasets.load(self.protocol.dataset,
                             validation_fraction=self.protocol.validation_fraction,
                             train_fraction=train_fraction)

    def teacher(self):
        """Trains the one teacher (once per recipe, shared by the quick and the
        full suite) and scores it on the test split, float and int8 PTQ."""
        path = os.path.join(self.teacher_dir, "teacher.keras")
        info_path = os.path.join(self.teacher_dir, "teacher.json")
        if os.path.exists(info_path):
            # The recorded path is where it was trained; a clone elsewhere
            # (a later session's) finds it beside its record.
            self.teacher_info = dict(read_json(info_path), path=path)
            return
        import keras

        from micik_tf import export, files, models
        from micik_tf.job.teacher import fit_teacher
        from micik_tf.recovery import evaluation, pipeline

        p = self.protocol
        keras.utils.set_random_seed(0)
        source = self.data()
        model = models.build(p.arch, source.input_shape, source.num_classes, width=p.width)
        steps = max(1, source.train_size // p.teacher_batch)
        if p.steps_per_epoch:
            steps = min(steps, p.steps_per_epoch)
        train = pipeline.pipeline(source.train.cache(), p.teacher_batch, training=True,
                                  augment=p.augment, drop_remainder=True).take(steps)
        validation = pipeline.pipeline(source.validation.cache(), 256, training=False)
        tic = time.perf_counter()
        history = fit_teacher(model, train, validation, p.teacher_epochs,
                              p.teacher_learning_rate, steps_per_epoch=steps)
        seconds = time.perf_counter() - tic
        files.save_model(model, path)
        test = pipeline.pipeline(source.test, 256, training=False)
        representative, _ = pipeline.to_arrays(source.train, 100)
        test_x, test_y = pipeline.to_arrays(source.test)
        int8 = export(model, os.path.join(self.teacher_dir, "ptq"), formats=("tflite_int8",),
                      representative_data=representative, check_data=test_x,
                      check_labels=test_y, overwrite=True)["tflite_int8"]
        self.teacher_info = {
            "path": path, "params": int(model.count_params()),
            "input_shape": list(source.input_shape), "num_classes": source.num_classes,
            "accuracy": evaluation.accuracy(model, test),
            "test_examples": int(len(test_x)),
            "val_accuracy": history["val_accuracy"], "train_accuracy": history["accuracy"],
            "epochs": p.teacher_epochs, "seconds": seconds, "git_commit": git_commit(),
            "ptq_int8": {"params": int(model.count_params()), "accuracy": int8["accuracy"],
                         "gzip_bytes": int8["gzip_bytes"], "bytes": int8["bytes"]},
        }
        write_json(info_path, self.teacher_info)
        self.log(f"teacher: {self.teacher_info['params']:,} parameters, test accuracy "
                 f"{self.teacher_info['accuracy']:.4f} ({seconds / 60:.1f} min)")

    # -- learning rates ---------------------------------------------------------------

    def pending(self, phase, every_method=False):
        """The runs of `phase` not done yet, in a fixed order: the tuning
        trials, or the cells seed by seed (so early rows cover every method),
        and within a seed the methods compared before the ablations (so a
        suite stopped part-way has its comparisons at the most seeds);
        only the methods to run now unless `every_method`."""
        p = self.protocol
        if phase == "tune":
            regime, ratio = p.tune_at
            keys = [(regime, m, ratio, 0, lr) for m in TUNED for lr in p.lr_grid]
        else:
            keys = [(name, m, ratio, seed)
                    for seed in range(max(r.seeds for _, r in p.regimes))
                    for ablations in (False, True)
                    for name, r in p.regimes if seed < r.seeds
                    for ratio in r.ratios for m in r.methods
                    if m not in ALIASES and (m in ABLATION_METHODS) == ablations]
        done = self.done(phase)
        return [k for k in keys if k not in done
                and (every_method or self.methods is None or k[1] in self.methods)]

    def partial(self):
        """`{"runs_done", "runs_planned"}` over every method of the protocol."""
        phases = ("tune", "cells") if self.protocol.tune else ("cells",)
        pending = sum(len(self.pending(phase, every_method=True)) for phase in phases)
        return {"runs_done": len(self.rows), "runs_planned": len(self.rows) + pending}

    def run(self, phase, worker=None, workers=1):
        """Runs the pending runs of `phase` (this worker's share of them)."""
        if phase == "cells":
            self.learning_rates = self.tuned_rates()
        todo = self.pending(phase)
        for key in (todo if worker is None else todo[worker::workers]):
            if phase == "tune":
                regime, method, ratio, seed, lr = key
            else:
                (regime, method, ratio, seed), lr = key, self.lr(key[1])
            row = dict(self._run(regime, method, ratio, seed, lr), phase=phase)
            self.record(row)
            self.log(f"{phase} {regime} seed {seed} {ratio:>4g}x {method:<20} lr {lr:g}: "
                     + (f"{row['achieved_ratio']:.2f}x before {row['accuracy_before_recovery']:.4f} "
                        f"after {row['accuracy']:.4f} val {row.get('val_accuracy')} "
                        f"({row['wall_seconds']:.0f}s)" + "".join(
                            f"; {key}: {row[key]}" for key in EXPORT_ERRORS if key in row)
                        if row.get("accuracy") is not None else f"failed: {row.get('error')}"))

    def tuned_rates(self):
        """Per tuned method, the grid's rate with the best validation accuracy
        (at `tune_at`); without tuning, a full run's if present, else DEFAULT_LR."""
        if not self.protocol.tune:
            return self._borrowed_rates()
        trials = {}
        for row in self.rows:
            if row["phase"] == "tune":
                trials.setdefault(row["method"], {})[row["learning_rate"]] = row.get("val_accuracy")
        self.tuning = trials
        return {m: max(t, key=lambda lr: -1.0 if t[lr] is None else t[lr])
                for m, t in trials.items()}

    def _borrowed_rates(self):
        full = os.path.join(self.work, "tuned_learning_rates.json")
        if os.path.exists(full):
            return read_json(full)["learning_rates"]
        return {m: DEFAULT_LR for m in TUNED}

    def lr(self, method):
        return self.learning_rates.get(LR_OF.get(method, method), DEFAULT_LR)

    # -- cells --------------------------------------------------------------------------

    def _run(self, regime_name, method, ratio, seed, lr):
        regime = self.protocol.regime(regime_name)
        row = {"regime": regime_name, "method": method, "ratio": ratio, "seed": seed,
               "learning_rate": lr}
        if method == "tfmot":
            return {**row, **self._tfmot(regime, ratio, seed, lr)}
        return {**row, **self._job(regime_name, regime, method, ratio, seed, lr)}

    def _job(self, regime_name, regime, method, ratio, seed, lr):
        import keras

        from micik_tf import job

        settings = dict(METHODS[method])
        thin, teacher_budget = settings.pop("thin", False), settings.pop("teacher_budget", False)
        channels = settings.pop("channels", False)
        # The student is made here (`_compressed`).
        settings.pop("sparse_share", None)
        min_rank = settings.pop("min_rank", 1)
        p = self.protocol
        key = f"{regime_name}-{method}-{ratio:g}-{seed}-{lr:g}"
        model_dir = os.path.join(self.work, "runs", key)
        config = job.RunConfig(
            model_dir=model_dir, dataset=p.dataset, validation_fraction=p.validation_fraction,
            train_fraction=regime.train_fraction, augment=p.augment,
            teacher=self.teacher_info["path"], ratio=ratio, min_rank=min_rank,
            epochs=p.teacher_epochs if teacher_budget else regime.epochs,
            batch_size=p.batch_size, steps_per_epoch=p.steps_per_epoch, learning_rate=lr,
            seed=seed, export=("tflite", "tflite_int8"), checkpoint_every=1_000_000, verbose=0,
            evaluate_teacher=False,
            student=(self._thin_student(ratio) if thin else
                     self._channels_student(regime.train_fraction, ratio) if channels else
                     self._compressed(regime.train_fraction, METHODS[method], ratio)),
            **settings,
        )
        keras.utils.set_random_seed(seed)
        try:
            report = job.run(config)
        except job.ExportError as error:
            # Recovery finished; only a file failed its check. The cell keeps
            # its accuracy, and the row says which file is missing and why.
            report = error.report
        except job.UsageError as error:
            return {"accuracy": None, "error": str(error)}
        finally:
            keras.backend.clear_session()
        exports = report["exports"]
        if seed == 0:
            # The files a phone would run, kept for the deployment measurements
            # (latency and memory do not depend on the seed).
            kept = os.path.join(self.work, "exports", cell_name(regime_name, method, ratio))
            os.makedirs(kept, exist_ok=True)
            for fmt in ("tflite", "tflite_int8"):
                if "path" in exports[fmt]:
                    shutil.copy(exports[fmt]["path"], kept)
        shutil.rmtree(model_dir, ignore_errors=True)
        int8, float32 = exports["tflite_int8"], exports["tflite"]
        eligible = [h for h in report["history"] if h.get("best_eligible")]
        best = max(eligible, key=lambda h: (h["val_accuracy"], h["epoch"])) if eligible else {}
        return {
            "params": report["params_after"], "achieved_ratio": report["ratio"],
            "accuracy_before_recovery": report["student_accuracy_before_recovery"],
            "accuracy": report["student_accuracy"],
            "val_accuracy": best.get("val_accuracy"), "best_epoch": best.get("epoch"),
            "epochs": config.epochs, "steps": report["steps"],
            "tflite_int8_gzip_bytes": int8.get("gzip_bytes"),
            "tflite_int8_bytes": int8.get("bytes"),
            "tflite_int8_accuracy": int8.get("accuracy"),
            # The int8 file is scored on the first this many test images; the
            # Keras accuracies on the whole test split.
            "tflite_int8_test_examples": int8.get("check_examples"),
            "tflite_float32_bytes": float32.get("bytes"),
            "tflite_float32_gzip_bytes": float32.get("gzip_bytes"),
            **{key: exports[fmt]["error"] for fmt, key in zip(("tflite", "tflite_int8"),
                                                             EXPORT_ERRORS)
               if "error" in exports[fmt]},
            "wall_seconds": report["wall_seconds"], "git_commit": git_commit(),
        }

    def _teacher_weights(self):
        """The teacher's weights and a few of its logits, for tfmot's tf_keras
        twin (written once, atomically, before any worker runs)."""
        import numpy as np

        from micik_tf import files
        from micik_tf.recovery import pipeline

        path = os.path.join(self.teacher_dir, "teacher_weights.npz")
        if not os.path.exists(path):
            teacher = files.load_model(self.teacher_info["path"])
            x, _ = pipeline.to_arrays(self.data().test, 16)
            arrays = {f"w{i}": w for i, w in enumerate(teacher.get_weights())}
            with files.atomic_path(path) as tmp:
                np.savez(tmp, x=x, logits=np.asarray(teacher(x, training=False)), **arrays)
        return path

    def prepare_students(self):
        """Makes every compressed and thin student the pending runs start from
        (and the teacher's weights for tfmot), once, before any worker runs,
        so that none of them races to write one. Students are not kept in
        git: a resumed suite makes only those its remaining runs need."""
        for train_fraction, method, ratio in self.needed_students():
            settings = METHODS.get(method) or {}
            if method == "tfmot":
                self._teacher_weights()
            elif settings.get("thin"):
                self._thin_student(ratio)
            elif settings.get("channels"):
                self._channels_student(train_fraction, ratio)
            elif "mode" in settings:
                self._compressed(train_fraction, settings, ratio)

    def needed_students(self):
        """`[(train fraction, method, ratio)]` of the pending runs, sorted."""
        regimes = dict(self.protocol.regimes)
        phases = ("tune", "cells") if self.protocol.tune else ("cells",)
        return sorted({(regimes[key[0]].train_fraction, key[1], key[2])
                       for phase in phases for key in self.pending(phase)})

    def _compressed(self, train_fraction, settings, ratio):
        """The compressed student of a method's compress() settings at
        `ratio`, made once per training share: compress() depends on the
        calibration data (from the training share), not on the seed or the
        recovery budget."""
        mode = settings["mode"]
        if mode == "magnitude_pruning":
            return ""
        options = dict(mode=mode, unique=settings.get("unique", "low_rank"),
                       objective=settings.get("objective"),
                       sequential=settings.get("sequential", False))
        shares = settings.get("sparse_share", (None,))
        min_rank = settings.get("min_rank", 1)
        import micik_tf

        def make(teacher, calibration):
            for share in shares:  # the first at which the minimum ranks fit
                extra = {} if share is None else {"sparse_share": share}
                try:
                    return micik_tf.compress(teacher, ratio=ratio, min_rank=min_rank,
                                             calibration_data=calibration, verbose=0,
                                             **options, **extra)
                except ValueError:
                    continue
            return None  # the job reports the same error on the row

        name = "-".join(str(v) for v in options.values())
        if shares != (None,):
            name += "-share" + ",".join(f"{share:g}" for share in shares)
        if min_rank != 1:
            name += f"-min_rank{min_rank}"
        return self._student_file(f"{train_fraction:g}-{name}-{ratio:g}", train_fraction, make)

    def _channels_student(self, train_fraction, ratio):
        """The teacher with its least important channels removed
        (`micik_tf.prune_channels`), BatchNorm re-estimated on the training
        share, made once per share and ratio."""
        import micik_tf

        return self._student_file(
            f"{train_fraction:g}-channels-{ratio:g}", train_fraction,
            lambda teacher, calibration: micik_tf.prune_channels(
                teacher, ratio, calibration_data=calibration))

    def _student_file(self, name, train_fraction, make):
        """`students/<name>.keras`, made once by `make(teacher, calibration
        data of the training share)` ("" if it returns None)."""
        path = os.path.join(self.teacher_dir, "students", f"{name}.keras")
        if os.path.exists(path):
            return path
        from micik_tf import files
        from micik_tf.recovery import pipeline

        source = self.data(train_fraction)
        teacher = files.load_model(self.teacher_info["path"])
        calibration = pipeline.pipeline(source.train, self.protocol.batch_size, training=False)
        student = make(teacher, calibration)
        if student is None:
            return ""
        files.save_model(student, path)
        return path

    def _thin_student(self, ratio):
        """The teacher's architecture at the width whose parameters are closest
        to the teacher's / ratio, freshly initialised (seeded per run)."""
        path = os.path.join(self.teacher_dir, "students", f"thin-{ratio:g}.keras")
        if os.path.exists(path):
            return path
        from micik_tf import files

        model = thin_model(self.protocol, self.teacher_info, self.teacher_info["params"] / ratio)
        files.save_model(model, path)
        return path

    def _tfmot(self, regime, ratio, seed, lr):
        """One tfmot cell, in a subprocess with tf_keras (see tfmot_baseline.py)."""
        p = self.protocol
        weights = self._teacher_weights()
        source = self.data()
        spec = dict(dataset=p.dataset, validation_fraction=p.validation_fraction,
                    train_fraction=regime.train_fraction, arch=p.arch, width=p.width,
                    input_shape=list(source.input_shape), num_classes=source.num_classes,
                    teacher_weights=weights, ratio=ratio, epochs=regime.epochs,
                    batch_size=p.batch_size, learning_rate=lr, seed=seed,
                    augment=list(p.augment), steps_per_epoch=p.steps_per_epoch)
        # One spec and result per cell: workers may run tfmot cells at once.
        key = f"{regime.train_fraction:g}-{ratio:g}-{seed}-{lr:g}"
        spec_path = os.path.join(self.work, "tfmot", f"spec-{key}.json")
        out = os.path.join(self.work, "tfmot", f"result-{key}.json")
        write_json(spec_path, spec)
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "tfmot_baseline.py"),
             f"--spec={spec_path}", f"--out={out}"],
            capture_output=True, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
        )
        if result.returncode != 0:
            return {"accuracy": None, "error": "tfmot: " + result.stderr.strip()[-300:]}
        row = read_json(out)
        return {k: row[k] for k in ("params", "achieved_ratio", "accuracy_before_recovery",
                                    "accuracy", "val_accuracy", "best_epoch",
                                    "wall_seconds", "tfmot_version", "sparsity_per_kernel")} | {
            "tflite_int8_gzip_bytes": row["tflite_int8_gzip_bytes"],
            "tflite_int8_bytes": row["tflite_int8_bytes"], "epochs": regime.epochs,
            "git_commit": git_commit()}

    # -- results ------------------------------------------------------------------------

    def results(self):
        p = self.protocol
        self.learning_rates = self.tuned_rates()
        cells = [r for r in self.rows if r["phase"] == "cells"]
        rows = list(cells)
        for regime_name, regime in p.regimes:
            for alias, source in ALIASES.items():
                if alias in regime.methods:
                    rows += [dict(r, method=alias, same_run_as=source) for r in cells
                             if r["method"] == source and r["regime"] == regime_name]
        if p.tune:
            write_json(os.path.join(self.work, "tuned_learning_rates.json"),
                       {"learning_rates": self.learning_rates})
        summary = summarize(rows)
        return {
            "dataset": p.dataset,
            "protocol": {
                "arch": p.arch, "width": p.width, "teacher_epochs": p.teacher_epochs,
                "validation_fraction": p.validation_fraction, "batch_size": p.batch_size,
                "augment": list(p.augment),
                "regimes": {name: dataclasses.asdict(r) for name, r in p.regimes},
                "learning_rate_grid": list(p.lr_grid) if p.tune else None,
                "tuned_at": list(p.tune_at) if p.tune else None,
            },
            "teacher": self.teacher_info,
            "learning_rates": self.learning_rates,
            "tuning": {m: {str(lr): v for lr, v in t.items()}
                       for m, t in getattr(self, "tuning", {}).items()},
            "rows": rows,
            "summary": summary,
            "verdicts": compare(summary),
            "ablations": ablation_worth(summary),
        }


def thin_model(protocol, teacher, target_params, search=400):
    """The teacher's architecture at the width whose parameter count is closest
    to `target_params` (channels round to integers, so the match is a step
    function of the width; the closest step is taken)."""
    from micik_tf import models

    source_shape, classes = tuple(teacher["input_shape"]), teacher["num_classes"]
    best = None
    for i in range(1, search + 1):
        width = protocol.width * i / search
        try:
            params = models.build(protocol.arch, source_shape, classes, width=width).count_params()
        except ValueError:  # too narrow to build (a transformer's key_dim of 0)
            continue
        if best is None or abs(params - target_params) < abs(best[1] - target_params):
            best = (width, params)
        if params > 1.5 * target_params:
            break
    return models.build(protocol.arch, source_shape, classes, width=best[0])


# --- tables ------------------------------------------------------------------------------


def summarize(rows):
    """Mean and standard deviation over seeds of each (regime, method, ratio)."""
    cells = {}
    for row in rows:
        cells.setdefault((row["regime"], row["method"], row["ratio"]), []).append(row)
    summary = []
    for (regime, method, ratio), group in sorted(cells.items(), key=lambda kv: (
            _cell_order((kv[0][0], kv[0][2])), _order(kv[0][1]))):
        ok = [r for r in group if r.get("accuracy") is not None]
        cell = {"regime": regime, "method": method, "ratio": ratio, "seeds": len(ok)}
        if not ok:
            summary.append(dict(cell, error=group[0].get("error")))
            continue
        for key in ("accuracy", "accuracy_before_recovery"):
            values = [r[key] for r in ok]
            cell[f"{key}_mean"] = statistics.mean(values)
            cell[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("params", "achieved_ratio", "tflite_int8_gzip_bytes", "wall_seconds"):
            # A seed whose int8 file failed its check has no bytes (its row
            # says why); the cell's bytes are the other seeds'.
            values = [r[key] for r in ok if r.get(key) is not None]
            cell[key] = statistics.mean(values) if values else None
        summary.append(cell)
    return summary


def _order(method):
    names = list(METHODS) + list(ALIASES)
    return names.index(method) if method in names else len(names)


def compare(summary):
    """Per regime and ratio: MICIK against the best equal-budget baseline, and
    against the thin network given the teacher's budget. A margin counts as a
    win or a loss only beyond both cells' seed spread (std) added."""
    cells = {(c["regime"], c["method"], c["ratio"]): c for c in summary if c["seeds"]}
    out = []
    for regime, ratio in sorted({(c["regime"], c["ratio"]) for c in summary}, key=_cell_order):
        rivals = [cells[(regime, m, ratio)] for m in BASELINES if (regime, m, ratio) in cells]
        for mode in MICIK_MODES:
            micik = cells.get((regime, mode, ratio))
            if micik is None or not rivals:
                continue
            best = max(rivals, key=lambda c: c["accuracy_mean"])
            entry = {"regime": regime, "ratio": ratio, "mode": mode,
                     "micik": micik["accuracy_mean"], "micik_std": micik["accuracy_std"],
                     "seeds": micik["seeds"], **_verdict(micik, best, "baseline")}
            longer = cells.get((regime, "thin_teacher_budget", ratio))
            if longer is not None:
                entry.update(_verdict(micik, longer, "thin_teacher_budget"))
            out.append(entry)
    return out


REGIME_ORDER = ("limited", "limited_long", "full")


def _cell_order(key):
    regime, ratio = key
    return (REGIME_ORDER.index(regime) if regime in REGIME_ORDER else len(REGIME_ORDER), ratio)


def _verdict(micik, rival, prefix):
    margin = micik["accuracy_mean"] - rival["accuracy_mean"]
    spread = micik["accuracy_std"] + rival["accuracy_std"]
    verdict = "win" if margin > spread else "loss" if -margin > spread else "tie"
    return {prefix: rival["method"], f"{prefix}_accuracy": rival["accuracy_mean"],
            f"{prefix}_std": rival["accuracy_std"], f"{prefix}_margin_points": 100 * margin,
            f"{prefix}_verdict": verdict}


def ablation_worth(summary):
    """Full MICIK's mean accuracy minus each ablation's, in points, per
    regime and ratio (positive: the part helps), with both cells' spread."""
    cells = {(c["regime"], c["method"], c["ratio"]): c for c in summary if c["seeds"]}
    out = []
    for regime, ratio in sorted({(c["regime"], c["ratio"]) for c in summary}, key=_cell_order):
        for method, ablation, part in ABLATIONS:
            full, other = cells.get((regime, method, ratio)), cells.get((regime, ablation, ratio))
            if full is not None and other is not None:
                out.append({"regime": regime, "ratio": ratio, "part": part, "method": method,
                            "ablation": ablation,
                            "worth_points": 100 * (full["accuracy_mean"] - other["accuracy_mean"]),
                            "spread_points": 100 * (full["accuracy_std"] + other["accuracy_std"])})
    return out


def _bytes(value):
    return "-" if value is None else f"{value:,.0f}"


def markdown(result, command, stem="curve"):
    """The results as markdown; `stem` names the suite and its plots."""
    p, teacher = result["protocol"], result["teacher"]
    regimes = p["regimes"]
    # The rates of the methods this suite ran (vit_mha borrows all of the curve's).
    ran = {LR_OF.get(r["method"], r["method"]) for r in result["rows"]}
    rates = ', '.join(f'{m} {lr:g}' for m, lr in result['learning_rates'].items() if m in ran)
    rates = (f"each method's tuned learning rate ({rates}; grid {p['learning_rate_grid']} at "
             f"{p['tuned_at']})" if p["learning_rate_grid"] else
             f"the same learning rate for every method ({rates}; not tuned)")
    lines = [
        f"# {stem}{' (smoke)' if result['smoke'] else ''}{' (quick)' if result.get('quick') else ''}"
        + (f" (partial: {result['partial']['runs_done']} of {result['partial']['runs_planned']} "
           "runs; the suite is still running)" if result.get("partial") else ""),
        "",
        f"{result['dataset']}: teacher `{p['arch']}` (width {p['width']:g}), "
        f"{teacher['params']:,} parameters, trained {teacher['epochs']} epochs on the "
        f"training split less a fixed {p['validation_fraction']:.0%} validation split: test "
        f"accuracy **{teacher['accuracy']:.4f}** (best validation {max(teacher['val_accuracy']):.4f}, "
        f"last {teacher['val_accuracy'][-1]:.4f}). Its int8 post-training quantization: "
        f"{teacher['ptq_int8']['accuracy']:.4f}, {teacher['ptq_int8']['gzip_bytes']:,} gzip'd "
        f"bytes. Regimes: "
        + "; ".join(f"{name}: {r['train_fraction']:.0%} of the training split, {r['epochs']} "
                    f"recovery epochs, {r['seeds']} seed(s)" for name, r in regimes.items())
        + f". Batch {p['batch_size']}, Adam with a cosine decay from {rates}. "
        f"Written {result['written']} "
        f"by `{command}` at commit `{result['machine']['git_commit']}`.",
        "",
        f"![accuracy against stored parameters]({stem}.png)",
        "",
        f"![accuracy against gzip'd int8 bytes]({stem}_bytes.png)",
        "",
        "| regime | ratio | method | params | int8 .tflite gzip bytes | before recovery | after recovery |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in result["summary"]:
        if not c["seeds"]:
            lines.append(f"| {c['regime']} | {c['ratio']:g} | {c['method']} | - | - | - | "
                         f"failed: {str(c.get('error'))[:80]} |")
            continue
        lines.append(
            f"| {c['regime']} | {c['ratio']:g} | {c['method']} | {c['params']:,.0f} "
            f"| {_bytes(c['tflite_int8_gzip_bytes'])} "
            f"| {c['accuracy_before_recovery_mean']:.4f} ± {c['accuracy_before_recovery_std']:.4f} "
            f"| {c['accuracy_mean']:.4f} ± {c['accuracy_std']:.4f} |")
    lines += [
        "",
        "params: stored parameters (for the pruning methods, the nonzero ones), every variable "
        "counted once, BatchNorm statistics included; mean ± std over seeds. micik_no_common is "
        "per_layer's run (MICIK without a shared part is that configuration).",
        "",
        "MICIK against the best equal-budget baseline (per-layer SVD, LAMP pruning, tfmot, the "
        "thin network with the recovery budget), and against the thin network given the "
        "teacher's budget; a margin is a win or a loss only beyond both cells' std added "
        "(with one seed, any margin):",
        "",
        "| regime | ratio | MICIK mode | accuracy | best baseline | margin (points) | verdict | thin, teacher's budget | margin | verdict |",
        "|---|---:|---|---:|---|---:|---|---:|---:|---|",
    ]
    for v in result["verdicts"]:
        longer = (f"{v['thin_teacher_budget_accuracy']:.4f} | {v['thin_teacher_budget_margin_points']:+.2f} "
                  f"| {v['thin_teacher_budget_verdict']}" if "thin_teacher_budget" in v else "- | - | -")
        lines.append(
            f"| {v['regime']} | {v['ratio']:g} | {v.get('mode', 'micik')} | {v['micik']:.4f} | {v['baseline']} "
            f"{v['baseline_accuracy']:.4f} | {v['baseline_margin_points']:+.2f} "
            f"| {v['baseline_verdict']} | {longer} |")
    if result["ablations"]:
        parts = list(dict.fromkeys(a["part"] for a in result["ablations"]))
        lines += ["", "What each part is worth: the method's accuracy minus its ablation's "
                  "(the sparse unique part: micik_sparse minus micik), in points (positive: "
                  "the part helps; ± both cells' std added):",
                  "", "| regime | ratio | " + " | ".join(parts) + " |",
                  "|---|---:|" + "---:|" * len(parts)]
        worth = {(a["regime"], a["ratio"], a["part"]): a for a in result["ablations"]}
        for regime, ratio in sorted({(a["regime"], a["ratio"]) for a in result["ablations"]},
                                    key=_cell_order):
            lines.append(f"| {regime} | {ratio:g} | " + " | ".join(
                f"{worth[(regime, ratio, part)]['worth_points']:+.2f} ± "
                f"{worth[(regime, ratio, part)]['spread_points']:.2f}"
                if (regime, ratio, part) in worth else "-" for part in parts) + " |")
    lines.append("")
    return "\n".join(lines)


STYLES = {"micik": dict(color="C3", linewidth=2.5),
          "micik_sparse": dict(color="C4", linewidth=2.5), "per_layer": dict(color="C0"),
          "micik_common_sparse_gradual": dict(color="C6", linewidth=1.5, linestyle="--"),
          "micik_common_sparse_gradual_no_sequential": dict(color="C6", linewidth=2.5),
          "pruning": dict(color="C2"), "tfmot": dict(color="C2", linestyle=":"),
          "channels": dict(color="C5"),
          "thin": dict(color="C1"), "thin_teacher_budget": dict(color="C1", linestyle=":")}


def plot(result, path):
    """curve.png: accuracy against stored parameters; curve_bytes.png: against
    gzip'd int8 .tflite bytes; curve_teacher.png: the teacher's training curve.
    One panel per regime; ablations dashed. Returns the paths written."""
    folder = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]  # curve, or another suite's name
    written = []
    for name, key, label in ((f"{stem}.png", "params", "stored parameters"),
                             (f"{stem}_bytes.png", "tflite_int8_gzip_bytes",
                              "int8 .tflite, gzip'd bytes")):
        regimes = list(result["protocol"]["regimes"])
        fig, axes = figure(1, len(regimes), size=(6.5 * len(regimes), 5))
        axes = axes if len(regimes) > 1 else [axes]
        for ax, regime in zip(axes, regimes):
            _plot_regime(ax, result, regime, key, label)
        fig.tight_layout()
        target = os.path.join(folder, name)
        write_figure(fig, target)
        written.append(target)
    fig, ax = figure(size=(6, 4))
    teacher = result["teacher"]
    epochs = range(1, len(teacher["val_accuracy"]) + 1)
    ax.plot(epochs, teacher["val_accuracy"], marker="o", label="validation")
    ax.plot(epochs, teacher["train_accuracy"], marker=".", label="training (augmented)")
    ax.axhline(teacher["accuracy"], color="k", linestyle="--", label="test (final)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(f"teacher {result['protocol']['arch']}: training to a plateau")
    ax.legend()
    fig.tight_layout()
    target = os.path.join(folder, f"{stem}_teacher.png")
    write_figure(fig, target)
    return written + [target]


def _plot_regime(ax, result, regime, key, label):
    cells = [c for c in result["summary"]
             if c["regime"] == regime and c["seeds"] and c.get(key) is not None]
    for method in dict.fromkeys(c["method"] for c in cells):
        if method in ALIASES:
            continue
        points = sorted((c for c in cells if c["method"] == method), key=lambda c: c[key])
        style = STYLES.get(method, dict(linestyle="--", alpha=0.6, linewidth=1))
        ax.errorbar([c[key] for c in points], [c["accuracy_mean"] for c in points],
                    yerr=[c["accuracy_std"] for c in points], marker="o", capsize=3,
                    label=method, **style)
    teacher = result["teacher"]
    ax.axhline(teacher["accuracy"], color="k", linestyle="--", label="teacher")
    if key == "tflite_int8_gzip_bytes":
        ax.plot([teacher["ptq_int8"]["gzip_bytes"]], [teacher["ptq_int8"]["accuracy"]], "k*",
                markersize=12, label="teacher int8 PTQ")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy after recovery")
    ax.set_title(f"{result['dataset']}, {regime} data")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _worker_main():
    """`python benchmarks/curve.py --protocol=full --phase=cells --worker=0
    --workers=2 --output_dir=...`: one worker's share of a phase."""
    parser = argparse.ArgumentParser(description=_worker_main.__doc__)
    parser.add_argument("--protocol", required=True)
    parser.add_argument("--phase", choices=("tune", "cells"), required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--work_name", default=".curve_work")
    parser.add_argument("--methods", default="")
    args = parser.parse_args()
    protocol = _named_protocols()[args.protocol]
    suite = _Suite(protocol, os.path.join(args.output_dir, args.work_name),
                   lambda message: print(f"[worker {args.worker}] {message}", flush=True),
                   worker=args.worker, methods=[m for m in args.methods.split(",") if m])
    suite.teacher()
    suite.run(args.phase, args.worker, args.workers)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker_main()

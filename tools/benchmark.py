"""Benchmarks of micik_tf, one suite per run: results as JSON, a markdown
table and a plot (PNG), in --output_dir (benchmarks/results/).

Suites (the code of each is in benchmarks/<suite>.py, outside the installed package):
  curve           accuracy against size on Fashion-MNIST: MICIK (low-rank and
                  sparse unique parts) vs per-layer SVD, LAMP magnitude pruning,
                  structured (channel) pruning, tfmot's pruning and a thin
                  network distilled from scratch, at equal stored parameters,
                  on two limited budgets and the full data, with ablations and
                  3 seeds (many hours on 2 CPU cores, resumable; --quick for a
                  half-hour look).
  vit             a small Vision Transformer on Fashion-MNIST: MICIK vs per-layer
                  SVD at 2x, 4x and 8x on its attention and feed-forward weights.
  vit_mha         the same with keras.layers.MultiHeadAttention (its projections
                  compressed inside it), 2 seeds.
  deploy_axes     what a phone pays for every cell of curve and vit_mha: LiteRT
                  latency (1 and 2 threads), runtime memory, bytes and MACs of
                  the files they exported, and which method to pick under each
                  constraint (run after them).
  deploy          sizes, accuracy and TFLite latency of every export format,
                  teacher vs MICIK students stacked with pruning and int8.
  cost            compress() seconds on VGG-16 (138M), and train-step and
                  TFLite speed of a compressed model relative to its original.
  paper           the paper's headline ratios on VGG-16 and GoogLeNet (ImageNet
                  shapes), and what reproducing its accuracy takes on GPUs.
  scale           the ImageNet pipeline's and calibration's peak memory,
                  compress() seconds at 4x-16x with and without calibration,
                  and the train step's cost of pruning + QAT.

    python tools/benchmark.py --suite=curve
    python tools/benchmark.py --suite=deploy --smoke --output_dir=/tmp/smoke
    python tools/update_readme.py    # the README's Results section, from the files
"""

import datetime
import importlib
import json
import os
import platform
import shutil
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS

SUITES = ("curve", "vit", "vit_mha", "deploy_axes", "deploy", "cost", "paper", "scale")
# Each suite's ratios when --ratios is not given.
DEFAULT_RATIOS = {"curve": [], "vit": [], "vit_mha": [], "deploy_axes": [],
                  "cost": ["16"], "paper": [], "deploy": ["16"], "scale": []}


def define_flags():
    flags.DEFINE_enum("suite", None, SUITES, "Which benchmark suite to run.")
    flags.DEFINE_string("output_dir", "benchmarks/results", "Where <suite>.json and <suite>.md are written.")
    flags.DEFINE_list("ratios", None, "Target compression ratios, each > 1 (default: the "
                      "suite's own: " + "; ".join(f"{k} {','.join(v) or '-'}"
                                                  for k, v in DEFAULT_RATIOS.items()) + ").")
    flags.DEFINE_bool("quick", False, "curve: 1 seed, ratios 16 and 64, the limited regime, "
                      "no ablations (about half an hour once the teacher is trained).")
    flags.DEFINE_integer("workers", 1, "curve, vit_mha: processes sharing the runs (2 on 2 cores: "
                         "about 1.2x the throughput of one).", lower_bound=1)
    flags.DEFINE_list("parts", None, "scale: rerun only these parts (pipeline, calibration, "
                      "compress, train_step) and keep the others from the existing scale.json; "
                      "each part records the commit that measured it.")
    flags.DEFINE_bool("allow_dirty", False, "Run from a tree with uncommitted changes; the "
                      "results record that they were (`git_commit` ends in -dirty).")
    flags.DEFINE_list("methods", None, "curve, vit_mha: run only these methods' runs now "
                      "(e.g. those a change in progress leaves alone); the others stay "
                      "pending and the results are marked partial.")
    flags.DEFINE_bool("progress", False, "curve, vit_mha: write the results of the runs "
                      "recorded so far (marked partial), without running anything, while "
                      "the suite runs.")
    flags.DEFINE_bool("rerender", False, "Rewrite <suite>.md (and its plot) from the "
                      "existing <suite>.json in --output_dir, without running anything.")
    flags.DEFINE_bool("smoke", False, "Tiny models and a step or two of training, so the "
                      "suite runs in well under a minute (for tests).")
    flags.register_validator("ratios", _ratios_valid, message="--ratios must be numbers > 1, e.g. --ratios=4,16")
    flags.mark_flag_as_required("suite")


def _ratios_valid(values):
    if values is None:
        return True
    try:
        return len(values) > 0 and all(float(v) > 1 for v in values)
    except ValueError:
        return False


def _check_methods(suite, methods):
    if suite not in ("curve", "vit_mha"):
        raise app.UsageError("--methods is for --suite=curve and --suite=vit_mha only.")
    from benchmarks import curve

    unknown = sorted(set(methods) - set(curve.METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown method(s) {', '.join(unknown)}; the "
                             f"suite's methods are {', '.join(sorted(curve.METHODS))}.")


def git_commit():
    from benchmarks.common import git_commit as commit

    return commit()


def _library(suite):
    return importlib.import_module(f"benchmarks.{suite}")


def _run(suite, ratios, smoke):
    """Runs one suite; returns `(result, folder to delete afterwards or None)`."""
    lib = _library(suite)
    if suite == "curve" and FLAGS.progress:
        return lib.progress(lib.protocol_for(FLAGS.quick, smoke), FLAGS.output_dir)
    if suite == "curve":
        return lib.run_suite(lib.protocol_for(FLAGS.quick, smoke), FLAGS.output_dir,
                             workers=FLAGS.workers, methods=FLAGS.methods)
    if suite == "vit_mha" and FLAGS.progress:
        return lib.progress(smoke, FLAGS.output_dir)
    if suite == "vit_mha":
        return lib.run_suite(smoke, FLAGS.output_dir, methods=FLAGS.methods,
                             workers=FLAGS.workers)
    if suite == "scale" and FLAGS.parts:
        return lib.rerun_parts(FLAGS.parts, os.path.join(FLAGS.output_dir, "scale.json"),
                               git_commit(), smoke), None
    if suite in ("vit", "vit_mha", "deploy_axes"):
        return lib.run_suite(smoke, FLAGS.output_dir)
    if suite in ("paper", "scale"):
        return lib.run_suite(smoke), None
    return lib.run_suite(ratios[0], smoke), None


def _machine():
    import keras
    import numpy as np
    import tensorflow as tf

    import micik_tf

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "micik_tf": micik_tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "git_commit": git_commit(),
    }


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _command(suite, result):
    """The command line that rewrites this suite's results."""
    parts = [f"python tools/benchmark.py --suite={suite}"]
    if FLAGS["ratios"].present:
        parts.append(f"--ratios={','.join(FLAGS.ratios)}")
    if result.get("quick"):
        parts.append("--quick")
    if result.get("partial"):
        parts.append("--progress")
    if result["smoke"]:
        parts.append("--smoke")
    if result.get("part_commits") and FLAGS.parts:
        parts.append(f"--parts={','.join(FLAGS.parts)}")
    return " ".join(parts)


def _write_outputs(suite, result):
    """Writes <suite>.json, <suite>.md and the suite's plot (if any)."""
    from micik_tf.files import write_text

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    json_path = os.path.join(FLAGS.output_dir, f"{suite}.json")
    md_path = os.path.join(FLAGS.output_dir, f"{suite}.md")
    # The command that wrote the results travels with them, so the table
    # (here and in the README) can be rebuilt from the JSON alone.
    result.setdefault("command", _command(suite, result))
    write_text(json_path, json.dumps(result, indent=2) + "\n")
    write_text(md_path, _library(suite).markdown(result, result["command"]))
    png_path = os.path.join(FLAGS.output_dir, f"{suite}.png")
    plots = _library(suite).plot(result, png_path) or [png_path]
    return [json_path, md_path, *plots]


def _rerender(suite):
    path = os.path.join(FLAGS.output_dir, f"{suite}.json")
    if not os.path.exists(path):
        raise app.UsageError(f"--rerender: no {path}; run the suite first.")
    with open(path) as f:
        result = json.load(f)
    print(f"rewrote {', '.join(_write_outputs(suite, result))}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # TF's checkpoint code logs every save at INFO through absl.
    logging.set_verbosity(logging.WARNING)
    suite = FLAGS.suite
    if FLAGS.progress and suite not in ("curve", "vit_mha"):
        raise app.UsageError("--progress is for --suite=curve and --suite=vit_mha only.")
    if FLAGS.parts and suite != "scale":
        raise app.UsageError("--parts is for --suite=scale only.")
    if FLAGS.methods:
        _check_methods(suite, FLAGS.methods)
    if FLAGS.rerender:
        return _rerender(suite)
    ratios = [float(r) for r in (FLAGS.ratios if FLAGS.ratios is not None else DEFAULT_RATIOS[suite])]
    commit = git_commit()
    # Results go into the README and must say which code wrote them; smoke
    # runs (tests, scratch folders) are exempt.
    if commit and commit.endswith("-dirty") and not (FLAGS.allow_dirty or FLAGS.smoke):
        print("benchmark.py: error: the tree has uncommitted changes, so the results could "
              "not name the code that wrote them. Commit first, or pass --allow_dirty (the "
              "results then say so).", file=sys.stderr)
        return 2
    started = time.perf_counter()
    load_before = _load_average()
    result, work = _run(suite, ratios, FLAGS.smoke)
    machine = _machine()
    result.update(
        suite=suite,
        smoke=FLAGS.smoke,
        quick=FLAGS.quick,
        # The commit that wrote the results, at the top where readers look.
        git_commit=machine["git_commit"],
        dirty=bool(machine["git_commit"] and machine["git_commit"].endswith("-dirty")),
        ratios=ratios,
        machine=dict(machine, load_average_1min_at_start=load_before),
        written=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds_total=time.perf_counter() - started,
    )
    written = _write_outputs(suite, result)
    if work is not None:
        # The suite's resumable state: done with once the results are written.
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    # The suites live in benchmarks/ beside tools/, outside the installed package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))

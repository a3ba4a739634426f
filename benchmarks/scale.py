"""Paper scale: bounded memory, compress() speed at every ratio, and training
steps that stay on the device.

Parts, each measured in a process of its own (so that its peak resident
memory is its own and nothing else it ran is cached):

  pipeline     the ImageNet flagfile's training pipeline, 200 steps of its batch,
               on mock 224x224 TFDS data of 20,000 and of 5,000 examples: peak
               resident memory and examples per second of the pipeline alone.
  calibration  compress(VGG16(weights=None), ratio=8, calibration_data=N
               images at 224x224) for N = 16 and 128: peak resident memory
               above the model's own footprint, and seconds.
  compress     compress() of VGG16(weights=None) at 4x, 8x and 16x, MICIK and
               per-layer, calibration off and on (32 images), in one process:
               seconds, the seconds of each step, and the overall relative
               weight error.
  train_step   the recovery step on the CIFAR-size VGG-16 compressed 16x, with
               pruning and int8 QAT on against off, interleaved in one run:
               the examples-per-second ratio.

    python tools/benchmark.py --suite=scale
    python benchmarks/scale.py --part=pipeline --examples=20000   # one part, JSON on stdout
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {
    "pipeline_peak_rss_gb": 3.0,
    "calibration_extra_rss_gb": 3.0,
    "compress_seconds": 30.0,
    "compress_micik_over_per_layer": 1.5,
    "train_step_slowdown": 0.15,
}
PIPELINE_STEPS = 200


def _rss_gb():
    """Peak resident memory of this process so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# --- the parts, each run in its own process -----------------------------------------


def part_pipeline(examples, smoke):
    """The ImageNet VGG-16 flagfile's data pipeline on mock data."""
    import tensorflow_datasets as tfds
    from absl import flags

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train as train_tool

    from micik_tf.job.data import load_data

    train_tool.define_flags()
    flagfile = os.path.join(ROOT, "flags", "imagenet_vgg16.cfg")
    argv = ["scale", f"--flagfile={flagfile}", "--model_dir=/tmp/micik_scale_pipeline"]
    if smoke:
        argv += ["--image_size=32", "--batch_size=8"]
    flags.FLAGS(argv)
    config = train_tool.config_from_flags()
    steps = 4 if smoke else PIPELINE_STEPS
    with tfds.testing.mock_data(num_examples=examples):
        data = load_data(config)
        done, epoch, tic = 0, 0, time.perf_counter()
        while done < steps:
            for _ in data.train_epoch(epoch):
                done += 1
                if done == steps:
                    break
            epoch += 1
        seconds = time.perf_counter() - tic
    return {"examples": examples, "steps": steps, "batch_size": config.batch_size,
            "image_size": config.image_size, "shuffle_buffer": config.shuffle_buffer,
            "cached": data.cached, "seconds": seconds,
            "examples_per_second": steps * config.batch_size / seconds,
            "peak_rss_gb": _rss_gb()}


def _vgg16(smoke):
    import keras

    if smoke:
        from micik_tf import models

        return models.cifar_vgg16((32, 32, 3), 10, dense=64, width=0.125), (32, 32, 3)
    return keras.applications.VGG16(weights=None), (224, 224, 3)


def part_calibration(images, smoke):
    """compress(VGG16, ratio 8) with N calibration images: memory above the model's."""
    import numpy as np

    import keras

    import micik_tf

    keras.utils.set_random_seed(0)
    model, shape = _vgg16(smoke)
    data = np.random.default_rng(0).random((images,) + shape, dtype=np.float32) * 255
    baseline = _current_rss_gb()
    tic = time.perf_counter()
    timings = {}
    micik_tf.compress(model, ratio=8, calibration_data=data, calibration_batches=math.ceil(
        images / 32), verbose=0, timings=timings, min_rank=1 if smoke else None)
    seconds = time.perf_counter() - tic
    data_gb = data.nbytes / 2**30
    return {"images": images, "seconds": seconds, "timings": timings,
            "model_and_data_rss_gb": baseline, "calibration_data_gb": data_gb,
            "peak_rss_gb": _rss_gb(), "extra_rss_gb": _rss_gb() - baseline}


def part_compress(smoke):
    """compress() at 4x, 8x, 16x, both modes, calibration off and on."""
    import numpy as np

    import keras

    import micik_tf
    from micik_tf.compression import decomposition

    keras.utils.set_random_seed(0)
    model, shape = _vgg16(smoke)
    kernels = {l.name: decomposition.kernel_matrix(keras.ops.convert_to_numpy(l.kernel))
               for l in model.layers if hasattr(l, "kernel")}
    norm = sum(float(np.sum(np.square(k.astype(np.float64)))) for k in kernels.values())
    calibration = np.random.default_rng(0).random((32,) + shape, dtype=np.float32) * 255
    runs = []
    for calibrated in (False, True):
        for ratio in (4.0, 8.0, 16.0):
            for mode in ("micik", "per_layer"):
                timings = {}
                tic = time.perf_counter()
                compressed = micik_tf.compress(
                    model, ratio=ratio, mode=mode, verbose=0, timings=timings,
                    calibration_data=calibration if calibrated else None, calibration_batches=1,
                    min_rank=1 if smoke else None)
                seconds = time.perf_counter() - tic
                rep = micik_tf.report(compressed, reference=model)
                residual = sum(l["relative_error"] ** 2 * float(np.sum(np.square(
                    kernels[l["name"]].astype(np.float64)))) for l in rep.layers)
                runs.append({"mode": mode, "ratio": ratio, "calibration": calibrated,
                             "seconds": seconds, "timings": timings,
                             "achieved_ratio": rep.ratio,
                             "overall_relative_error": math.sqrt(residual / norm)})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                del compressed
    return {"model_params": int(model.count_params()), "runs": runs}


def part_train_step(smoke):
    """Examples per second of the recovery step, pruning + QAT on against off."""
    import numpy as np

    import keras
    import tensorflow as tf

    import micik_tf
    from micik_tf import models
    from micik_tf.deploy.pruning import ConstantSparsity, MagnitudePruner
    from micik_tf.deploy.quantization import WeightQuantizer
    from micik_tf.recovery.trainer import RecoveryConfig, RecoveryTrainer

    keras.utils.set_random_seed(0)
    width, batch = (0.125, 8) if smoke else (1.0, 64)
    teacher = models.cifar_vgg16((32, 32, 3), 10, dense=64 if smoke else 512, width=width)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype("int32")
    strategy = tf.distribute.get_strategy()
    trainers = {}
    for name, stacked in (("plain", False), ("pruning_qat", True)):
        student = micik_tf.compress(teacher, ratio=16, verbose=0, min_rank=1 if smoke else None)
        # Pruning re-ranks every step and QAT rounds every step: the worst case.
        pruner = MagnitudePruner(student, ConstantSparsity(0.5, 0, frequency=1)) if stacked else None
        quantizer = WeightQuantizer(student, begin_step=0) if stacked else None
        trainers[name] = RecoveryTrainer(teacher, student, strategy,
                                         RecoveryConfig(batch_size=batch), f"/tmp/scale_{name}",
                                         steps_per_epoch=10, verbose=0, pruner=pruner,
                                         quantizer=quantizer)
    seconds = {name: 0.0 for name in trainers}
    blocks, steps = (2, 2) if smoke else (5, 10)
    for trainer in trainers.values():
        trainer.train_step(x, y, tf.constant(1, tf.int64))  # traces it
    for block in range(blocks):
        for name, trainer in trainers.items():
            tic = time.perf_counter()
            for i in range(steps):
                trainer.train_step(x, y, tf.constant(2 + block * steps + i, tf.int64))
            int(trainer.step.numpy())  # waits for the device
            seconds[name] += time.perf_counter() - tic
    rate = {name: blocks * steps * batch / s for name, s in seconds.items()}
    return {"model": f"cifar_vgg16 (32x32x3, width {width:g}) compressed 16x",
            "batch": batch, "examples_per_second": rate,
            "slowdown": 1 - rate["pruning_qat"] / rate["plain"],
            "pruning": "every step, to 50% per factor", "qat": "every step, int8"}


PARTS = {"pipeline": part_pipeline, "calibration": part_calibration,
         "compress": part_compress, "train_step": part_train_step}


# --- the suite ------------------------------------------------------------------------


def _child(part, smoke, **kwargs):
    args = [sys.executable, os.path.abspath(__file__), f"--part={part}"]
    args += [f"--{k}={v}" for k, v in kwargs.items()] + (["--smoke"] if smoke else [])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"scale part {part} failed: {result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_suite(smoke=False, parts=tuple(PARTS), log=print):
    sizes = {"pipeline": (5000, 20000) if not smoke else (16, 64),
             "calibration": (16, 128) if not smoke else (2, 8)}
    result = {"targets": TARGETS}
    if "pipeline" in parts:
        result["pipeline"] = [_child("pipeline", smoke, examples=n) for n in sizes["pipeline"]]
        log(f"pipeline: {result['pipeline']}")
    if "calibration" in parts:
        result["calibration"] = [_child("calibration", smoke, images=n)
                                 for n in sizes["calibration"]]
        log(f"calibration: {result['calibration']}")
    if "compress" in parts:
        result["compress"] = _child("compress", smoke)
        log(f"compress: {len(result['compress']['runs'])} runs")
    if "train_step" in parts:
        result["train_step"] = _child("train_step", smoke)
        log(f"train_step: {result['train_step']}")
    result["verdicts"] = verdicts(result)
    return result


def rerun_parts(parts, path, commit, smoke=False, log=print):
    """Reruns `parts` and keeps the others' results from the file at `path`.

    Every part records the commit that measured it in `part_commits` (parts
    kept from a file without that record take the file's `git_commit`).
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; the parts are {sorted(PARTS)}.")
    with open(path) as f:
        old = json.load(f)
    if bool(old.get("smoke")) != smoke:
        raise ValueError(f"--parts: {path} is {'a smoke' if old.get('smoke') else 'a full'} "
                         "run; rerun the whole suite instead.")
    fresh = run_suite(smoke, parts=tuple(parts), log=log)
    commits = dict(old.get("part_commits") or {p: old["git_commit"] for p in PARTS if p in old})
    result = {"targets": TARGETS}
    for part in PARTS:
        if part in fresh:
            result[part], commits[part] = fresh[part], commit
        elif part in old:
            result[part] = old[part]
    result["part_commits"] = commits
    result["verdicts"] = verdicts(result)
    return result


def verdicts(result):
    """Each target, the measured value, and whether it was met."""
    out = []
    for run in result.get("pipeline", []):
        out.append(("pipeline peak RSS (GB)", f"{run['examples']:,} examples",
                    run["peak_rss_gb"], TARGETS["pipeline_peak_rss_gb"], "<="))
    for run in result.get("calibration", []):
        out.append(("calibration RSS above the model and data (GB)", f"{run['images']} images",
                    run["extra_rss_gb"], TARGETS["calibration_extra_rss_gb"], "<="))
    runs = result.get("compress", {}).get("runs", [])
    for run in runs:
        if run["mode"] == "micik":
            out.append(("compress() seconds", f"micik {run['ratio']:g}x, calibration "
                        f"{'on' if run['calibration'] else 'off'}", run["seconds"],
                        TARGETS["compress_seconds"], "<="))
            twin = next(r for r in runs if r["mode"] == "per_layer" and r["ratio"] == run["ratio"]
                        and r["calibration"] == run["calibration"])
            out.append(("MICIK / per-layer seconds", f"{run['ratio']:g}x, calibration "
                        f"{'on' if run['calibration'] else 'off'}", run["seconds"] / twin["seconds"],
                        TARGETS["compress_micik_over_per_layer"], "<="))
    if "train_step" in result:
        out.append(("train step slowdown, pruning + QAT", "cifar_vgg16 16x",
                    result["train_step"]["slowdown"], TARGETS["train_step_slowdown"], "<="))
    return [{"measure": m, "case": c, "value": v, "target": t, "met": v <= t}
            for m, c, v, t, _ in out]


def markdown(result, command):
    lines = [f"# scale{' (smoke)' if result['smoke'] else ''}", "",
             f"Written {result['written']} by `{command}` at commit "
             f"`{result['machine']['git_commit']}`, {result['machine']['cpu_count']} CPU cores, "
             f"GPUs: {result['machine']['gpus'] or 'none'}."
             + ("" if not result.get("part_commits") else " Parts measured at commits: "
                + ", ".join(f"{k} `{v[:7]}`" for k, v in result["part_commits"].items()) + "."),
             "",
             "| measure | case | measured | target | met |", "|---|---|---:|---:|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['measure']} | {v['case']} | {v['value']:.2f} | {v['target']:g} "
                     f"| {'yes' if v['met'] else 'no'} |")
    for run in result.get("pipeline", []):
        lines.append("")
        lines.append(f"- pipeline, {run['examples']:,} examples: {run['examples_per_second']:.0f} "
                     f"examples/s over {run['steps']} steps of {run['batch_size']} "
                     f"(shuffle buffer {run['shuffle_buffer']}, cached: {run['cached']}).")
    for run in result.get("calibration", []):
        lines.append(f"- calibration, {run['images']} images: {run['seconds']:.1f} s "
                     f"({', '.join(f'{k} {v:.1f}' for k, v in run['timings'].items())}).")
    runs = result.get("compress", {}).get("runs", [])
    if runs:
        lines += ["", "| mode | ratio | calibration | seconds | calibration s | spectra s "
                  "| common ranks s | allocation s | building s | overall rel. error |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            t = r["timings"]
            lines.append(
                f"| {r['mode']} | {r['ratio']:g} | {'on' if r['calibration'] else 'off'} "
                f"| {r['seconds']:.1f} | {t.get('calibration', 0):.1f} "
                f"| {t.get('per_layer_spectra', 0):.1f} | {t.get('common_ranks', 0):.1f} "
                f"| {t.get('allocation', 0):.1f} | {t.get('building', 0):.1f} "
                f"| {r['overall_relative_error']:.4f} |")
    if "train_step" in result:
        step = result["train_step"]
        lines += ["", f"- train step, {step['model']}, batch {step['batch']}: "
                  + ", ".join(f"{k} {v:.1f} examples/s" for k, v in
                              step["examples_per_second"].items())
                  + f" ({step['pruning']}; QAT {step['qat']})."]
    lines.append("")
    return "\n".join(lines)


def plot(result, path):
    from micik_tf.files import write_figure

    from benchmarks.common import figure

    runs = result.get("compress", {}).get("runs", [])
    fig, ax = figure(size=(8, 4))
    steps = ("calibration", "per_layer_spectra", "common_ranks", "allocation", "building")
    labels = [f"{r['mode']} {r['ratio']:g}x {'cal' if r['calibration'] else ''}" for r in runs]
    bottom = [0.0] * len(runs)
    for step in steps:
        values = [r["timings"].get(step, 0.0) for r in runs]
        ax.bar(range(len(runs)), values, bottom=bottom, label=step)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(TARGETS["compress_seconds"], color="k", linestyle="--", label="target")
    ax.set_xticks(range(len(runs)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("compress() seconds, by step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(fig, path)
    return [path]


def _main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--examples", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    kwargs = {k: v for k, v in (("examples", args.examples), ("images", args.images))
              if v is not None}
    print(json.dumps(PARTS[args.part](smoke=args.smoke, **kwargs)))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _main()

"""The paper's headline beside what `compress()` does to the same networks.

MICIK (Zhang et al., arXiv 1902.00918) reports 16x fewer parameters on VGG-16
and 6x on GoogLeNet, on ImageNet, with no loss of accuracy. Here both
ImageNet networks are compressed at those ratios (structure only: random
weights, since neither ImageNet nor its pretrained weights can be reached
from the build machine), and the suite prints what reproducing the accuracy
takes: the command, and the compute it needs on GPUs.
"""

import time

IMAGENET_TRAIN_IMAGES = 1_281_167
# An assumption, not a measurement: sustained mixed-precision throughput of
# one data-centre GPU (A100/H100 class) on convolutional training.
ASSUMED_TFLOPS_PER_GPU = 30.0

PAPER = (
    {
        "network": "VGG-16",
        "paper_ratio": 16.0,
        "paper_claim": "16x fewer parameters on ImageNet, no top-1/top-5 loss",
        "flagfile": "flags/imagenet_vgg16.cfg",
        "gpus": 8,
    },
    {
        "network": "GoogLeNet",
        "paper_ratio": 6.0,
        "paper_claim": "6x fewer parameters on ImageNet, no top-1/top-5 loss",
        "flagfile": "flags/imagenet_googlenet.cfg",
        "gpus": 8,
    },
)


def _build(network, smoke):
    import keras

    from micik_tf import models

    if network == "VGG-16":
        if smoke:
            return models.cifar_vgg16((32, 32, 3), 10, dense=64, width=0.125)
        return keras.applications.VGG16(weights=None)
    if smoke:
        return models.googlenet((32, 32, 3), 10)
    return models.googlenet((224, 224, 3), 1000)


def _flag(path, name, default=None):
    import os

    # benchmarks/ is beside flags/ in the repository (it is not installed).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, path)) as f:
        for line in f:
            if line.startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    return default


def run_suite(smoke=False, log=print):
    import keras

    import micik_tf
    from micik_tf.deploy import macs

    rows = []
    for entry in PAPER:
        keras.utils.set_random_seed(0)
        model = _build(entry["network"], smoke)
        tic = time.perf_counter()
        # The smoke models are too small for compress()'s default rank floor.
        compressed = micik_tf.compress(model, ratio=entry["paper_ratio"], verbose=0,
                                       min_rank=1 if smoke else None)
        seconds = time.perf_counter() - tic
        rep = micik_tf.report(compressed)
        teacher_macs = macs.forward_macs(model)["total"]
        student_macs = macs.forward_macs(compressed)["total"]
        epochs = int(_flag(entry["flagfile"], "epochs", 20))
        # Recovery per image: the teacher's forward pass, and the student's
        # forward and backward passes (about three forwards). 2 FLOPs per MAC.
        flops = 2 * (teacher_macs + 3 * student_macs) * IMAGENET_TRAIN_IMAGES * epochs
        gpu_hours = flops / (ASSUMED_TFLOPS_PER_GPU * 1e12) / 3600
        # A flagfile that trains its own teacher (no pretrained weights exist
        # in Keras for GoogLeNet) also pays for that: forward and backward.
        teacher_epochs = (int(_flag(entry["flagfile"], "teacher_epochs", 0))
                          if _flag(entry["flagfile"], "teacher") == "train" else 0)
        teacher_flops = 2 * 3 * teacher_macs * IMAGENET_TRAIN_IMAGES * teacher_epochs
        teacher_gpu_hours = teacher_flops / (ASSUMED_TFLOPS_PER_GPU * 1e12) / 3600
        rows.append(dict(
            entry,
            params_before=rep.params_before, params_after=rep.params_after,
            achieved_ratio=rep.ratio,
            shared_bases=[{"name": g["name"], "members": len(g["members"]),
                           "rank_common": g["rank_common"]} for g in rep.groups],
            compress_seconds=seconds,
            macs_before=teacher_macs, macs_after=student_macs,
            recovery_epochs=epochs,
            recovery_pflops=flops / 1e15,
            gpu_hours_at_assumed_throughput=gpu_hours,
            teacher_training_epochs=teacher_epochs,
            teacher_training_gpu_hours=teacher_gpu_hours,
            command=f"python tools/train.py --flagfile={entry['flagfile']} --data_dir=<tfds data dir>",
        ))
        log(f"{entry['network']}: {rep.params_before:,} -> {rep.params_after:,} "
            f"({rep.ratio:.2f}x, paper {entry['paper_ratio']:g}x), MACs "
            f"{teacher_macs / student_macs:.2f}x fewer, compress() {seconds:.1f}s")
    return {
        "note": ("Structure only: random weights (no ImageNet data or weights here), so no "
                 "accuracy is measured. GPU hours assume a sustained "
                 f"{ASSUMED_TFLOPS_PER_GPU:g} TFLOP/s per GPU."),
        "assumed_tflops_per_gpu": ASSUMED_TFLOPS_PER_GPU,
        "rows": rows,
    }


def markdown(result, command):
    lines = [
        f"# paper{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Written {result['written']} by `{command}`. {result['note']}",
        "",
        "| network | paper | params before | params after | achieved | forward MACs | "
        "compress() s | recovery compute |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['network']} | {r['paper_claim']} | {r['params_before']:,} | {r['params_after']:,} "
            f"| {r['achieved_ratio']:.2f}x | {r['macs_before'] / r['macs_after']:.2f}x fewer "
            f"| {r['compress_seconds']:.1f} | {r['recovery_pflops']:,.0f} PFLOP, "
            f"~{r['gpu_hours_at_assumed_throughput']:,.1f} GPU-hours |"
        )
    lines += ["", "To reproduce the accuracy (ImageNet prepared for TFDS, GPUs, "
              "`tensorflow[and-cuda]`; see BUILD_NOTES.md):", ""]
    for r in result["rows"]:
        teacher = ""
        if r["teacher_training_epochs"]:
            teacher = (f", after training the teacher for {r['teacher_training_epochs']} epochs "
                       f"(~{r['teacher_training_gpu_hours'] / r['gpus']:,.1f} h more; pass a trained "
                       "one with --teacher=<file.keras> to skip it)")
        lines.append(f"    {r['command']}")
        lines.append(f"    # {r['network']}: {r['recovery_epochs']} recovery epochs on {r['gpus']} "
                     f"GPUs, ~{r['gpu_hours_at_assumed_throughput'] / r['gpus']:,.1f} h{teacher}")
    lines.append("")
    return "\n".join(lines)


def plot(result, path):
    """Parameters and forward MACs before and after, per network."""
    from benchmarks.common import figure

    from micik_tf.files import write_figure

    fig, axes = figure(1, 2, size=(10, 4))
    names = [r["network"] for r in result["rows"]]
    for ax, (before, after, label) in zip(axes, (("params_before", "params_after", "parameters"),
                                                 ("macs_before", "macs_after", "forward MACs"))):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [r[before] for r in result["rows"]], 0.4, label="original")
        ax.bar([x + 0.2 for x in xs], [r[after] for r in result["rows"]], 0.4, label="MICIK")
        ax.set_xticks(list(xs), names)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("The paper's ratios (VGG-16 16x, GoogLeNet 6x) on the ImageNet shapes")
    fig.tight_layout()
    write_figure(fig, path)

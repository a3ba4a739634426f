"""What compression costs and buys at run time, as ratios in one run.

  - `compress()` seconds on the 138M-parameter ImageNet VGG-16 shape
    (`keras.applications.VGG16(weights=None)`; ImageNet weights cannot be
    downloaded here, and the time hardly depends on the values);
  - train-step throughput (examples per second of one supervised step,
    Adam + cross-entropy) of the compressed model relative to the original,
    on a CIFAR-size VGG-16 (15M parameters, 32x32x3 inputs);
  - TFLite CPU latency (batch 1, float32) of the same pair, and the ratio of
    their forward multiply-accumulates.

Timings of the two models are interleaved in blocks, so machine noise falls
on both alike; only ratios are meant to be compared across machines.
"""

import time

import numpy as np

BLOCKS = 5
STEPS_PER_BLOCK = 3
BATCH = 32


def _throughput(models, x, y, blocks=BLOCKS, steps=STEPS_PER_BLOCK):
    """Examples per second of `train_on_batch` for each model, interleaved."""
    import keras

    for model in models.values():
        model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.train_on_batch(x, y)  # traces the step
    seconds = {name: 0.0 for name in models}
    for _ in range(blocks):
        for name, model in models.items():
            tic = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            seconds[name] += time.perf_counter() - tic
    return {name: blocks * steps * len(x) / s for name, s in seconds.items()}


def run_suite(ratio=16.0, smoke=False, log=print):
    import os
    import shutil
    import tempfile

    import keras

    import micik_tf
    from micik_tf import models
    from micik_tf.deploy import latency, macs

    keras.utils.set_random_seed(0)
    # The smoke models are too small for compress()'s default rank floor.
    min_rank = 1 if smoke else None
    if smoke:
        big, big_name = models.cifar_vgg16((32, 32, 3), 10, dense=64, width=0.125), \
            "cifar_vgg16 at 1/8 width (smoke)"
    else:
        big, big_name = keras.applications.VGG16(weights=None), "VGG16(weights=None)"
    tic = time.perf_counter()
    micik_tf.compress(big, ratio=ratio, verbose=0, min_rank=min_rank)
    compress_seconds = time.perf_counter() - tic
    log(f"compress() {big_name} ({big.count_params():,} parameters) at {ratio:g}x: "
        f"{compress_seconds:.1f}s")
    del big

    width = 0.125 if smoke else 1.0
    original = models.cifar_vgg16((32, 32, 3), 10, dense=64 if smoke else 512, width=width)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype("int32")
    compressed = micik_tf.compress(original, ratio=ratio, verbose=0, min_rank=min_rank)
    throughput = _throughput({"original": original, "compressed": compressed}, x, y,
                             blocks=2 if smoke else BLOCKS, steps=1 if smoke else STEPS_PER_BLOCK)
    log(f"train step: {throughput['original']:.1f} vs {throughput['compressed']:.1f} examples/s")

    scratch = tempfile.mkdtemp(prefix="micik_cost_")
    try:
        paths = {}
        for name, model in (("original", original), ("compressed", compressed)):
            result = micik_tf.export(model, os.path.join(scratch, name), formats=("tflite",),
                                     check_data=x[:4])
            paths[name] = result["tflite"]["path"]
        lat = latency.median_latencies(paths, x[0], blocks=3 if smoke else latency.BLOCKS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"TFLite latency: {lat['original'] * 1e3:.2f} vs {lat['compressed'] * 1e3:.2f} ms")
    macs_original = macs.forward_macs(original)["total"]
    macs_compressed = macs.forward_macs(compressed)["total"]
    return {
        "compress": {"model": big_name, "ratio": ratio, "seconds": compress_seconds},
        "pair": {
            "model": f"cifar_vgg16 (32x32x3, 10 classes{', width 1/8' if smoke else ''}) "
                     f"and its MICIK {ratio:g}x compression",
            "params_original": int(original.count_params()),
            "params_compressed": int(compressed.count_params()),
            "macs_original": macs_original,
            "macs_compressed": macs_compressed,
            "train_batch": BATCH,
            "train_examples_per_second": throughput,
            "tflite_latency_seconds": lat,
        },
        "speedups": {
            "params_reduction": original.count_params() / compressed.count_params(),
            "macs_reduction": macs_original / macs_compressed,
            "train_throughput_speedup": throughput["compressed"] / throughput["original"],
            "tflite_latency_speedup": lat["original"] / lat["compressed"],
        },
    }


def markdown(result, command):
    pair, ratios = result["pair"], result["speedups"]
    return "\n".join([
        f"# cost{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Written {result['written']} by `{command}` on {result['machine']['cpu_count']} CPUs "
        f"(TensorFlow {result['machine']['tensorflow']}). Absolute times are this machine's; "
        "the speed-ups are ratios of two models timed in the same run, interleaved.",
        "",
        f"- `compress()` on {result['compress']['model']} at {result['compress']['ratio']:g}x: "
        f"**{result['compress']['seconds']:.1f} s**.",
        f"- {pair['model']}: {pair['params_original']:,} -> {pair['params_compressed']:,} "
        "parameters.",
        "",
        "| measure | original | compressed | compressed is |",
        "|---|---:|---:|---:|",
        f"| parameters | {pair['params_original']:,} | {pair['params_compressed']:,} "
        f"| {ratios['params_reduction']:.1f}x fewer |",
        f"| forward MACs per example | {pair['macs_original']:,} | {pair['macs_compressed']:,} "
        f"| {ratios['macs_reduction']:.1f}x fewer |",
        f"| train step, examples/s (batch {pair['train_batch']}) "
        f"| {pair['train_examples_per_second']['original']:.1f} "
        f"| {pair['train_examples_per_second']['compressed']:.1f} "
        f"| {ratios['train_throughput_speedup']:.2f}x faster |",
        f"| TFLite float32 latency, batch 1, 1 thread (ms) "
        f"| {pair['tflite_latency_seconds']['original'] * 1e3:.2f} "
        f"| {pair['tflite_latency_seconds']['compressed'] * 1e3:.2f} "
        f"| {ratios['tflite_latency_speedup']:.2f}x faster |",
        "",
    ])


def plot(result, path):
    """How many times fewer parameters and MACs, and how much faster."""
    from benchmarks.common import figure

    from micik_tf.files import write_figure

    labels = {"params_reduction": "parameters", "macs_reduction": "forward MACs",
              "train_throughput_speedup": "train step", "tflite_latency_speedup": "TFLite latency"}
    fig, ax = figure(size=(7, 4))
    values = [result["speedups"][k] for k in labels]
    bars = ax.bar(list(labels.values()), values, color=["C0", "C0", "C2", "C2"])
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_ylabel("original / compressed (higher is better)")
    ax.set_title(result["pair"]["model"], fontsize=9)
    fig.tight_layout()
    write_figure(fig, path)

"""TFLite CPU latency, measured as ratios between models in one run.

Absolute times depend on the machine and on whatever else runs on it; a
ratio between two models timed in the same run, interleaved, largely does
not. So the models are timed in alternating blocks, and each model's median
over all its blocks is compared with the reference's.
"""

import time

import numpy as np

from micik_tf.deploy.checks import quantize_input

# Invocations per block, and blocks per model: interleaving the blocks spreads
# machine noise over every model alike.
BLOCK = 20
BLOCKS = 10
WARMUP = 5


def _interpreter(path, sample, threads):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    (source,) = interpreter.get_input_details()
    if list(source["shape"]) != [1, *sample.shape]:
        interpreter.resize_tensor_input(source["index"], (1, *sample.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], quantize_input(sample[None], source))
    return interpreter


def latencies(paths, sample, threads=1, block=BLOCK, blocks=BLOCKS, seed=0):
    """Seconds per batch-1 `invoke()` of each TFLite file: median and 90th
    percentile over all its invocations.

    Every model is warmed up first; then, in each of `blocks` rounds, every
    model runs a block of `block` invocations, the models in a fresh random
    order each round, so that drifts of the machine fall on all of them alike.

    Args:
        paths: `{name: .tflite path}`.
        sample: one model input (no batch axis).
        threads: interpreter threads (1: as on a phone's single big core,
            and steadier than sharing the machine's cores).
        seed: of the order of the blocks.

    Returns:
        `{name: {"median": seconds, "p90": seconds}}`.
    """
    interpreters = {name: _interpreter(path, sample, threads) for name, path in paths.items()}
    for interpreter in interpreters.values():
        for _ in range(WARMUP):
            interpreter.invoke()
    times = {name: [] for name in paths}
    names = list(paths)
    rng = np.random.default_rng(seed)
    for _ in range(blocks):
        for index in rng.permutation(len(names)):
            name = names[index]
            interpreter = interpreters[name]
            for _ in range(block):
                tic = time.perf_counter()
                interpreter.invoke()
                times[name].append(time.perf_counter() - tic)
    return {name: {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}
            for name, values in times.items()}


def median_latencies(paths, sample, threads=1, block=BLOCK, blocks=BLOCKS):
    """`{name: median seconds}` of `latencies()`."""
    return {name: stats["median"] for name, stats in
            latencies(paths, sample, threads, block, blocks).items()}

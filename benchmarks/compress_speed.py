"""`compress()` wall time on the 138M-parameter ImageNet VGG-16 shape.

`keras.applications.VGG16(weights=None)`: random weights, since ImageNet
weights cannot be downloaded here; the time hardly depends on the values,
the errors do (random kernels have flat spectra). For each ratio, modes
"micik" and "per_layer". Target: 60 s or less at ratio 16 on 2 CPU cores (30 s
stretch). With `smoke`, VGG-16's topology at 1/8 width on 32x32 inputs.
"""

import math
import time

MODES = ("micik", "per_layer")
TARGET = {"ratio": 16.0, "seconds": 60.0, "stretch_seconds": 30.0, "cpu_cores": 2}


def _kernel_layers(model, path=()):
    """`{path name: layer}` for every Dense/Conv2D leaf, nested models included.

    Path names join the enclosing models' names with "/", as `report()` does.
    """
    import keras

    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(_kernel_layers(layer, path + (layer.name,)))
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            found["/".join(path + (layer.name,))] = layer
    return found


def _squared_norms(model):
    import keras
    import numpy as np

    return {
        name: float(np.sum(np.square(keras.ops.convert_to_numpy(layer.kernel).astype(np.float64))))
        for name, layer in _kernel_layers(model).items()
    }


def _build_model(smoke):
    import keras

    if smoke:
        return _small_vgg16(keras), "VGG-16 topology at 1/8 width, 32x32x3 inputs, 10 classes"
    return keras.applications.VGG16(weights=None), "VGG16(weights=None) (ImageNet shape, random weights)"


def _small_vgg16(keras):
    """VGG-16's 13 convolutions and 3 Dense layers at 1/8 width.

    The same groups as the full model (two 3x3x64-input convs become
    3x3x8, the five 512-wide ones 3x3x64, ...) at a size that compresses in
    seconds; even the 32x32 `keras.applications.VGG16` without its top takes
    minutes at ratio 4 on 2 cores.
    """
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for block, (width, convs) in enumerate(((8, 2), (16, 2), (32, 3), (64, 3), (64, 3)), start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                width, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}"
            )(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(512, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(512, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(10, name="predictions")(x)
    return keras.Model(inputs, outputs, name="vgg16_eighth")


def run_suite(ratios, smoke, load_average=lambda: None):
    import keras

    import micik_tf

    keras.utils.set_random_seed(0)
    tic = time.perf_counter()
    model, description = _build_model(smoke)
    build_seconds = time.perf_counter() - tic
    norms = _squared_norms(model)
    total_norm = sum(norms.values())
    print(f"{description}: {model.count_params():,} parameters, built in {build_seconds:.1f}s", flush=True)

    runs = []
    for ratio in ratios:
        for mode in MODES:
            tic = time.perf_counter()
            compressed = micik_tf.compress(model, ratio=ratio, mode=mode, verbose=0)
            seconds = time.perf_counter() - tic
            recorded = micik_tf.report(compressed)
            measured = micik_tf.report(compressed, reference=model)
            errors = {layer["name"]: layer["relative_error"] for layer in measured.layers}
            # Layers kept dense add no error but their norm counts in the total.
            residual = sum(errors[name] ** 2 * norms[name] for name in errors)
            drift = max(
                (abs(a["relative_error"] - errors[a["name"]]) for a in recorded.layers
                 if a["relative_error"] is not None),
                default=0.0,
            )
            run = {
                "mode": mode,
                # Other processes on the machine slow compress() down; the
                # 1-minute load average after the run shows whether there were any.
                "load_average_1min": load_average(),
                "target_ratio": ratio,
                "seconds": seconds,
                "achieved_ratio": recorded.ratio,
                "params_before": recorded.params_before,
                "params_after": recorded.params_after,
                "factorized_layers": len(measured.layers),
                "groups": len(measured.groups),
                "mean_layer_relative_error": (
                    sum(errors.values()) / len(errors) if errors else None
                ),
                "overall_relative_error": math.sqrt(residual / total_norm),
                # compress() records each layer's error; report(reference=)
                # recomputes it from the weights. They must agree.
                "recorded_vs_recomputed_error_max_diff": drift,
            }
            runs.append(run)
            print(
                f"{mode:<10} ratio {ratio:>5g}: {seconds:6.1f}s, {run['achieved_ratio']:.2f}x, "
                f"mean layer error {run['mean_layer_relative_error']:.4f}, "
                f"overall error {run['overall_relative_error']:.4f}",
                flush=True,
            )
            del compressed
    return {
        "model": description,
        "model_params": int(model.count_params()),
        "model_build_seconds": build_seconds,
        "note": (
            "Random (glorot) weights: their singular values are nearly flat, so the "
            "errors here are far above those of trained weights. The timings are "
            "what this suite is for."
        ),
        "runs": runs,
    }


def markdown(result, command):
    lines = [
        f"# compress_speed{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Model: {result['model']}, {result['model_params']:,} parameters. "
        f"Machine: {result['machine']['cpu_count']} CPUs, TensorFlow "
        f"{result['machine']['tensorflow']}, Keras {result['machine']['keras']}. "
        f"Written {result['written']} by `{command}`.",
        "",
        f"Target: compress() in {TARGET['seconds']:g} s or less at ratio {TARGET['ratio']:g} "
        f"on {TARGET['cpu_cores']} CPU cores ({TARGET['stretch_seconds']:g} s stretch).",
        "",
        "| mode | target ratio | achieved ratio | params before | params after | seconds "
        "| mean layer rel. error | overall rel. error | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        mean = run["mean_layer_relative_error"]
        lines.append(
            f"| {run['mode']} | {run['target_ratio']:g} | {run['achieved_ratio']:.2f} "
            f"| {run['params_before']:,} | {run['params_after']:,} | {run['seconds']:.1f} "
            f"| {'-' if mean is None else f'{mean:.4f}'} | {run['overall_relative_error']:.4f} "
            f"| {run['load_average_1min']} |"
        )
    lines += [
        "",
        result["note"],
        "",
        "Load avg: the machine's 1-minute load average after each run; above the "
        "core count, other processes competed for the CPUs and the time is inflated.",
        "",
    ]
    return "\n".join(lines)


def target(result, smoke, cpus_usable):
    """The 60 s target, and whether this run met it (None where the run
    says nothing about it: a smoke model, or another core count)."""
    runs = [r for r in result["runs"] if r["mode"] == "micik" and r["target_ratio"] == TARGET["ratio"]]
    return dict(
        TARGET,
        model="VGG16(weights=None), 138,357,544 parameters",
        met=(runs[0]["seconds"] <= TARGET["seconds"]
             if runs and not smoke and cpus_usable == TARGET["cpu_cores"] else None),
    )


def plot(result, path):
    """compress() seconds per ratio and mode, with the target line."""
    from benchmarks.common import figure

    from micik_tf.files import write_figure

    fig, ax = figure(size=(7, 4))
    ratios = sorted({r["target_ratio"] for r in result["runs"]})
    for i, mode in enumerate(MODES):
        runs = {r["target_ratio"]: r for r in result["runs"] if r["mode"] == mode}
        bars = ax.bar([j + 0.4 * i for j in range(len(ratios))],
                      [runs[r]["seconds"] if r in runs else 0 for r in ratios], 0.4, label=mode)
        ax.bar_label(bars, fmt="%.1f s")
    ax.axhline(TARGET["seconds"], color="k", linestyle="--", label="target at 16x")
    ax.set_xticks([j + 0.2 for j in range(len(ratios))], [f"{r:g}x" for r in ratios])
    ax.set_ylabel("compress() seconds")
    ax.set_title(result["model"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)

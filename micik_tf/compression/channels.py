"""Structured pruning: whole channels removed, the network rebuilt smaller.

`prune_channels(model, ratio)` removes the least important filters of
convolutions and units of Dense layers, ranked across all layers by one
criterion, until the model's parameters fit `count_params() / ratio`, and
returns a new, smaller *dense* Keras model with the kept weights. Unlike
unstructured pruning (zeros in kernels of the same shape) and like a thin
network, the result is smaller in memory and faster on any runtime: this is
the baseline for latency and memory.

Criterion (global, Liu et al. 2017 "Network Slimming" and Li et al. 2017
"Pruning Filters for Efficient ConvNets"): a channel followed by
BatchNormalization scores its scale `|gamma|`, any other the L1 norm of its
filter; each layer's scores are divided by their mean, so that layers with
different criteria and scales rank on one scale. Every layer keeps at least
one channel; the logits are never pruned.

Supported: chains of layers (Sequential, or a Functional model without
branches: VGG-style networks), with Conv1D/Conv2D/Dense producers and, between
them, layers that act on each channel alone (BatchNormalization, activations,
Dropout, pooling, global pooling) or Flatten. Anything else is refused with
the layer's name.
"""

import numpy as np

import keras

from micik_tf.compression import calibration
from micik_tf.validation import float_above

PRODUCERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)
PER_CHANNEL = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation,
               keras.layers.Dropout, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
               keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
               keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
               keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
               keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.SpatialDropout2D)


def prune_channels(model, ratio, calibration_data=None, calibration_batches=8):
    """A smaller dense copy of `model` with its least important channels removed.

    Args:
        model: a built chain of layers (see the module docstring). Never modified.
        ratio: target `count_params() before / after`, > 1; the result is
            within a channel of it (reported by `count_params()`).
        calibration_data: optional inputs; when given, BatchNorm statistics
            are re-estimated on them (the inputs of the layers after a pruned
            one have changed).
        calibration_batches: batches of `calibration_data` to use.

    Returns:
        A new Functional `keras.Model` with the same layer names.
    """
    ratio = float_above("ratio", ratio, 1)
    layers = _chain(model)
    stages = _stages(layers)
    widths = {p.name: _width(p) for p in stages}
    target = model.count_params() / ratio
    kept = _select(layers, stages, widths, target)
    pruned = _rebuild(model, layers, kept)
    if calibration_data is not None:
        calibration.recalibrate_batchnorm(pruned, calibration_data, calibration_batches)
    return pruned


def _chain(model):
    """The model's layers in order, checked to form a single chain."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError("prune_channels() takes a built keras.Model (Sequential or Functional).")
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    previous = model.inputs[0] if len(model.inputs) == 1 else None
    for layer in layers:
        if isinstance(layer, keras.Model) or len(getattr(layer, "_inbound_nodes", [])) != 1:
            raise ValueError(
                f"prune_channels() supports chains of layers; '{layer.name}' "
                f"({type(layer).__name__}) is a nested model or is called more than "
                "once. Use deploy.pruning (unstructured) or a thin student for this model.")
        inputs = layer._inbound_nodes[0].input_tensors
        if previous is None or len(inputs) != 1 or inputs[0] is not previous:
            raise ValueError(
                f"prune_channels() supports chains of layers; '{layer.name}' does not "
                "take the previous layer's output alone (a branch or skip connection). "
                "Use deploy.pruning (unstructured) or a thin student for this model.")
        previous = layer.output
        if not isinstance(layer, PRODUCERS + PER_CHANNEL + (keras.layers.Flatten,)):
            raise ValueError(
                f"prune_channels() cannot carry channels through '{layer.name}' "
                f"({type(layer).__name__}); it handles Conv1D/Conv2D/Dense, per-channel "
                "layers (BatchNormalization, activations, dropout, pooling) and Flatten.")
    return layers


def _width(layer):
    return layer.units if isinstance(layer, keras.layers.Dense) else layer.filters


def _stages(layers):
    """The producers whose outputs may be pruned: all but the last."""
    producers = [l for l in layers if isinstance(l, PRODUCERS)]
    if len(producers) < 2:
        raise ValueError("prune_channels() needs at least two Conv/Dense layers: the last "
                         "one's outputs (the logits) are never pruned.")
    return producers[:-1]


def _scores(layers, stages):
    """`{producer name: per-channel score}`, each layer's divided by its mean."""
    scores = {}
    for index, layer in enumerate(layers):
        if not any(layer is p for p in stages):
            continue
        follower = next((l for l in layers[index + 1:]
                         if not isinstance(l, (keras.layers.Activation, keras.layers.ReLU))), None)
        if isinstance(follower, keras.layers.BatchNormalization) and follower.scale:
            raw = np.abs(np.asarray(follower.gamma))
        else:
            kernel = np.asarray(layer.kernel)
            raw = np.sum(np.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)
        scores[layer.name] = raw / max(float(np.mean(raw)), 1e-12)
    return scores


def _params(layers, widths):
    """The chain's parameter count for the given producer widths."""
    total, channels, spatial = 0, None, 1
    for layer in layers:
        if isinstance(layer, PRODUCERS):
            shape = tuple(layer.kernel.shape)
            taps = 1 if isinstance(layer, keras.layers.Dense) else int(np.prod(shape[:-2]))
            inputs = shape[-2] if channels is None else channels * spatial
            out = widths.get(layer.name, shape[-1])
            total += taps * inputs * out + (out if layer.use_bias else 0)
            channels, spatial = out, 1
        elif isinstance(layer, keras.layers.Flatten):
            spatial = int(np.prod(layer.input.shape[1:-1]))
        elif layer.weights and channels is not None:
            total += len(layer.weights) * channels  # per-channel parameters
        else:
            total += sum(int(np.prod(w.shape)) for w in layer.weights)
    return total


def _select(layers, stages, widths, target):
    """Kept channel indices per producer: the lowest scores removed, across
    layers, until the parameters fit `target`, then the best removed ones put
    back while they still fit (so the result lands within a channel)."""
    scores = _scores(layers, stages)
    order = sorted(((s, name, c) for name, values in scores.items()
                    for c, s in enumerate(values)), key=lambda item: item[0])
    kept = {name: set(range(widths[name])) for name in widths}
    current = dict(widths)
    removed = []
    for score, name, channel in order:
        if _params(layers, current) <= target:
            break
        if current[name] <= 1:
            continue
        kept[name].discard(channel)
        current[name] -= 1
        removed.append((score, name, channel))
    for score, name, channel in sorted(removed, reverse=True):
        current[name] += 1
        if _params(layers, current) <= target:
            kept[name].add(channel)
        else:
            current[name] -= 1
    return {name: np.array(sorted(channels)) for name, channels in kept.items()}


def _rebuild(model, layers, kept):
    """The chain rebuilt with the kept channels, weights sliced from `model`."""
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                         name=model.inputs[0].name.split(":")[0])
    x, channels, spatial, width = inputs, None, 1, None
    for layer in layers:
        config = layer.get_config()
        if isinstance(layer, PRODUCERS):
            out = kept.get(layer.name)
            if out is not None:
                config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = len(out)
        new = layer.__class__.from_config(config)
        x = new(x)
        weights = [np.asarray(w) for w in layer.get_weights()]
        if isinstance(layer, PRODUCERS):
            kernel = weights[0]
            if channels is not None:
                # Flatten puts channel c of position s at s * width + c.
                rows = channels if spatial == 1 else (
                    np.arange(spatial)[:, None] * width + channels[None, :]).ravel()
                kernel = np.take(kernel, rows, axis=-2)
            if out is not None:
                kernel = kernel[..., out]
            weights[0] = kernel
            if layer.use_bias and out is not None:
                weights[1] = weights[1][out]
            channels, spatial, width = out, 1, _width(layer)
        elif isinstance(layer, keras.layers.Flatten):
            spatial = int(np.prod(layer.input.shape[1:-1]))
        elif weights and channels is not None:
            weights = [w[channels] for w in weights]  # per-channel layers
        if weights:
            new.set_weights(weights)
    return keras.Model(inputs, x, name=model.name)

"""Calibration data: input covariances for the data-aware initialisation, and
BatchNorm re-estimation after compression.

The covariance of a site's input `X` (im2col patches for Conv2D) turns the
weight error into the output error: `||X W - X W_hat||^2 = N ||C^{1/2} (W -
W_hat)||^2` with `C = X^T X / N`. It is accumulated batch by batch, so the
activations of the whole calibration set are never held at once.
"""

import numpy as np

import keras
import tensorflow as tf

from micik_tf.compression import graph
from micik_tf.compression.grouping import walk

DEFAULT_BATCH_SIZE = 32


def as_batches(data, max_batches, input_rank=None, batch_size=DEFAULT_BATCH_SIZE,
               argument="calibration_data"):
    """Yields up to `max_batches` input batches (numpy) from user data.

    Accepts a `tf.data.Dataset` of `x` or `(x, y, ...)` elements, an array of
    inputs, or an `(x, y)` pair of arrays. A dataset of single examples (one
    rank below `input_rank`, the model's input rank) is batched here.
    """
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        x_spec = spec[0] if isinstance(spec, tuple) else spec
        if not isinstance(x_spec, tf.TensorSpec):
            raise TypeError(
                f"`{argument}` must yield `x` or `(x, y)` with `x` a tensor. "
                f"Received element spec: {spec}"
            )
        if input_rank is not None and x_spec.shape.rank == input_rank - 1:
            data = data.batch(batch_size)
        for element in data.take(max_batches):
            x = element[0] if isinstance(element, tuple) else element
            yield np.asarray(x)
        return
    if isinstance(data, (list, tuple)) and len(data) in (2, 3) and all(
        hasattr(d, "shape") for d in data
    ):
        data = data[0]  # an (x, y) or (x, y, sample_weight) pair of arrays
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{argument}` must be a tf.data.Dataset or an array of model "
            f"inputs. Received: {type(data).__name__} ({error})"
        ) from None
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(f"`{argument}` is empty: give at least one example.")
    if input_rank is not None and array.ndim == input_rank - 1:
        array = array[None]
    for i in range(0, min(len(array), max_batches * batch_size), batch_size):
        yield array[i : i + batch_size]


def collect_covariances(model, sites, data, max_batches=8, max_rows=2048, max_size=4608, seed=0):
    """Input covariances `X^T X / N` of `sites`, on calibration batches.

    Args:
        model: the original (uncompressed) model; it is not called, a copy is.
        sites: the `Site`s whose inputs to measure.
        data: calibration inputs (see `as_batches`).
        max_batches: batches to use.
        max_rows: rows (patches) sampled per batch and site, to bound memory.
        max_size: sites with more kernel rows `m` than this get no covariance
            (an `m x m` matrix would be too large); they fall back to the
            weight-space initialisation.

    Returns:
        `{site name: covariance (m x m float64)}`.
    """
    wanted = {s.name: s for s in sites if s.m <= max_size}
    if not wanted:
        return {}
    records, pairs, nested = {}, [], {}

    def make_layer(layer, path):
        new = graph.clone_layer(layer)
        pairs.append((layer, new))
        return new

    def call_layer(layer, path, args, kwargs):
        name = "/".join(path)
        if name in wanted:
            records.setdefault(path[:-1], []).append(("site", name, args[0]))
        elif isinstance(layer, keras.Model):
            nested[path] = layer
            records.setdefault(path[:-1], []).append(("model", path, args[0]))
        return layer(*args, **kwargs)

    probe = graph.rebuild(model, make_layer, call_layer)
    for old, new in pairs:
        new.set_weights(old.get_weights())
    nested[()] = probe
    extractors = {
        owner: keras.Model(_single_input(nested[owner]), [t for *_, t in items])
        for owner, items in records.items()
    }
    sums = {name: 0.0 for name in wanted}
    counts = {name: 0 for name in wanted}
    rng = np.random.default_rng(seed)

    def run(owner, inputs):
        outputs = extractors[owner](inputs, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        for (kind, key, _), value in zip(records[owner], outputs):
            value = keras.ops.convert_to_numpy(value)
            if kind == "model":
                if key in extractors:
                    run(key, value)
                continue
            rows = _input_rows(wanted[key], value)
            if len(rows) > max_rows:
                rows = rows[rng.choice(len(rows), max_rows, replace=False)]
            rows = rows.astype(np.float32)
            # float32 products, float64 running sums: half the cost of the
            # largest step (a 4608-wide Gram per batch on VGG-16) without
            # losing precision over many batches.
            sums[key] = sums[key] + (rows.T @ rows).astype(np.float64)
            counts[key] += len(rows)

    for batch in as_batches(data, max_batches, len(model.inputs[0].shape)):
        run((), batch)
    return {name: sums[name] / counts[name] for name in wanted if counts[name]}


def _single_input(model):
    if len(model.inputs) != 1:
        raise ValueError(
            f"`calibration_data` supports models with one input; '{model.name}' "
            f"has {len(model.inputs)}. Compress without calibration_data, or "
            "compress the single-input sub-model."
        )
    return model.inputs[0]


def _input_rows(site, value):
    """The rows `x` of the site's input with `y = x W`: features or patches."""
    if site.kind == "dense":
        return value.reshape(-1, site.m)
    layer = site.layer
    patches = keras.ops.image.extract_patches(
        value,
        size=tuple(layer.kernel_size),
        strides=tuple(layer.strides),
        dilation_rate=tuple(layer.dilation_rate),
        padding=layer.padding,
    )
    return keras.ops.convert_to_numpy(patches).reshape(-1, site.m)


def recalibrate_batchnorm(model, data, max_batches=8):
    """Re-estimates the moving statistics of every BatchNormalization layer.

    Compression shifts the distribution of each factorized layer's outputs, so
    the teacher's moving means and variances no longer fit (MICIK.md
    section 2). This runs the model in training mode on a few batches with a
    cumulative-average momentum, which leaves the trainable weights untouched.

    Returns:
        The number of batches used (0 if the model has no BatchNormalization).
    """
    layers = [
        layer
        for layer, _ in walk(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in as_batches(data, max_batches, len(model.inputs[0].shape)):
            # With momentum t/(t+1) the moving value is the mean over batches.
            for layer in layers:
                layer.momentum = used / (used + 1.0)
            model(batch, training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return used

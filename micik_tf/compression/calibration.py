"""Calibration data: input covariances for the data-aware initialisation, and
BatchNorm re-estimation after compression.

The covariance of a site's input `X` (im2col patches for Conv2D) turns the
weight error into the output error: `||X W - X W_hat||^2 = N ||C^{1/2} (W -
W_hat)||^2` with `C = X^T X / N`. It is accumulated batch by batch, so the
activations of the whole calibration set are never held at once.
"""

import gc

import numpy as np

import keras
import tensorflow as tf

from micik_tf.compression import graph
from micik_tf.compression.grouping import walk
from micik_tf.layers.factorized import einsum_spec

DEFAULT_BATCH_SIZE = 32


def as_batches(data, max_batches, input_rank=None, batch_size=DEFAULT_BATCH_SIZE,
               argument="calibration_data"):
    """Yields up to `max_batches` input batches (numpy) from user data.

    Accepts a `tf.data.Dataset` of `x` or `(x, y, ...)` elements, an array
    (or list) of inputs, or an `(x, y)` tuple of arrays. A dataset of single examples (one
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
    # Only a tuple is an (x, y) or (x, y, sample_weight) pair, as in
    # `Model.fit`: a list of two or three examples is data, not a pair.
    if isinstance(data, tuple) and len(data) in (2, 3) and all(
        hasattr(d, "shape") for d in data
    ):
        data = data[0]
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


# Images the extractor runs at once, whatever the user's batch size: the
# activations of every compressed layer's input for a chunk are held
# together, so this bounds the memory (about 40 MB per 224x224 image on
# VGG-16).
CHUNK = 8
# Rows (patch positions, or examples of a Dense layer) sampled per image and
# layer. Positions are drawn before any patch is cut, so memory does not
# depend on the image size; the covariances are running sums.
ROWS_PER_IMAGE = 64
# Layers with more kernel rows `m` than this keep only the diagonal of their
# input covariance (an `m x m` float64 matrix at m = 25088, VGG-16's fc6,
# would take 5 GB).
FULL_COVARIANCE_MAX = 4608


def collect_covariances(model, sites, data, max_batches=8, rows_per_image=ROWS_PER_IMAGE,
                        full_max=None, seed=0):
    """Input covariances `X^T X / N` of `sites`, streamed over calibration data.

    Each batch is run in chunks of `CHUNK` images through a copy of the model
    that returns every site's input; per image and site, `rows_per_image`
    rows are sampled (patch positions are drawn first, then only those
    patches are cut) and added to a running sum. Memory is therefore bounded
    by the chunk and the covariances, not by the number of images.

    Args:
        model: the original (uncompressed) model; it is not called, a copy is.
        sites: the `Site`s whose inputs to measure.
        data: calibration inputs (see `as_batches`).
        max_batches: batches to use.
        rows_per_image: rows sampled per image and site.
        full_max: sites with more kernel rows `m` get the diagonal only
            (default `FULL_COVARIANCE_MAX`).

    Returns:
        `{site name: covariance}`: `m x m` (float32), or the `m` variances
        for a site wider than `full_max`.

    Raises:
        ValueError: if the data holds NaN or infinite values.
    """
    full_max = FULL_COVARIANCE_MAX if full_max is None else full_max
    wanted = {s.name: s for s in sites}
    tap = InputTap(model, sites)
    sums = {name: 0.0 for name in wanted}
    counts = {name: 0 for name in wanted}
    rng = np.random.default_rng(seed)

    def add(key, value):
        rows = sampled_rows(wanted[key], value, rows_per_image, rng).astype(np.float32)
        if wanted[key].m > full_max:
            sums[key] = sums[key] + np.sum(np.square(rows, dtype=np.float64), axis=0)
        elif counts[key] == 0:
            sums[key] = rows.T @ rows
        else:
            # In place, in float32: float64 sums of VGG-16's covariances
            # took 1.3 GB. A chunk adds a few hundred rows, so even a
            # thousand chunks lose under 1e-4 of relative precision,
            # far below the whitening's 1e-2 damping.
            sums[key] += rows.T @ rows
        counts[key] += len(rows)

    for chunk in chunks(data, max_batches, model):
        for key, value in tap(chunk):
            add(key, value)
    del tap
    # The extractors' copy of the model (as large as the model) sits in
    # reference cycles: free it now, before compress() builds its factors.
    gc.collect()
    # float32 results: the whitening factors are computed in float64 from
    # them, and float32 halves what `compress()` holds (on VGG-16, 0.6 GB
    # instead of 1.2).
    covariances = {}
    for name in wanted:
        if counts[name]:
            total = sums.pop(name)
            covariances[name] = (np.divide(total, counts[name], out=total) if total.dtype == np.float32
                                 else (total / counts[name]).astype(np.float32))
    return covariances


def chunks(data, max_batches, model, size=CHUNK):
    """The calibration inputs, `size` images at a time (checked finite)."""
    for index, batch in enumerate(as_batches(data, max_batches, len(model.inputs[0].shape))):
        if np.issubdtype(batch.dtype, np.floating) and not np.all(np.isfinite(batch)):
            raise ValueError(
                f"`calibration_data` holds NaN or infinite values (batch {index}). Pass "
                "finite model inputs, as the model takes them (e.g. training images)."
            )
        for start in range(0, len(batch), size):
            yield batch[start:start + size]


def chunk_size(model, largest=256):
    """`CHUNK` images of 224x224x3, and proportionally more of smaller inputs
    (at most `largest`): the activations a chunk holds scale with the input,
    and on small images the per-call overhead is what costs."""
    shape = model.inputs[0].shape[1:]
    if any(d is None for d in shape):
        return CHUNK
    return int(min(largest, max(CHUNK, CHUNK * (224 * 224 * 3) // max(1, int(np.prod(shape))))))


class InputTap:
    """A copy of `model` that returns the inputs of `sites`: `tap(x)` is a
    list of `(site name, numpy input)`, once per call of the site's layer.
    `layers[name]` is the copy's layer at each site, whose weights may be
    changed, and `model` the whole copy (the original is never touched)."""

    def __init__(self, model, sites):
        self.captured = {}  # inputs of layers held inside composite layers, per call
        self.records, self.extractors, self.layers, self.model = _extractors(
            model, {s.name: s for s in sites}, self.captured)

    def __call__(self, inputs):
        found = []
        self._run((), inputs, found)
        return found

    def _run(self, owner, inputs, found):
        outputs = self.extractors[owner](inputs, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        for (kind, key, _), value in zip(self.records[owner], outputs):
            value = keras.ops.convert_to_numpy(value)
            if kind == "model":
                if key in self.extractors:
                    self._run(key, value, found)
                continue
            if kind == "site":
                found.append((key, value))
        while self.captured:
            found.append(self.captured.popitem())


def _extractors(model, wanted, captured):
    """Per (nested) model of a copy of `model`, the records of what it feeds
    and a Keras model returning the inputs of the wanted sites (and of nested
    models holding some). Wanted layers held inside a composite layer are
    wrapped by a `_Recorder`, which puts their input in `captured` as the
    extractor runs; the composite's output is then an output too, so that it
    runs."""
    records, pairs, nested, layers = {}, [], {}, {}
    held = {}
    for name, site in wanted.items():
        if site.held:
            held.setdefault(site.block, {})[site.location] = name

    def make_layer(layer, path):
        if path in held:
            names = held[path]
            def recorder(at, old):
                layers[names[at]] = old
                return _Recorder(old, names[at], captured)

            return graph.compressed_block(layer, recorder, list(names))
        new = graph.clone_layer(layer)
        pairs.append((layer, new))
        if "/".join(path) in wanted:
            layers["/".join(path)] = new
        return new

    def call_layer(layer, path, args, kwargs):
        name = "/".join(path)
        if name in wanted:
            records.setdefault(path[:-1], []).append(("site", name, args[0]))
        elif isinstance(layer, keras.Model):
            nested[path] = layer
            records.setdefault(path[:-1], []).append(("model", path, args[0]))
        outputs = layer(*args, **kwargs)
        if path in held:
            records.setdefault(path[:-1], []).append(("block", path, outputs))
        return outputs

    probe = graph.rebuild(model, make_layer, call_layer)
    for old, new in pairs:
        graph.copy_weights(old, new)
    nested[()] = probe
    extractors = {
        owner: keras.Model(_single_input(nested[owner]), [t for *_, t in items])
        for owner, items in records.items()
    }
    return records, extractors, layers, probe


class _Recorder(keras.layers.Layer):
    """Runs `layer`, and when run eagerly puts its input in `captured[key]`
    (an extractor is called eagerly; building it traces symbolic tensors,
    which have no value to record)."""

    def __init__(self, layer, key, captured):
        super().__init__(name=f"{layer.name}_recorder", dtype=layer.dtype_policy)
        self.layer, self.key = layer, key
        # A method, not the dict: Keras would track (copy) a dict attribute.
        self.store = captured.__setitem__

    def call(self, inputs):
        if tf.executing_eagerly():
            self.store(self.key, keras.ops.convert_to_numpy(inputs))
        return self.layer(inputs)


def _single_input(model):
    if len(model.inputs) != 1:
        raise ValueError(
            f"`calibration_data` supports models with one input; '{model.name}' "
            f"has {len(model.inputs)}. Compress without calibration_data, or "
            "compress the single-input sub-model."
        )
    return model.inputs[0]


def sampled_rows(site, value, per_image, rng):
    """Up to `per_image` rows per example of the site's input `x` (with
    `y = x W`): features of a Dense layer, patches of a convolution.

    For a convolution the output positions are drawn first and only their
    `k x k x C` patches are gathered, from the input padded as the layer pads
    it, so no tensor of all the patches is ever built.
    """
    if site.kind == "einsum":
        # The contracted axes last (in kernel order), then every other axis is a row.
        inputs, _, _, contracted = einsum_spec(site.layer.equation)
        letters = inputs.replace("...", "")
        value = np.moveaxis(value, [letters.index(c) - len(letters) for c in contracted],
                            list(range(-len(contracted), 0)))
    if site.kind in ("dense", "einsum"):
        rows = value.reshape(-1, site.m)
        if len(rows) > per_image * len(value):
            rows = rows[rng.choice(len(rows), per_image * len(value), replace=False)]
        return rows
    layer = site.layer
    size, strides, dilation = (tuple(layer.kernel_size), tuple(layer.strides),
                               tuple(layer.dilation_rate))
    padding = layer.padding
    if site.kind == "conv1d":
        # A Conv1D is a Conv2D of height 1; causal padding pads the past.
        value = value[:, None]
        size, strides, dilation = (1,) + size, (1,) + strides, (1,) + dilation
    (kh, kw), (sh, sw), (dh, dw) = size, strides, dilation
    if site.kind == "conv1d":
        if padding == "causal":
            value = np.pad(value, ((0, 0), (0, 0), ((kw - 1) * dw, 0), (0, 0)))
            padding = "valid"
    batch, height, width, _ = value.shape
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        out_h, out_w = -(-height // sh), -(-width // sw)
        pad_h = max((out_h - 1) * sh + span_h - height, 0)
        pad_w = max((out_w - 1) * sw + span_w - width, 0)
        value = np.pad(value, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                               (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    else:
        out_h, out_w = (height - span_h) // sh + 1, (width - span_w) // sw + 1
    count = min(per_image, out_h * out_w)
    image = np.repeat(np.arange(batch), count)
    position = np.concatenate([rng.choice(out_h * out_w, count, replace=False)
                               for _ in range(batch)])
    top, left = (position // out_w) * sh, (position % out_w) * sw
    rows_h = top[:, None] + (np.arange(kh) * dh)[None, :]  # (r, kh)
    rows_w = left[:, None] + (np.arange(kw) * dw)[None, :]  # (r, kw)
    patches = value[image[:, None, None], rows_h[:, :, None], rows_w[:, None, :], :]
    return patches.reshape(len(image), site.m)  # (r, kh, kw, C) in the kernel's order


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

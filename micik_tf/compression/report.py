"""`report()`: what compression did, read off the compressed model itself."""

import json

import numpy as np

import keras

from micik_tf.compression import decomposition
from micik_tf.compression.grouping import (basis_layer, graph_bases, owner_of, untouched_reason,
                                           walk_deep)
from micik_tf.layers import FACTORIZED, SharedBasis

_WRAPPERS = FACTORIZED

# A Dense/Conv2D that compress() could have factorized but left as it was. The
# model records no more than that (the same before and after `.keras` saving);
# compress()'s progress log names the specific cause when it happens.
LEFT_WHOLE = (
    "left whole by compress(): excluded, not in `ranks`, or kept dense by the "
    "allocator because its full kernel served the budget better"
)


class Report:
    """The compression report of one model.

    Attributes are those of `to_dict()`: `params_before`, `params_after`,
    `ratio`, `macs`, `int8_bytes_estimate`, `groups`, `layers` and `untouched`.
    """

    def __init__(self, params_before, params_after, groups, layers, untouched, macs=None,
                 int8_bytes_estimate=None):
        self.params_before = int(params_before)
        self.params_after = int(params_after)
        self.ratio = self.params_before / max(self.params_after, 1)
        self.macs = macs
        self.int8_bytes_estimate = int8_bytes_estimate
        self.groups = groups
        self.layers = layers
        self.untouched = untouched

    def to_dict(self):
        """A JSON-safe dict of the report."""
        return json.loads(
            json.dumps(
                {
                    "params_before": self.params_before,
                    "params_after": self.params_after,
                    "ratio": self.ratio,
                    "macs": self.macs,
                    "int8_bytes_estimate": self.int8_bytes_estimate,
                    "groups": self.groups,
                    "layers": self.layers,
                    "untouched": self.untouched,
                }
            )
        )

    def __str__(self):
        lines = [
            f"MICIK compression: {self.params_before:,} -> {self.params_after:,} "
            f"parameters ({self.ratio:.2f}x)",
            "multiply-adds per example: " + _count(self.macs),
            "int8 .tflite weights, before gzip (the file is larger): "
            + _count(self.int8_bytes_estimate) + " bytes" + (" (sparse parts' zeros included: they shrink only under gzip)"
                          if any(layer["sparse"] for layer in self.layers) else ""),
            "",
            f"{'layer':<32} {'group':<28} {'r_c':>5} {'r_u':>5} {'nonzeros':>9} "
            f"{'params':>10} {'rel.err':>8}",
        ]
        for layer in self.layers:
            error = layer["relative_error"]
            nonzeros = f"{layer['nonzeros']:,}" if layer["sparse"] else "-"
            lines.append(
                f"{layer['name'][:32]:<32} {(layer['group'] or '-')[:28]:<28} "
                f"{layer['rank_common']:>5} {layer['rank_unique']:>5} {nonzeros:>9} "
                f"{layer['params']:>10,} "
                + (f"{error:>8.4f}" if error is not None else f"{'?':>8}")
            )
        if self.groups:
            lines += ["", "shared bases:"]
            for group in self.groups:
                lines.append(
                    f"  {group['name']}: {group['basis_shape'][0]}x"
                    f"{group['basis_shape'][1]} ({group['params']:,} params, "
                    f"stored once) shared by {', '.join(group['members'])}"
                )
        if self.untouched:
            lines += ["", "untouched:"]
            for item in self.untouched:
                lines.append(f"  {item['name']}: {item['reason']}")
        return "\n".join(lines)

    __repr__ = __str__


def _count(value):
    return "unknown" if value is None else f"{value:,}"


def report(model, reference=None):
    """Reports a compressed model's ratio, groups, ranks and errors.

    Each layer's `relative_error` is the weight-space error
    `||W - W_hat|| / ||W||`. With `calibration_data`, compress() minimises the
    error on the layer's *outputs* instead, so the weight error can exceed 1
    while the output error is small; that is expected.

    Everything is computed from `model`: the parameter counts from its
    variables (each distinct variable once; a sparse unique part counts its
    nonzeros, as gzip stores it), the original size from the wrappers'
    kernel shapes, the groups from the `SharedBasis` layers.

    Args:
        model: a model returned by `micik_tf.compress()` (or loaded from
            `.keras`).
        reference: optionally the original model. Relative errors are then
            recomputed against its kernels (matched by layer path) instead of
            read from the values `compress()` recorded; use it after recovery
            training, when the factors have moved.

    Returns:
        A `Report`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"report() takes a keras.Model. Received: {type(model).__name__}")
    reference_layers = {}
    if reference is not None:
        reference_layers = {"/".join(p): l for l, p, _, _ in walk_deep(reference)}
    bases_in_graph, wrappers, untouched = graph_bases(model), [], []
    for layer, path, block, _ in walk_deep(model):
        name = "/".join(path)
        if isinstance(layer, SharedBasis):
            continue
        if isinstance(layer, _WRAPPERS):
            wrappers.append((layer, path, owner_of(path, block)))
        elif layer.weights:
            untouched.append({"name": name, "reason": untouched_reason(layer) or LEFT_WHOLE})

    # Each group by its basis layer: a graph node, or held by its members.
    bases = {id(b): ("/".join(owner + (b.name,)), b) for (owner, _), b in bases_in_graph.items()}
    members, ranks = {key: [] for key in bases}, {}  # a group's r_c, as its members use it
    layers, before, after_factored, zeros = [], 0, 0, 0
    for layer, path, owner in wrappers:
        name = "/".join(path)
        basis = None
        if layer.rank_common:
            held = basis_layer(layer, owner, bases_in_graph)
            key = id(held)
            if key not in bases:
                bases[key] = ("/".join(owner + (held.name,)), held)
                members[key] = []
            members[key].append(name)
            ranks[key] = layer.rank_common
            basis = np.asarray(keras.ops.convert_to_numpy(held.basis))
        nonzeros = layer.nonzeros()
        # The zeros of a sparse part are its mask, not parameters.
        layer_zeros = layer.sparse_zeros()
        zeros += layer_zeros
        params = layer.count_own_params() - layer_zeros
        dense = int(np.prod(layer.kernel_shape())) + (
            int(np.prod(layer.bias_shape())) if layer.use_bias else 0)
        before += dense
        after_factored += params
        error = layer.relative_error
        if name in reference_layers and hasattr(reference_layers[name], "kernel"):
            original = decomposition.kernel_matrix(
                keras.ops.convert_to_numpy(reference_layers[name].kernel)
            )
            approx = decomposition.kernel_matrix(layer.reconstruct_kernel(basis))
            error = decomposition.relative_error(original, approx)
        layers.append(
            {
                "name": name,
                "type": type(layer).__name__,
                "group": layer.group if layer.rank_common else None,
                "rank_common": layer.rank_common,
                "rank_unique": layer.rank_unique,
                "sparse": layer.sparse,
                "nonzeros": nonzeros,
                "shared_side": layer.shared_side,
                "kernel_shape": [int(d) for d in layer.kernel_shape()],
                "params": params,
                "relative_error": error,
                "initialization": layer.initialization,
            }
        )
    groups = []
    for key, (name, layer) in bases.items():
        params = int(np.prod(layer.basis.shape))
        after_factored += params
        groups.append(
            {
                "name": name,
                "members": members[key],
                "rank_common": ranks.get(key, 0),
                "basis_shape": [int(layer.rows), int(layer.cols)],
                "params": params,
            }
        )
    params_after = int(model.count_params()) - zeros
    params_before = params_after - after_factored + before
    return Report(params_before, params_after, groups, layers, untouched,
                  macs=_macs(model), int8_bytes_estimate=int8_bytes_estimate(model))


def _macs(model):
    from micik_tf.deploy.macs import forward_macs

    try:
        return forward_macs(model)["total"]
    except (TypeError, ValueError):
        return None  # a shape the counter does not know


# Bytes per entry in a full-integer int8 .tflite: kernels and factors are
# int8; 1-D variables (biases, held as int32, and BatchNorm's, an upper
# bound where BatchNorm folds into the convolution before it) take 4.
_INT8_KERNEL_BYTES, _INT8_VECTOR_BYTES = 1, 4


def int8_bytes_estimate(model):
    """The bytes of `model`'s weights in a full-integer int8 `.tflite`,
    before gzip, every distinct variable once: a lower bound of the file,
    before exporting anything. The file adds its graph and per-channel
    quantization parameters: measured 3% more for vgg_compact, 31% more for
    its MICIK 8x student, whose factorized layers are two operations each."""
    seen, total = set(), 0
    for variable in model.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        size = int(np.prod(variable.shape))
        total += size * (_INT8_KERNEL_BYTES if len(variable.shape) >= 2 else _INT8_VECTOR_BYTES)
    return total


"""Forward cost of a model, counted from its layers' shapes.

Multiply-accumulates (MACs) of the layers that dominate: Conv2D and Dense,
and MICIK's factorized layers. A factorized layer of total rank
`r = r_c + r_u` over a kernel matrix `m x n` costs `m*r + r*n` per output
position (a `k x k` convolution to `r` channels, then `r -> n`) instead of
`m*n`, whichever side shares. BatchNorm, activations and pooling are left
out: they cost the same in both models.
"""

import math

import keras

from micik_tf.compression.grouping import walk_deep
from micik_tf.layers import FACTORIZED
from micik_tf.layers.factorized import einsum_spec


def _positions(layer, columns, rows):
    """Output positions per example: the output's size over the kernel
    matrix's `columns` (H*W for a convolution, the sequence length for a
    Dense on sequences or an EinsumDense, 1 for a Dense on vectors)."""
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        # Held inside a composite layer: no graph node, only its build shape.
        shape = layer.get_build_config()["input_shape"]
        if not hasattr(layer, "kernel_size"):  # not a convolution (or its wrapper)
            size, per = _size(shape), rows  # one row of the input per position
        else:
            size, per = _size(layer.compute_output_spec(keras.KerasTensor(shape)).shape), columns
        return None if size is None else size // per
    return _size(shape) // columns


def _size(shape):
    """Elements per example, or None if a dimension is unknown."""
    if any(d is None for d in shape[1:]):
        return None
    return math.prod(int(d) for d in shape[1:])


def forward_macs(model):
    """Multiply-accumulates of one forward pass of one example.

    Args:
        model: a built Functional/Sequential model (nested models included),
            compressed or not.

    Returns:
        `{"total": int, "layers": {path: int}, "uncounted": [path, ...]}`;
        `uncounted` lists layers held inside composite layers that were
        built for an unknown length (their positions are unknown).
    """
    layers, uncounted = {}, []
    for layer, path, _, _ in walk_deep(model):
        if isinstance(layer, FACTORIZED):
            rank = layer.rank_common + layer.rank_unique
            per_position = layer.kernel_rows * rank + rank * layer.units
            if layer.sparse:
                # Stored dense with zeros: a dense runtime multiplies them all.
                per_position += layer.kernel_rows * layer.units
            columns, rows = layer.units, layer.kernel_rows
        elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense,
                                   keras.layers.EinsumDense)):
            kernel = layer.kernel.shape
            per_position = math.prod(int(d) for d in kernel)
            columns = int(kernel[-1])
            rows = per_position // columns
            if isinstance(layer, keras.layers.EinsumDense):
                spec = einsum_spec(layer.equation)
                if spec is None:
                    continue  # no matrix form: not counted
                contracted = math.prod(int(kernel[spec[1].index(c)]) for c in spec[3])
                columns, rows = math.prod(int(d) for d in kernel) // contracted, contracted
        else:
            continue
        positions = _positions(layer, columns, rows)
        if positions is None:
            uncounted.append("/".join(path))
        else:
            layers["/".join(path)] = int(per_position * positions)
    return {"total": sum(layers.values()), "layers": layers, "uncounted": uncounted}

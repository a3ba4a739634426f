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

from micik_tf.compression.grouping import walk
from micik_tf.layers import FACTORIZED
from micik_tf.layers.factorized import einsum_spec


def _positions(layer, columns):
    """Output positions per example: the output's size over the kernel
    matrix's `columns` (H*W for a convolution, the sequence length for a
    Dense on sequences or an EinsumDense, 1 for a Dense on vectors)."""
    shape = layer.output.shape
    return math.prod(int(d) for d in shape[1:]) // columns


def forward_macs(model):
    """Multiply-accumulates of one forward pass of one example.

    Args:
        model: a built Functional/Sequential model (nested models included),
            compressed or not.

    Returns:
        `{"total": int, "layers": {path: int}}`.
    """
    layers = {}
    for layer, path in walk(model):
        if isinstance(layer, FACTORIZED):
            rank = layer.rank_common + layer.rank_unique
            per_position = layer.kernel_rows * rank + rank * layer.units
            columns = layer.units
        elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense,
                                   keras.layers.EinsumDense)):
            kernel = layer.kernel.shape
            per_position = math.prod(int(d) for d in kernel)
            columns = int(kernel[-1])
            if isinstance(layer, keras.layers.EinsumDense):
                spec = einsum_spec(layer.equation)
                if spec is None:
                    continue  # several contracted axes: not counted
                contracted = int(kernel[spec[1].index(spec[3])])
                columns = math.prod(int(d) for d in kernel) // contracted
        else:
            continue
        layers["/".join(path)] = int(per_position * _positions(layer, columns))
    return {"total": sum(layers.values()), "layers": layers}

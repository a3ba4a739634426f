"""Keras layers that store MICIK-compressed kernels."""

from micik_tf.layers.compressed_block import CompressedBlock
from micik_tf.layers.factorized import (
    FACTORIZED,
    FactorizedConv1D,
    FactorizedConv2D,
    FactorizedDense,
    FactorizedEinsumDense,
)
from micik_tf.layers.shared_basis import SharedBasis

__all__ = ["FACTORIZED", "CompressedBlock", "FactorizedConv1D", "FactorizedConv2D", "FactorizedDense",
           "FactorizedEinsumDense", "SharedBasis"]

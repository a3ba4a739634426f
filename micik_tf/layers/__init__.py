"""Keras layers that store MICIK-compressed kernels."""

from micik_tf.layers.factorized import FactorizedConv2D, FactorizedDense
from micik_tf.layers.shared_basis import SharedBasis

__all__ = ["FactorizedConv2D", "FactorizedDense", "SharedBasis"]

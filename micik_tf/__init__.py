"""micik_tf: MICIK cross-layer compression for Keras 3 models.

    compressed = micik_tf.compress(model, ratio=8.0)
    print(micik_tf.report(compressed))

Importing this package registers its layers with Keras serialization, so
`keras.models.load_model("student.keras")` needs no `custom_objects`. It never
imports tensorflow-model-optimization or tf_keras, so TensorFlow's Keras stays Keras 3.
"""

from micik_tf.calibration import recalibrate_batchnorm
from micik_tf.compress import DEFAULT_RATIO, compress
from micik_tf.deployment import export
from micik_tf.layers import FactorizedConv2D, FactorizedDense, SharedBasis
from micik_tf.losses import (
    CrossLayerSimilarity,
    LayerInheritance,
    feature_model,
    linear_cka,
    logits_distillation,
)
from micik_tf.report import Report, report

__version__ = "0.1.0"

__all__ = [
    "CrossLayerSimilarity",
    "DEFAULT_RATIO",
    "FactorizedConv2D",
    "FactorizedDense",
    "LayerInheritance",
    "Report",
    "SharedBasis",
    "compress",
    "export",
    "feature_model",
    "linear_cka",
    "logits_distillation",
    "recalibrate_batchnorm",
    "report",
]

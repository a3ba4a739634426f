"""micik_tf: MICIK cross-layer compression for Keras 3 models.

    compressed = micik_tf.compress(model, ratio=8.0)
    print(micik_tf.report(compressed))
    micik_tf.Distiller(model, compressed).compile("adam")  # then .fit(...)
    micik_tf.export(compressed, "exported/")

The package follows the pipeline: `compression` (compress, report), then
`recovery` (losses, data, the training loop), then `deploy` (export,
pruning, quantization); `job` runs the three as one recovery job
(`tools/train.py`), and `layers` holds the Keras layers a compressed model is
made of.

Importing this package registers those layers with Keras serialization, so
`keras.models.load_model("student.keras")` needs no `custom_objects`. It never
imports tensorflow-model-optimization or tf_keras, so TensorFlow's Keras stays Keras 3.
"""

from micik_tf.compression import (
    DEFAULT_RATIO,
    Report,
    compress,
    prune_channels,
    recalibrate_batchnorm,
    report,
)
from micik_tf.deploy import export
from micik_tf.layers import (
    FactorizedConv1D,
    FactorizedConv2D,
    FactorizedDense,
    FactorizedEinsumDense,
    SharedBasis,
)
from micik_tf.recovery.distiller import Distiller
from micik_tf.recovery.losses import (
    CrossLayerSimilarity,
    LayerInheritance,
    feature_model,
    linear_cka,
    logits_distillation,
)

__version__ = "0.1.0"

__all__ = [
    "CrossLayerSimilarity",
    "DEFAULT_RATIO",
    "Distiller",
    "FactorizedConv1D",
    "FactorizedConv2D",
    "FactorizedDense",
    "FactorizedEinsumDense",
    "LayerInheritance",
    "Report",
    "SharedBasis",
    "compress",
    "export",
    "feature_model",
    "linear_cka",
    "logits_distillation",
    "prune_channels",
    "recalibrate_batchnorm",
    "report",
]

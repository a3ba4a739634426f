"""Deployment: a compressed model to files a phone or a server runs.

`export()` writes `.keras`, SavedModel and TFLite (float32, float16, int8)
files, each checked against the Keras model (`export`, `conversion`,
`checks`). Pruning and quantization-aware training stack on the factors
during recovery (`pruning`, `quantization`). What a model costs to run is
counted (`macs`) and timed as ratios (`latency`).
"""

from micik_tf.deploy.export import ARTIFACTS, DEFAULT_FORMATS, FORMATS, artifact_paths, export

__all__ = ["ARTIFACTS", "DEFAULT_FORMATS", "FORMATS", "artifact_paths", "export"]

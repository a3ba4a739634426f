"""`import micik_tf` must leave `tf.keras` as Keras 3 in the user's process."""

import subprocess
import sys

PROBE = """
import os, sys
import micik_tf
import keras
import tensorflow as tf
assert "TF_USE_LEGACY_KERAS" not in os.environ, "TF_USE_LEGACY_KERAS was set"
assert "tf_keras" not in sys.modules, "tf_keras was imported"
assert "tensorflow_model_optimization" not in sys.modules, "tfmot was imported"
assert tf.keras.Model is keras.Model, tf.keras
# tf.keras.__name__ is "keras._tf_keras.keras": Keras 3's own namespace module.
assert tf.keras.__version__ == keras.__version__, tf.keras.__version__
assert tf.keras.__file__.startswith(os.path.dirname(keras.__file__)), tf.keras.__file__
assert keras.__version__.startswith("3."), keras.__version__
print("keras3-ok", tf.keras.__name__)
"""


def test_import_keeps_tf_keras_on_keras3():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "keras3-ok" in result.stdout

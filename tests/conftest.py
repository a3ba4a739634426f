import os

# Quiet TF's C++ logs; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Deterministic weights, and no dtype policy leaking between tests."""
    keras.utils.set_random_seed(0)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A small digits teacher without BatchNorm (BatchNorm statistics are
    per replica, which would make strategies differ by design)."""
    from micik_tf.recovery import datasets, pipeline

    source = datasets.load("digits")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv4")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(pipeline.pipeline(source.train, 64, training=True), epochs=4, verbose=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    model.save(path)
    return str(path)

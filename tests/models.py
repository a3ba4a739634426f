"""Small models the tests compress (widths of a few channels keep them fast)."""

import numpy as np

import keras


def branchy_cnn(width=16, name="branchy"):
    """Functional: a skip connection, a branch, BatchNorm, two Dense layers."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="c1")(inputs)
    a = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="c2")(x)
    b = keras.layers.Conv2D(width, 3, padding="same", name="c3")(a)
    x = keras.layers.Add()([a, b])
    x = keras.layers.BatchNormalization(name="bn")(x)
    left = keras.layers.Conv2D(width, 1, name="c4")(x)
    right = keras.layers.Conv2D(width, 3, padding="same", name="c5")(x)
    x = keras.layers.Concatenate()([left, right])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(2 * width, activation="relu", name="d1")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vgg_like(widths=(32, 32, 64, 64), dense=128, name="vgg_like"):
    """Sequential VGG-style stack: conv pairs with equal shapes share bases."""
    layers = [keras.Input((16, 16, 3))]
    for i, w in enumerate(widths):
        layers.append(keras.layers.Conv2D(w, 3, padding="same", activation="relu", name=f"conv{i}"))
        if i % 2 == 1:
            layers.append(keras.layers.MaxPooling2D())
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(dense, activation="relu", name="fc1"),
        keras.layers.Dense(dense, activation="relu", name="fc2"),
        keras.layers.Dense(10, name="logits"),
    ]
    return keras.Sequential(layers, name=name)


def images(n=8, shape=(12, 12, 3), seed=0):
    return np.random.default_rng(seed).random((n,) + shape).astype("float32")


def weights_of(model):
    return [np.array(w) for w in model.weights]

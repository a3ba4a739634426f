"""Reference architectures: the teachers of our demos and benchmarks."""

import keras


def vgg_style(input_shape, num_classes, widths=(64, 64, 128, 128, 256, 256), dense=256,
              name="vgg_style"):
    """A VGG-style network: 3x3 conv pairs with BatchNorm, pooling between
    pairs, then a Dense head. Pairs of equal width are what MICIK shares bases
    across (same kernel size and C_in).

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: number of logits.
        widths: output channels of each conv layer; a max-pool follows every
            second conv while the feature map is larger than 1x1.
        dense: width of the hidden Dense layer.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    size = min(input_shape[:2])
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        # Momentum 0.9: the moving statistics settle within the few hundred
        # steps a small data set gives.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i % 2 == 1 and size > 1:
            x = keras.layers.MaxPooling2D(name=f"pool{i // 2 + 1}")(x)
            size //= 2
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(dense, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)

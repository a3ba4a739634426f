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


# The VGG-16 conv stack (Simonyan & Zisserman 2015, configuration D); "M" is
# a 2x2 max-pool.
VGG16_STACK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
               512, 512, 512, "M", 512, 512, 512, "M")


def cifar_vgg16(input_shape=(32, 32, 3), num_classes=10, dense=512, name="cifar_vgg16"):
    """VGG-16 for 32x32 images: the usual 13-conv stack with BatchNorm, and a
    small classifier head (one hidden Dense layer) instead of the 4096-wide
    ImageNet head, as in the CIFAR literature."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    conv = 0
    for item in VGG16_STACK:
        if item == "M":
            x = keras.layers.MaxPooling2D(name=f"pool{conv}")(x)
            continue
        conv += 1
        x = keras.layers.Conv2D(item, 3, padding="same", use_bias=False, name=f"conv{conv}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{conv}")(x)
        x = keras.layers.ReLU(name=f"relu{conv}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# keras.applications model name -> the module whose preprocess_input it needs.
APPLICATION_PREPROCESSING = {
    "VGG16": "vgg16", "VGG19": "vgg19", "ResNet50": "resnet50",
    "ResNet101": "resnet", "ResNet152": "resnet", "InceptionV3": "inception_v3",
    "MobileNetV2": "mobilenet_v2", "MobileNet": "mobilenet", "Xception": "xception",
    "DenseNet121": "densenet", "EfficientNetB0": "efficientnet",
}


def application_preprocessing(name):
    """`fn(images in [0, 1]) -> inputs` that a keras.applications model expects."""
    module = APPLICATION_PREPROCESSING.get(name)
    if module is None:
        return None
    preprocess = getattr(keras.applications, module).preprocess_input
    return lambda images: preprocess(images * 255.0)

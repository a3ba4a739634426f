"""Reference architectures: the teachers of our demos and benchmarks.

`build(name, input_shape, num_classes, width=1.0)` makes any of them by name
(`ARCHITECTURES`), at any width: `width` scales every layer's channels, which
gives the same-size "thin student" baselines of the benchmarks. Layer names
do not depend on the width, so a thin student's features line up with its
teacher's by name.
"""

import keras

from micik_tf.validation import one_of


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


# VGG-16's layout in miniature for 28x28 images: conv stages of 1, 2, 3 and 2
# convolutions, each stage pooled, then VGG's three-layer classifier.
VGG_COMPACT_STAGES = ((16,), (32, 32), (64, 64, 64), (128, 128))
VGG_COMPACT_DENSE = 512


def vgg_compact(input_shape=(28, 28, 1), num_classes=10, width=1.0, name="vgg_compact", api=None):
    """VGG-16's shape, small enough to train on 2 CPU cores.

    Four pooled stages of 3x3 convolutions with BatchNorm (16, 32-32,
    64-64-64, 128-128 channels), global average pooling, and VGG's classifier:
    two hidden Dense layers of 512 and the logits. As in VGG-16 the first
    stages hold the computation and the classifier about half the parameters,
    and layers of one input shape repeat (convolutions reading 32, 64 or 128
    channels, and the two Dense layers that read 512 features), which is where
    cross-layer bases can be shared. 663,258 parameters and 9.7M
    multiply-adds per 28x28x1 image.

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: number of logits.
        width: multiplier of every layer's channels and units (the same-size
            "thin" baselines).
        api: the Keras module to build with (default Keras 3); `tf_keras`
            builds the same network for tensorflow-model-optimization.
    """
    api = api or keras
    inputs = api.Input(input_shape, name="image")
    x, conv, size = inputs, 0, min(input_shape[:2])
    for stage, channels in enumerate(VGG_COMPACT_STAGES, start=1):
        for c in channels:
            conv += 1
            x = api.layers.Conv2D(_scaled(c, width), 3, padding="same", use_bias=False,
                                  name=f"conv{conv}")(x)
            x = api.layers.BatchNormalization(momentum=0.9, name=f"bn{conv}")(x)
            x = api.layers.ReLU(name=f"relu{conv}")(x)
        # A pool is skipped once the map is 1x1, so 8x8 digits work too.
        if size > 1:
            x = api.layers.MaxPooling2D(name=f"pool{stage}")(x)
            size //= 2
    x = api.layers.GlobalAveragePooling2D(name="gap")(x)
    for i in (1, 2):
        x = api.layers.Dense(_scaled(VGG_COMPACT_DENSE, width), activation="relu",
                             name=f"fc{i}")(x)
        x = api.layers.Dropout(0.3, name=f"drop{i}")(x)
    outputs = api.layers.Dense(num_classes, name="logits")(x)
    return api.Model(inputs, outputs, name=name)


# The VGG-16 conv stack (Simonyan & Zisserman 2015, configuration D); "M" is
# a 2x2 max-pool.
VGG16_STACK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
               512, 512, 512, "M", 512, 512, 512, "M")


def cifar_vgg16(input_shape=(32, 32, 3), num_classes=10, dense=512, width=1.0,
                name="cifar_vgg16"):
    """VGG-16 for small images: the usual 13-conv stack with BatchNorm, and a
    small classifier head (one hidden Dense layer) instead of the 4096-wide
    ImageNet head, as in the CIFAR literature.

    Args:
        input_shape: `(height, width, channels)`; 32x32 pools five times, as
            in the paper. A pool is skipped once the feature map is 1x1, so
            8x8 digits work too.
        num_classes: number of logits.
        dense: width of the hidden Dense layer.
        width: multiplier of every conv's channels (0.5: the half-width
            VGG-16-BN of our benchmarks, 3.8M parameters on digits).
    """
    if not width > 0:
        raise ValueError(f"Received an invalid value for `width`, expected a positive "
                         f"number. Received: width={width!r}")
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    size = min(input_shape[:2])
    conv = 0
    for item in VGG16_STACK:
        if item == "M":
            if size > 1:
                x = keras.layers.MaxPooling2D(name=f"pool{conv}")(x)
                size //= 2
            continue
        conv += 1
        x = keras.layers.Conv2D(max(1, int(round(item * width))), 3, padding="same",
                                use_bias=False, name=f"conv{conv}")(x)
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


# GoogLeNet (Szegedy et al. 2015, Table 1): per inception module, the widths
# of the 1x1 branch, the 3x3 reduce and 3x3, the 5x5 reduce and 5x5, and the
# pool projection. "M" is a 3x3/2 max-pool.
GOOGLENET_STACK = (
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)), "M",
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)), "M",
    ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)),
)


def _conv(x, filters, size, name, strides=1):
    x = keras.layers.Conv2D(filters, size, strides=strides, padding="same",
                            use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _inception(x, name, widths):
    b1, r3, b3, r5, b5, pool = widths
    branch1 = _conv(x, b1, 1, f"inception{name}_1x1")
    branch3 = _conv(_conv(x, r3, 1, f"inception{name}_3x3_reduce"), b3, 3, f"inception{name}_3x3")
    # The paper's 5x5 branch, kept as one 5x5 convolution.
    branch5 = _conv(_conv(x, r5, 1, f"inception{name}_5x5_reduce"), b5, 5, f"inception{name}_5x5")
    pooled = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"inception{name}_pool")(x)
    branch_pool = _conv(pooled, pool, 1, f"inception{name}_pool_proj")
    return keras.layers.Concatenate(name=f"inception{name}")([branch1, branch3, branch5, branch_pool])


def googlenet(input_shape=(224, 224, 3), num_classes=1000, cifar_stem=None, name="googlenet"):
    """GoogLeNet (Inception v1), the paper's second model, after its Table 1.

    Keras ships no Inception v1. This follows the original layer table (nine
    inception modules, global average pooling, dropout 0.4, one classifier),
    with BatchNorm after each convolution (as later Inception versions do) and
    without the two auxiliary classifiers, which only serve training.

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: number of logits.
        cifar_stem: for small images (default: when the input is 64 pixels
            or smaller) the 7x7/2 stem and first pools are replaced by one 3x3
            convolution to 192 channels at stride 1, as in CIFAR variants.
    """
    inputs = keras.Input(input_shape, name="image")
    if cifar_stem is None:
        cifar_stem = min(input_shape[:2]) <= 64
    if cifar_stem:
        x = _conv(inputs, 192, 3, "stem")
    else:
        x = _conv(inputs, 64, 7, "conv1", strides=2)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
        x = _conv(x, 64, 1, "conv2_reduce")
        x = _conv(x, 192, 3, "conv2")
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    pools = 0
    for item in GOOGLENET_STACK:
        if item == "M":
            pools += 1
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{pools + 2}")(x)
        else:
            x = _inception(x, *item)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vit_tiny(input_shape=(28, 28, 1), num_classes=10, dim=64, depth=4, heads=4, mlp=128,
             patch=4, attention="einsum", name="vit_tiny"):
    """A small Vision Transformer. With `attention="einsum"` its blocks are
    built as keras-hub builds them: the query, key and value projections are
    `EinsumDense` layers (`"abc,cde->abde"`, one per head group) in the
    functional graph, and the heads are merged by a reshape and a Dense. With
    `attention="mha"` each block's attention is one
    `keras.layers.MultiHeadAttention` layer, which holds its four
    projections (compress() opens it). The feed-forward block is two Dense
    layers. Positions come from a depthwise convolution on the patch grid (a
    conditional positional encoding, Chu et al. 2021), which needs no custom
    layer. Pre-norm blocks, average pooling over tokens.
    """
    attention = one_of("attention", attention, ("einsum", "mha"))
    head_dim = dim // heads
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(dim, patch, strides=patch, name="patch_embed")(inputs)
    x = keras.layers.Add(name="pos_add")(
        [x, keras.layers.DepthwiseConv2D(3, padding="same", name="pos_conv")(x)])
    tokens = (input_shape[0] // patch) * (input_shape[1] // patch)
    x = keras.layers.Reshape((tokens, dim), name="tokens")(x)
    for i in range(depth):
        block = f"block{i + 1}"
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{block}_ln1")(x)
        if attention == "mha":
            h = keras.layers.MultiHeadAttention(heads, head_dim, name=f"{block}_attn")(h, h)
            x = keras.layers.Add(name=f"{block}_res1")([x, h])
            x = _feed_forward(x, block, dim, mlp)
            continue
        q, k, v = (keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, heads, head_dim),
                                            bias_axes="de", name=f"{block}_{n}")(h)
                   for n in ("query", "key", "value"))
        scores = keras.layers.Softmax(axis=-1, name=f"{block}_softmax")(
            keras.ops.einsum("abhd,afhd->ahbf", q, k) / float(head_dim) ** 0.5)
        h = keras.ops.einsum("ahbf,afhd->abhd", scores, v)
        h = keras.layers.Reshape((tokens, dim), name=f"{block}_merge")(h)
        h = keras.layers.Dense(dim, name=f"{block}_attn_out")(h)
        x = keras.layers.Add(name=f"{block}_res1")([x, h])
        x = _feed_forward(x, block, dim, mlp)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x), name=name)


def _feed_forward(x, block, dim, mlp):
    h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{block}_ln2")(x)
    h = keras.layers.Dense(mlp, activation="gelu", name=f"{block}_mlp1")(h)
    h = keras.layers.Dense(dim, name=f"{block}_mlp2")(h)
    return keras.layers.Add(name=f"{block}_res2")([x, h])


def _vit_tiny(input_shape, num_classes, width, attention="einsum", name="vit_tiny"):
    return vit_tiny(input_shape, num_classes, dim=_scaled(64, width), mlp=_scaled(128, width),
                    heads=4 if width >= 1 else 2, attention=attention, name=name)


def _scaled(channels, width):
    return max(1, int(round(channels * width)))


def _vgg_style(input_shape, num_classes, width):
    return vgg_style(input_shape, num_classes,
                     widths=tuple(_scaled(c, width) for c in (64, 64, 128, 128, 256, 256)),
                     dense=_scaled(256, width))


def _vgg_style_small(input_shape, num_classes, width):
    return vgg_style(input_shape, num_classes,
                     widths=tuple(_scaled(c, width) for c in (16, 16, 32, 32)),
                     dense=_scaled(32, width), name="vgg_style_small")


def _cifar_vgg16(input_shape, num_classes, width):
    return cifar_vgg16(input_shape, num_classes, dense=_scaled(512, width), width=width)


def _vgg16_half(input_shape, num_classes, width):
    return cifar_vgg16(input_shape, num_classes, dense=_scaled(256, width), width=0.5 * width,
                       name="vgg16_half")


def _googlenet(input_shape, num_classes, width):
    if width != 1:
        raise ValueError("googlenet is built at its published widths only (width=1).")
    return googlenet(input_shape, num_classes)


# Name -> `fn(input_shape, num_classes, width) -> keras.Model`.
ARCHITECTURES = {
    "vgg_compact": lambda s, c, w: vgg_compact(s, c, width=w),
    "vgg_style": _vgg_style,
    "vgg_style_small": _vgg_style_small,
    "cifar_vgg16": _cifar_vgg16,
    "vgg16_half": _vgg16_half,
    "googlenet": _googlenet,
    "vit_tiny": _vit_tiny,
    "vit_mha": lambda s, c, w: _vit_tiny(s, c, w, attention="mha", name="vit_mha"),
}


def build(name, input_shape, num_classes, width=1.0, api=None):
    """A reference architecture by name, with every layer's channels scaled by
    `width` (1.0: the published widths).

    Args:
        api: another Keras module to build with (`tf_keras`); only
            `vgg_compact` supports it.

    Raises:
        ValueError: for an unknown name, naming the known ones.
    """
    if name not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)}."
        )
    if api is not None:
        if name != "vgg_compact":
            raise ValueError(f"Architecture {name!r} is built with Keras 3 only (api=None).")
        return vgg_compact(tuple(input_shape), int(num_classes), width=float(width), api=api)
    return ARCHITECTURES[name](tuple(input_shape), int(num_classes), float(width))

"""Reference architectures build, match their papers' sizes, and compress."""

import numpy as np

import micik_tf
from micik_tf import models


def test_googlenet_imagenet_matches_the_paper():
    model = models.googlenet((224, 224, 3), 1000)
    # Szegedy et al. report about 6.8M parameters (no auxiliary heads); BatchNorm adds a few.
    assert 6.5e6 < model.count_params() < 7.2e6
    assert model.output.shape == (None, 1000)
    assert model.get_layer("inception5b").output.shape == (None, 7, 7, 1024)


def test_googlenet_cifar_compresses_and_runs():
    # 16x16 inputs: the same layers (the CIFAR stem), a quarter of the compute.
    model = models.googlenet((16, 16, 3), 10)
    compressed = micik_tf.compress(model, ratio=6.0, verbose=0)
    rep = micik_tf.report(compressed)
    assert abs(rep.ratio / 6.0 - 1) <= 0.02
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    assert compressed.predict(x, verbose=0).shape == (2, 10)


def test_cifar_vgg16_shape():
    model = models.cifar_vgg16((32, 32, 3), 10)
    convs = [l for l in model.layers if l.name.startswith("conv")]
    assert len(convs) == 13 and model.output.shape == (None, 10)


def test_vit_tiny_projections_are_all_compressible():
    from micik_tf.compression.grouping import find_sites, group_sites

    model = models.build("vit_tiny", (28, 28, 1), 10)
    sites, untouched = find_sites(model)
    kinds = {}
    for site in sites:
        kinds.setdefault(site.kind, []).append(site.name)
    # q, k, v of 4 blocks are EinsumDense; head merge, MLPs and logits Dense.
    assert len(kinds["einsum"]) == 12 and len(kinds["dense"]) == 13
    assert set(untouched) >= {"pos_conv", "final_ln"}
    # Every projection from the 64-wide stream (q, k, v, the MLPs' first
    # layers, the head merge) is one candidate group for a shared input basis.
    groups = [[s.name for s in members] for side, members in group_sites(sites, share="input")]
    (stream,) = [g for g in groups if "block1_query" in g]
    assert {"block4_value", "block2_mlp1", "block3_attn_out", "logits"} <= set(stream)
    compressed = micik_tf.compress(model, ratio=4, verbose=0)
    assert micik_tf.report(compressed).ratio > 3.9


def test_vit_mha_opens_multi_head_attention():
    from micik_tf.compression.grouping import find_sites

    model = models.build("vit_mha", (28, 28, 1), 10)
    sites, _ = find_sites(model)
    held = sorted(s.name for s in sites if s.held)
    # q, k, v and the output projection of each block's MultiHeadAttention.
    assert len(held) == 16 and "block2_attn/attention_output" in held
    compressed = micik_tf.compress(model, ratio=4, verbose=0)
    rep = micik_tf.report(compressed)
    assert rep.ratio > 3.9 and any(layer["name"].startswith("block1_attn/") for layer in rep.layers)
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype("float32")
    assert compressed(x).shape == (2, 10)

"""The Vision Transformer evidence with keras.layers.MultiHeadAttention.

The `vit` suite's protocol on `micik_tf.models.vit_tiny(attention="mha")`:
each block's attention is one MultiHeadAttention layer, whose query, key,
value and output projections compress() finds inside it
(`micik_tf.layers.CompressedBlock`), so MICIK can share a basis across the
projections of every block and the feed-forward layers. Two seeds; the
scratch state is `.vit_mha_work/`.

    python tools/benchmark.py --suite=vit_mha
"""

import dataclasses

from benchmarks import curve, vit

PROTOCOL = dataclasses.replace(
    vit.PROTOCOL, arch="vit_mha",
    regimes=(("limited", curve.Regime(0.1, 3, (2.0, 4.0, 8.0), 2, ("micik", "per_layer"))),))
SMOKE = dataclasses.replace(vit.SMOKE, arch="vit_mha")


def run_suite(smoke, output_dir):
    return curve.run_suite(SMOKE if smoke else PROTOCOL, output_dir, work_name=".vit_mha_work")


def markdown(result, command):
    return curve.markdown(result, command, stem="vit_mha")


def plot(result, path):
    return curve.plot(result, path)

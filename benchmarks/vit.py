"""The Vision Transformer evidence: MICIK against per-layer SVD on attention
and feed-forward weights.

A small ViT (`micik_tf.models.vit_tiny`: EinsumDense query/key/value
projections, Dense head merge and feed-forward layers) is trained once on
Fashion-MNIST, compressed at 2x, 4x and 8x by MICIK and by per-layer SVD
(same calibration data, same budget), and each student is recovered the same
way (same steps, learning rate and best-epoch rule) on a fixed 10% of the
training data. It is the curve suite's protocol with another architecture
and two methods, so the splits, the teacher recipe and the rows are the same
kinds of thing; the scratch state is `.vit_work/`.

    python tools/benchmark.py --suite=vit
"""

import dataclasses

from benchmarks import curve

PROTOCOL = curve.Protocol(
    arch="vit_tiny", teacher_epochs=10, teacher_learning_rate=1e-3,
    regimes=(("limited", curve.Regime(0.1, 3, (2.0, 4.0, 8.0), 1, ("micik", "per_layer"))),),
    tune=False,
)
SMOKE = dataclasses.replace(
    curve.SMOKE, arch="vit_tiny", tune=False,
    regimes=(("limited", curve.Regime(0.5, 1, (2.0,), 1, ("micik", "per_layer"))),))


def run_suite(smoke, output_dir):
    return curve.run_suite(SMOKE if smoke else PROTOCOL, output_dir, work_name=".vit_work")


def markdown(result, command):
    return curve.markdown(result, command, stem="vit")


def plot(result, path):
    return curve.plot(result, path)

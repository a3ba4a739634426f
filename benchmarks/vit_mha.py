"""The Vision Transformer evidence with keras.layers.MultiHeadAttention.

The `vit` suite's protocol on `micik_tf.models.vit_tiny(attention="mha")`:
each block's attention is one MultiHeadAttention layer, whose query, key,
value and output projections compress() finds inside it
(`micik_tf.layers.CompressedBlock`), so MICIK can share a basis across the
projections of every block and the feed-forward layers. Beside per-layer
SVD, the baselines a user would pick instead: LAMP magnitude pruning and the
thin transformer trained from scratch with distillation; MICIK in both modes
(low-rank and sparse unique parts) and in the best mode the curve found
(`micik_common_sparse_gradual_no_sequential`: shared basis plus a gradually
pruned sparse part, at the largest nonzero share whose minimum ranks fit:
0.375 at 8x; its sequential-calibration ablation is the curve's only).
Channel pruning (`micik_tf.prune_channels`) takes chains of layers only, and a
transformer's residual branches are not one; the thin transformer is the
structured peer on the latency and memory axes. Both limited budgets (3 and 15 epochs on
10% of the data), two seeds, every method at the same learning rate (not
tuned, as for `vit`); the scratch state is `.vit_mha_work/`.

    python tools/benchmark.py --suite=vit_mha
"""

import dataclasses
import functools

from benchmarks import curve, vit

METHODS = ("micik", "micik_sparse", "per_layer", "pruning", "thin", curve.BEST_MODES[0])
PROTOCOL = dataclasses.replace(
    vit.PROTOCOL, arch="vit_mha",
    regimes=(("limited", curve.Regime(0.1, 3, (2.0, 4.0, 8.0), 2, METHODS)),
             ("limited_long", curve.Regime(0.1, 15, (2.0, 4.0, 8.0), 2, METHODS))))
SMOKE = dataclasses.replace(vit.SMOKE, arch="vit_mha")

markdown = functools.partial(curve.markdown, stem="vit_mha")
plot = curve.plot


def run_suite(smoke, output_dir, methods=None, workers=1):
    return curve.run_suite(SMOKE if smoke else PROTOCOL, output_dir, work_name=".vit_mha_work",
                           methods=methods, workers=workers)


def progress(smoke, output_dir):
    return curve.progress(SMOKE if smoke else PROTOCOL, output_dir, work_name=".vit_mha_work")

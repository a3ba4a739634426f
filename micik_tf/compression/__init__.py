"""Compression: a trained model in, a smaller MICIK model out.

The steps, one module each: find and group the compressible layers
(`grouping`), measure their inputs on calibration data (`calibration`),
factorize (`decomposition`), allocate the ranks (`allocation`, driven by
`planning`), rebuild the model around the factorized layers (`graph`,
`compress`), and read what was done back off the model (`report`). `channels` is the
structured-pruning alternative: whole channels removed, a smaller dense model.
"""

from micik_tf.compression.calibration import recalibrate_batchnorm
from micik_tf.compression.channels import prune_channels
from micik_tf.compression.compress import DEFAULT_RATIO, MODES, compress
from micik_tf.compression.report import Report, report

__all__ = ["DEFAULT_RATIO", "MODES", "Report", "compress", "prune_channels",
           "recalibrate_batchnorm", "report"]

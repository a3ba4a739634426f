"""Compression: a trained model in, a smaller MICIK model out.

The steps, one module each: find and group the compressible layers
(`grouping`), measure their inputs on calibration data (`calibration`),
factorize (`decomposition`), allocate the ranks (`allocation`, driven by
`planning`), rebuild the model around the factorized layers (`graph`,
`compress`), and read what was done back off the model (`report`).
"""

from micik_tf.compression.calibration import recalibrate_batchnorm
from micik_tf.compression.compress import DEFAULT_RATIO, MODES, compress
from micik_tf.compression.report import Report, report

__all__ = ["DEFAULT_RATIO", "MODES", "Report", "compress", "recalibrate_batchnorm", "report"]

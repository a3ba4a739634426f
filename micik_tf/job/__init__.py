"""The recovery job: compress a teacher, recover the student, export it.

`tools/train.py` is its command line. `RunConfig` holds the settings (and
their checks), `run()` runs the steps: the run's folder (`workspace`), the
data (`data`), the teacher (`teacher`), the student (`student`), recovery,
and what the run leaves behind (`outputs`).
"""

from micik_tf.job.config import ExportError, RunConfig, UsageError
from micik_tf.job.outputs import summary_table
from micik_tf.job.run import run

__all__ = ["ExportError", "RunConfig", "UsageError", "run", "summary_table"]

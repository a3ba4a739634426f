"""The memory a TFLite model holds at run time: peak resident memory of one
inference, in a fresh process.

A `.tflite` file's size is what a user downloads; what the interpreter holds
while it runs is different: its tensor arena (activations), the weights as
LiteRT keeps them (the delegate may repack them), and the interpreter itself.
Each model is loaded in a fresh Python process that has already imported
LiteRT; its peak resident set size is reset (Linux `/proc/self/clear_refs`),
one batch-1 inference runs, and the peak increase over the resident size
before the interpreter existed is the model's runtime memory. The same
measure of a trivial model (one multiply) is subtracted, so that what the
interpreter costs whatever it runs does not count (`METHOD`).
"""

import json
import os
import subprocess
import sys
import tempfile

METHOD = ("peak RSS increase of a fresh process over one batch-1 inference (interpreter "
          "created, tensors allocated, one invoke), minus the same for a trivial one-op model")

_PROBE = r"""
import json, resource, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None

path, threads = sys.argv[1], int(sys.argv[2])
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
interpreter = Interpreter(model_path=path, num_threads=threads)
(source,) = interpreter.get_input_details()
shape = [1] + [int(d) for d in source["shape"][1:]]
if list(source["shape"]) != shape:
    interpreter.resize_tensor_input(source["index"], shape)
interpreter.allocate_tensors()
interpreter.set_tensor(source["index"], np.zeros(shape, source["dtype"]))
interpreter.invoke()
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_increase_bytes": peak - before, "peak_reset": reset}))
"""


def _probe(path, threads):
    result = subprocess.run([sys.executable, "-c", _PROBE, path, str(threads)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {path}: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_increase_bytes"]


def _trivial_model(folder):
    """A one-multiply `.tflite` file: what any model costs beyond its own."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 1], tf.float32)])
    def double(x):
        return x * 2.0

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [double.get_concrete_function()], double)
    path = os.path.join(folder, "trivial.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    return path


def runtime_memory(paths, threads=1, repeats=3):
    """Each model's runtime memory in bytes (see the module docstring).

    Args:
        paths: `{name: .tflite path}`.
        threads: interpreter threads.
        repeats: fresh processes per model; the median is kept (page
            accounting varies by a few pages from run to run).

    Returns:
        `{"bytes": {name: bytes}, "baseline_bytes": the trivial model's,
        "method": METHOD}`.
    """
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        trivial = _trivial_model(folder)
        baseline = float(np.median([_probe(trivial, threads) for _ in range(repeats)]))
    out = {}
    for name, path in paths.items():
        peak = float(np.median([_probe(path, threads) for _ in range(repeats)]))
        out[name] = int(max(peak - baseline, 0))
    return {"bytes": out, "baseline_bytes": int(baseline), "method": METHOD}

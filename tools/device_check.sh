#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and TensorFlow for CUDA installed
# (`pip install "tensorflow[and-cuda]==2.21.*"` and `pip install -e .`; see
# BUILD_NOTES.md). Runs within about 8 minutes on one GPU and writes one JSON:
#
#   tools/device_check.sh [OUT_DIR]      # default: benchmarks/results
#
# 1. nvidia-smi;
# 2. the tests that exercise strategies and mixed precision;
# 3. tools/train.py on the CIFAR-size flagfile (mock CIFAR-10, a few hundred
#    steps) with --strategy=mirrored and mixed precision;
# 4. examples per second of the teacher's and the student's training step, as a ratio;
# 5. the pipeline and calibration benchmarks of the scale suite at GPU batch sizes.
# Without TensorFlow there (the lent machines have JAX only), it records that,
# and measures the teacher's and the 16x student's step on Keras's JAX backend
# instead (benchmarks/gpu_step_ratio.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$(mktemp -d)
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME TIMEOUT COMMAND...: runs it, keeps its exit code and log tail
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local code=$?
  echo "{\"step\": \"$name\", \"exit\": $code, \"seconds\": $(( $(date +%s) - start ))}" >>"$LOG/steps.jsonl"
  echo "== $name: exit $code"
}

step nvidia_smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step tensorflow_gpu 120 "$PY" -c "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); print(tf.__version__, gpus); assert gpus, 'TensorFlow sees no GPU'"
if [ "$(tail -1 "$LOG/steps.jsonl" | grep -c '"exit": 0')" != 1 ]; then
  # Without TensorFlow on the GPU every later step would fail the same way:
  # record why and stop (a machine without `tensorflow[and-cuda]`, or no GPU).
  "$PY" -c "import sys; print(sys.version.split()[0], sys.executable)" >"$LOG/python.log" 2>&1
  echo "{\"step\": \"python\", \"exit\": $?, \"seconds\": 0}" >>"$LOG/steps.jsonl"
  SKIP=1
  # Keras on JAX still measures the compressed layers on the GPU, where JAX
  # is there: the models written by `benchmarks/gpu_step_ratio.py --write_models`.
  if [ -f "${GPU_MODELS:-.gpu}/student.json" ]; then
    step jax_step_ratio 400 env KERAS_BACKEND=jax "$PY" benchmarks/gpu_step_ratio.py \
        --models="${GPU_MODELS:-.gpu}"
  fi
fi
if [ -z "${SKIP:-}" ]; then
step tests 240 "$PY" -m pytest -q -p no:cacheprovider -k "mirrored or mixed_precision" \
    tests/test_training.py tests/test_pruning.py
step train_mirrored_mixed 240 "$PY" - <<'PYEOF'
import json, os, sys, tempfile
import tensorflow_datasets as tfds
sys.path.insert(0, "tools")
import train
from absl import flags
train.define_flags()
model_dir = tempfile.mkdtemp()
flags.FLAGS(["train", "--flagfile=flags/cifar10_vgg16.cfg", f"--model_dir={model_dir}",
             "--strategy=mirrored", "--num_gpus=1", "--mixed_precision", "--epochs=1",
             "--steps_per_epoch=300", "--teacher_epochs=1", "--batch_size=256", "--verbose=0"])
with tfds.testing.mock_data(num_examples=300 * 256):
    assert train.main(["train"]) == 0
report = json.load(open(os.path.join(model_dir, "report.json")))
print(json.dumps({"steps": report["steps"], "replicas": report["replicas"],
                  "examples_per_second": report["history"][-1]["examples_per_second"]}))
PYEOF
step train_step_ratio 180 "$PY" - <<'PYEOF'
import json, time, numpy as np, keras, tensorflow as tf, micik_tf
from micik_tf import models
teacher = models.cifar_vgg16((32, 32, 3), 10)
student = micik_tf.compress(teacher, ratio=16, verbose=0)
x = np.random.rand(256, 32, 32, 3).astype("float32"); y = np.random.randint(0, 10, 256)
rates = {}
for name, model in (("teacher", teacher), ("student", student)):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)
    tic = time.perf_counter()
    for _ in range(30):
        model.train_on_batch(x, y)
    rates[name] = 30 * 256 / (time.perf_counter() - tic)
print(json.dumps({"examples_per_second": rates, "student_over_teacher": rates["student"] / rates["teacher"]}))
PYEOF
step scale_pipeline 120 "$PY" benchmarks/scale.py --part=pipeline --examples=20000
step scale_calibration 180 "$PY" benchmarks/scale.py --part=calibration --images=128
fi

# One JSON: every step's exit code, seconds and the last line it printed.
"$PY" - "$LOG" "$OUT/device_check.json" <<'PYEOF'
import json, os, subprocess, sys, datetime
log, out = sys.argv[1], sys.argv[2]
steps = [json.loads(line) for line in open(os.path.join(log, "steps.jsonl"))]
for step in steps:
    lines = open(os.path.join(log, step["step"] + ".log")).read().strip().splitlines()
    step["last_line"] = lines[-1][-2000:] if lines else ""
    try:  # a step that prints one JSON line last: kept whole
        step["result"] = json.loads(lines[-1])
        step["last_line"] = "(result)"
    except (IndexError, ValueError):
        pass
# A copy of the tree without .git (a lent machine) names its commit in GIT_COMMIT.
commit = os.environ.get("GIT_COMMIT") or subprocess.run(
    ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"command": "tools/device_check.sh", "completed": all(s["exit"] == 0 for s in steps),
           "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "steps": steps}, open(out, "w"), indent=2)
print("wrote", out)
PYEOF

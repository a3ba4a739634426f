"""Training and inference throughput of the CIFAR-size VGG-16 against its
16x MICIK student, on whatever accelerator Keras's backend sees.

The lent GPU machine has JAX but no TensorFlow (and TensorFlow for CUDA is
far larger than what may be carried there), so this runs in two halves:

    # here, with TensorFlow: compress, and write both architectures as JSON
    python benchmarks/gpu_step_ratio.py --write_models=.gpu
    # there, on Keras's JAX backend: the layers alone, no TensorFlow
    KERAS_BACKEND=jax python3 benchmarks/gpu_step_ratio.py --models=.gpu

The second half imports only `micik_tf.layers` (backend-agnostic
`keras.ops`), rebuilds both models from their configs with fresh random
weights (throughput does not depend on the values), and times
`train_on_batch` and `predict_on_batch` after a warm-up, in float32 and in mixed bfloat16 (the
usual GPU setting), one JSON on stdout.
"""

import argparse
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = 16
MIN_STEPS, MIN_SECONDS = 20, 2.0


def write_models(folder):
    import micik_tf
    from micik_tf import models

    teacher = models.cifar_vgg16((32, 32, 3), 10)
    student = micik_tf.compress(teacher, ratio=RATIO, verbose=0)
    os.makedirs(folder, exist_ok=True)
    for name, model in (("teacher", teacher), ("student", student)):
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            f.write(model.to_json())
    print(json.dumps({"teacher_params": teacher.count_params(),
                      "student_params": student.count_params()}))


def _import_layers_only():
    """Registers micik_tf's layers without the package's __init__, which
    imports the TensorFlow-only compression and recovery code."""
    package = types.ModuleType("micik_tf")
    package.__path__ = [os.path.join(ROOT, "micik_tf")]
    sys.modules.setdefault("micik_tf", package)
    import micik_tf.layers  # noqa: F401  (registers the serializable layers)


def _rate(step, batch):
    """Examples per second over at least MIN_STEPS steps and MIN_SECONDS."""
    for _ in range(3):  # compile and warm up
        step()
    steps, tic = 0, time.perf_counter()
    while steps < MIN_STEPS or time.perf_counter() - tic < MIN_SECONDS:
        step()  # returns host values: each step has finished
        steps += 1
    return steps * batch / (time.perf_counter() - tic)


def _with_policy(config, policy):
    """The model config with every layer's float32 policy replaced."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and config["config"]["name"] == "float32":
            return dict(config, config=dict(config["config"], name=policy))
        return {k: _with_policy(v, policy) for k, v in config.items()}
    if isinstance(config, list):
        return [_with_policy(v, policy) for v in config]
    return config


def measure(folder, batches, policies):
    import numpy as np

    _import_layers_only()
    import keras

    rates = {}
    for name in ("teacher", "student"):
        with open(os.path.join(folder, f"{name}.json")) as f:
            config = json.load(f)
        rates[name] = {}
        for policy in policies:
            model = keras.saving.deserialize_keras_object(_with_policy(config, policy))
            model.compile(keras.optimizers.Adam(1e-3),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            rates[name]["params"] = int(model.count_params())
            for batch in batches:
                x = np.random.rand(batch, 32, 32, 3).astype("float32")
                y = np.random.randint(0, 10, batch)
                rates[name][f"train_{policy}_examples_per_second_b{batch}"] = _rate(
                    lambda: model.train_on_batch(x, y), batch)
                rates[name][f"predict_{policy}_examples_per_second_b{batch}"] = _rate(
                    lambda: model.predict_on_batch(x), batch)
    ratios = {k: rates["student"][k] / rates["teacher"][k]
              for k in rates["teacher"] if k != "params"}
    return {"backend": keras.backend.backend(), "keras": keras.__version__,
            "devices": _devices(keras.backend.backend()), "ratio": RATIO,
            "min_steps": MIN_STEPS, "min_seconds": MIN_SECONDS,
            "models": rates, "student_over_teacher": ratios}


def _devices(backend):
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write_models", help="folder to write the two architectures to")
    parser.add_argument("--models", help="folder to read them from, and measure")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    args = parser.parse_args()
    if args.write_models:
        write_models(args.write_models)
    if args.models:
        print(json.dumps(measure(args.models, [int(b) for b in args.batches.split(",")],
                                 args.policies.split(","))))


if __name__ == "__main__":
    main()

"""micik_tf: MICIK cross-layer compression for Keras 3 (TensorFlow backend)."""

from setuptools import find_packages, setup

setup(
    name="micik_tf",
    version="0.1.0",
    description=(
        "Mining Cross-Layer Inherent Similarity Knowledge (MICIK) compression "
        "for Keras 3 models: shared bases, unique low-rank parts, recovery "
        "training, deployment."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["micik_tf", "micik_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # TF 2.20/2.21 ship Keras 3 as tf.keras; keras >= 3.12 has
        # keras.distillation, which the recovery losses build on.
        "tensorflow>=2.20,<2.22",
        "keras>=3.12,<4",
        "tensorflow-datasets>=4.9",
        # tensorflow-model-optimization (the `tfmot` extra, a benchmark
        # baseline) pins absl-py below 2; TensorFlow needs >= 1.0.
        "absl-py>=1.2",
        # tf.summary needs it; TF 2.21 no longer installs it.
        "tensorboard>=2.19",
        "numpy>=1.26",
        # Cholesky factors and triangular solves of calibration covariances.
        "scipy>=1.10",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "scikit-learn>=1.4", "ai-edge-litert>=1.2",
                 "matplotlib>=3.8"],
        "demo": ["scikit-learn>=1.4", "matplotlib>=3.8"],
        # tensorflow-model-optimization works on tf_keras (Keras 2) only. It is
        # the curve benchmark's peer baseline and runs in a subprocess of its
        # own (benchmarks/tfmot_baseline.py); micik_tf never imports it.
        "tfmot": ["tensorflow-model-optimization>=0.8", "tf_keras>=2.20,<2.22"],
    },
)

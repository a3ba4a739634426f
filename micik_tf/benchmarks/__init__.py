"""Benchmark suites behind `tools/benchmark.py`: each module has
`run_suite(...) -> results dict` and `markdown(result, command) -> str`."""


def digits_run(teacher_arch, smoke, epochs, **overrides):
    """A `recovery_run.RunConfig` for a suite on the bundled digits: the
    demo's recipe (Adam from 2e-3 with a cosine decay, batch 64, a teacher
    trained for 20 epochs), quiet, without mid-epoch checkpoints. `smoke`
    swaps in a tiny teacher, one epoch of two steps, and rank floors of 1."""
    from micik_tf import recovery_run
    from micik_tf.training import RecoveryConfig

    settings = dict(
        model_dir="", dataset="digits", teacher="train",
        teacher_arch="vgg_style_small" if smoke else teacher_arch,
        teacher_epochs=1 if smoke else 20, verbose=0,
        steps_per_epoch=2 if smoke else None,
        min_rank=1 if smoke else None,
        recovery=RecoveryConfig(epochs=1 if smoke else epochs, batch_size=64,
                                learning_rate=2e-3, checkpoint_every=1_000_000),
    )
    settings.update(overrides)
    return recovery_run.RunConfig(**settings)

"""What the benchmark suites share: the digits recovery recipe and figures."""


def digits_run(teacher_arch, smoke, epochs, **overrides):
    """A `RunConfig` for a suite on the bundled digits: the demo's recipe
    (Adam from 2e-3 with a cosine decay, batch 64, a teacher trained for 20
    epochs), quiet, without mid-epoch checkpoints. `smoke` swaps in a tiny
    teacher, one epoch of two steps, and rank floors of 1."""
    from micik_tf.job import RunConfig

    settings = dict(
        model_dir="", dataset="digits", teacher="train",
        teacher_arch="vgg_style_small" if smoke else teacher_arch,
        teacher_epochs=1 if smoke else 20, verbose=0,
        steps_per_epoch=2 if smoke else None,
        min_rank=1 if smoke else None,
        epochs=1 if smoke else epochs, batch_size=64,
        learning_rate=2e-3, checkpoint_every=1_000_000,
    )
    settings.update(overrides)
    return RunConfig(**settings)


def figure(*subplots, size=(8, 5)):
    """A `matplotlib.figure.Figure` and its axes, made without pyplot, so no
    backend or global figure state is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots(*subplots) if subplots else fig.subplots()


def git_commit():
    """The repository's HEAD commit, with "-dirty" when tracked files have
    uncommitted changes (None outside a git checkout). The results folder
    does not count: the suites write it, one after another, before the
    results are committed."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None

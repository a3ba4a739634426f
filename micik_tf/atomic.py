"""Atomic file writes: a reader never sees a half-written file, and a failure
never leaves one behind or damages the file that was there."""

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` when the
    block succeeds and removes it when the block fails.

    The temporary name keeps `path`'s extension, since Keras and matplotlib
    choose the format by it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index("."):] if "." in name else ""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_figure(figure, path, dpi=100):
    """Saves a matplotlib figure atomically (format from the extension) and
    closes it, whether or not the save succeeds."""
    from matplotlib import pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=dpi)
    finally:
        plt.close(figure)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)

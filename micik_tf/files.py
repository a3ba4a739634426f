"""Files the toolkit writes and reads, safely.

Writes are atomic: a reader never sees a half-written file, and a failure
never leaves one behind or damages the file that was there (write to a
temporary path beside the target, then rename). Models are loaded with Keras'
`safe_mode` on, and every way a file can fail to load becomes one
`ValueError` line that says what the file is and what to give instead.
"""

import contextlib
import json
import os
import tempfile
import zipfile

import numpy as np

from micik_tf.errors import first_line


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` when the
    block succeeds and removes it when the block fails.

    The temporary name keeps `path`'s extension (from the first dot, so
    `best.weights.h5` stays `.weights.h5`), since Keras and matplotlib choose
    the format by it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index("."):] if "." in name else ""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open()
    # would, so that the finished file is readable as any other the user writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
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


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_figure(figure, path, dpi=100):
    """Saves a `matplotlib.figure.Figure` atomically (format from the extension).

    Figures are made with `matplotlib.figure.Figure()`, never through
    `pyplot`, so plotting never touches the user's backend or figure list.
    """
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi)


def save_model(model, path):
    """`model.save(path)` through a temporary `.keras` file, then a rename."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def save_weights(model, path):
    """`model.save_weights(path)` atomically: a kill mid-write leaves the
    previous file, never a truncated one that a later load would accept."""
    with atomic_path(path) as tmp:
        model.save_weights(tmp)


def load_model(path, role="model"):
    """Loads a Keras 3 `.keras` (or legacy `.h5`) file with `safe_mode` on.

    Args:
        path: the file.
        role: what the file is, for the messages ("--teacher", "--model").

    Raises:
        ValueError: one line naming the problem and the fix: a missing file,
            a file that is not a Keras archive, one that carries code (a
            Lambda layer, which safe_mode refuses to run), or any other
            failure to load.
    """
    import keras

    import micik_tf.layers  # noqa: F401  (registers the compressed layers)

    keras_hint = "Give a .keras file saved by Keras 3 (model.save('model.keras'))."
    if not os.path.isfile(path):
        raise ValueError(f"{role}={path}: no such file. {keras_hint}")
    if not path.endswith(".h5"):
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{role}={path}: not a Keras 3 archive (a .keras file is a zip "
                f"archive; this file is not). {keras_hint}"
            )
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ValueError(
                    f"{role}={path}: a zip archive, but not a Keras 3 model (it "
                    f"has no config.json). {keras_hint}"
                )
    try:
        # safe_mode stays on: a .keras file can carry code (Lambda layers),
        # and we never execute it silently.
        return keras.models.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad file
        if "safe_mode" in str(error):
            raise ValueError(
                f"{role}={path}: the file carries code (e.g. a Lambda layer), "
                "which Keras' safe_mode refuses to run. Rebuild the model with "
                "registered layers instead of Lambda layers."
            ) from None
        raise ValueError(
            f"{role}={path}: cannot load it as a Keras 3 model "
            f"({first_line(error)}). {keras_hint}"
        ) from None


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)

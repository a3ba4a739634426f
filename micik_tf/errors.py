"""Error helpers: the one-line form of an exception, for one-line messages."""


def first_line(error, limit=300):
    """`"Type: first line of the message"`, cut at `limit` characters.

    Errors raised deep inside TensorFlow or Keras can span pages; a message
    of ours quotes only their first line, so the user sees one line that
    names the problem, and `--debug` shows the rest.
    """
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""Argument checks shared by the micik_tf layers, with Keras-style messages."""

import numbers


def positive_int(name, value, allow_zero=False):
    """Returns `value` as an int, or raises a ValueError naming the argument."""
    low = 0 if allow_zero else 1
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
    ):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a {kind} "
            f"integer. Received: {name}={value!r}"
        )
    return int(value)


def one_of(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected one of "
            f"{sorted(choices)}. Received: {name}={value!r}"
        )
    return value

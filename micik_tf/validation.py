"""Argument checks shared by the whole package, with Keras-style messages.

Each check returns the value (converted where that helps) or raises a
`ValueError` that names the argument and the value received, as Keras does:
"Received an invalid value for `units`, expected a positive integer.
Received: units=0". The recovery job reuses the same checks for its flags
(`micik_tf.job.config`), so a library call and a command line refuse a bad
value in the same words.
"""

import math
import numbers


def first_error(error):
    """`"Type: first line"` of the error that started `error`'s chain: Keras
    re-raises a layer's error with its own context added (a multi-line
    message), keeping the original as `__context__`."""
    while error.__context__ is not None:
        error = error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _invalid(name, expected, value):
    return ValueError(
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def positive_int(name, value, allow_zero=False):
    """`value` as an int >= 1 (>= 0 with `allow_zero`)."""
    low = 0 if allow_zero else 1
    if not _is_int(value) or value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise _invalid(name, f"a {kind} integer", value)
    return int(value)


def int_at_least(name, value, low):
    """`value` as an int >= `low`."""
    if not _is_int(value) or value < low:
        raise _invalid(name, f"an integer >= {low}", value)
    return int(value)


def non_negative_float(name, value):
    if not _is_real(value) or value < 0:
        raise _invalid(name, "a non-negative float", value)
    return float(value)


def positive_float(name, value):
    if not _is_real(value) or value <= 0:
        raise _invalid(name, "a positive float", value)
    return float(value)


def float_above(name, value, low):
    """`value` as a finite float > `low` (e.g. a compression ratio > 1)."""
    if not _is_real(value) or value <= low:
        raise _invalid(name, f"a finite number > {low:g}", value)
    return float(value)


def fraction(name, value, low_open=False, high_open=True):
    """`value` as a float in [0, 1) by default; the bounds' openness is set."""
    low, high = ("(" if low_open else "["), (")" if high_open else "]")
    ok = _is_real(value) and (value > 0 if low_open else value >= 0) and (
        value < 1 if high_open else value <= 1
    )
    if not ok:
        raise _invalid(name, f"a float in {low}0, 1{high}", value)
    return float(value)


def one_of(name, value, choices):
    if value not in choices:
        raise _invalid(name, f"one of {sorted(choices)}", value)
    return value


def all_of(name, values, choices):
    """`values` (a str or a sequence) as a tuple whose items are in `choices`."""
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise _invalid(name, f"names from {sorted(choices)}", list(values))
    return values


def names(name, value, minimum=1):
    """`value` (a str or a list of str) as a list of distinct, non-empty names."""
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, (list, tuple))
        or not all(isinstance(n, str) and n for n in items)
        or len(set(items)) != len(items)
        or len(items) < minimum
    ):
        what = "a name or " if minimum == 1 else ""
        raise _invalid(name, f"{what}a list of at least {minimum} distinct names", value)
    return list(items)

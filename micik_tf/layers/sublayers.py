"""Sublayers held as attributes: finding them, and putting another in their place.

Composite layers (`keras.layers.MultiHeadAttention`, a user's transformer
block) and subclassed models keep their Dense / EinsumDense / Conv layers as
attributes, not as nodes of a graph. `.keras` saving walks such attributes by
name, skipping the names that every `Layer` has; `children()` walks them the
same way, so what it finds is what saving stores.

A location is a tuple of steps from a root layer; a step is `(attribute,)`
or `(attribute, index)` for a layer in a list (or `(attribute, key)` in a
dict) held by that attribute.
"""

import functools

import keras


@functools.cache
def _base_attributes():
    """Attribute names of a bare Layer, and TensorFlow's dependency table:
    saving skips both (`saving_lib.get_attr_skipset`). The probe layer is
    named, so no automatic name is drawn and no global counter moves."""
    probe = keras.layers.Layer(name="micik_tf_attribute_probe")
    return frozenset(dir(probe)) | {"_self_unconditional_dependency_names"}


def children(layer):
    """Yields `(step, sublayer)` for each layer held by `layer`'s attributes,
    in attribute-name order."""
    skip = _base_attributes()
    for attribute, value in sorted(vars(layer).items()):
        if attribute.startswith("__") or attribute in skip:
            continue
        if isinstance(value, keras.layers.Layer):
            yield (attribute,), value
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield (attribute, index), item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and isinstance(item, keras.layers.Layer):
                    yield (attribute, key), item


def leaves(layer, is_leaf, location=()):
    """Yields `(sublayer, location)` for every distinct layer below `layer`
    that `is_leaf(sublayer)` accepts or that holds no layers; a layer reached
    twice is yielded at its first location only."""
    seen = {id(layer)}

    def visit(parent, at):
        for step, child in children(parent):
            if id(child) in seen:
                continue
            seen.add(id(child))
            here = at + (step,)
            if is_leaf(child) or not any(True for _ in children(child)):
                yield child, here
            else:
                yield from visit(child, here)

    yield from visit(layer, location)


def get(root, location):
    """The layer at `location` below `root`."""
    value = root
    for step in location:
        value = getattr(value, step[0])
        if len(step) == 2:
            value = value[step[1]]
    return value


def replace(root, location, new):
    """Puts `new` where `location` points below `root`, in place of the old
    layer, and in the owner's list of tracked sublayers, so that `weights`,
    `count_params()` and saving see `new` only.

    A built layer locks its tracker against new sublayers. Keras' own
    `Tracker.replace_tracked_value` swaps one tracked value for another
    without unlocking it; there is no public API for this, and this function
    is the one place that reaches for it.
    """
    owner = get(root, location[:-1])
    step = location[-1]
    old = get(owner, (step,))
    tracker = getattr(owner, "_tracker", None)
    if tracker is None or not tracker.is_in_store("layers", old):
        raise ValueError(
            f"Cannot replace '{old.name}' inside '{owner.name}': it is not a "
            "sublayer tracked by Keras (assigned as an attribute in __init__ or build)."
        )
    tracker.replace_tracked_value("layers", old, new)
    if len(step) == 1:
        setattr(owner, step[0], new)
    else:
        getattr(owner, step[0])[step[1]] = new
    return old


def location_to_json(location):
    return [list(step) for step in location]

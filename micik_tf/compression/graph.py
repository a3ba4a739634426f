"""Rebuilding a Sequential or Functional model with some layers swapped.

A subclassed model has no graph to rebuild; `as_graph` puts a copy of it in
a one-layer Functional model, and the layers it holds are replaced inside it
(`micik_tf.layers.CompressedBlock`).

`keras.models.clone_model` rebuilds Functional graphs and lets a
`call_function` change how each layer is called, which is how a compressed
site also receives its shared basis. It refuses `call_function` for
Sequential models, so those are rebuilt here as Functional models (a site
with a basis has two inputs, which a Sequential cannot express). Nested
models are rebuilt recursively, each keeping its name.

The rebuilt model has new layers; the original model and its layers are never
called, so their graphs and weights stay exactly as they were.
"""

import keras

from micik_tf.compression.grouping import is_container, is_graph_model
from micik_tf.layers import CompressedBlock, sublayers
from micik_tf.validation import first_error


def check_graph_model(model):
    """Raises a TypeError that says what is supported, for subclassed models."""
    if not is_graph_model(model):
        raise TypeError(_SUBCLASSED_MESSAGE.format(name=type(model).__name__))


def as_graph(model):
    """`model` if it is a graph model; for a subclassed model, a Functional
    model around a copy of it (its weights copied), whose layers compress()
    can then find inside the copy."""
    if is_graph_model(model):
        return model
    name = type(model).__name__
    shape = (model.get_build_config() or {}).get("input_shape") if model.built else None
    if not shape or isinstance(shape[0], (list, tuple, dict)):
        raise ValueError(
            f"Subclassed model '{model.name}' ({name}) must be built on one input "
            "before compress() can copy it: call it on a batch, or call "
            "`model.build(input_shape)`."
        )
    try:
        copy = clone_built(model)
    except Exception as error:  # noqa: BLE001 (any failure of the user's get_config/__init__)
        raise TypeError(
            f"compress() copies subclassed model '{model.name}' through "
            f"get_config()/from_config(), which failed ({first_error(error)}). "
            f"Give {name} a get_config() that returns its __init__ "
            "arguments, and register it with "
            "@keras.saving.register_keras_serializable() so that it also loads."
        ) from None
    # The batch size it was built with is not part of the model.
    inputs = keras.Input(batch_shape=(None,) + tuple(shape[1:]), name=f"{model.name}_input")
    return keras.Model(inputs, copy(inputs), name=model.name)


def clone_built(layer):
    """A built copy of a layer that holds other layers, with its weights and
    its sublayers' names (a config rarely records them, so the copy's are
    drawn afresh; user-facing paths must not change)."""
    copy = clone_layer(layer)
    copy_names(layer, copy)  # sublayers made in __init__
    config = layer.get_build_config() or {}
    shape = config.get("input_shape")
    if isinstance(layer, keras.Model) and shape and not isinstance(shape[0], (list, tuple)):
        # A subclassed model builds by running call() (build_from_config
        # guesses the argument's name, and warns when it guesses wrong).
        copy(keras.ops.zeros((1,) + tuple(shape[1:]), dtype=layer.input_dtype))
    else:
        copy.build_from_config(config)
    copy_names(layer, copy)  # and those made in build
    copy.set_weights(layer.get_weights())
    return copy


def compressed_block(layer, make_replacement, locations):
    """A `CompressedBlock` around a built copy of the composite `layer`, with
    `make_replacement(location, the copy's layer there)` put at each of
    `locations`."""
    block = clone_built(layer)
    replacements = [(at, make_replacement(at, sublayers.get(block, at))) for at in locations]
    return CompressedBlock(block, replacements, name=layer.name)


def copy_names(original, copy):
    for (step, old), (step_copy, new) in zip(sublayers.children(original),
                                               sublayers.children(copy)):
        if step == step_copy and type(old) is type(new):
            new.name = old.name
            copy_names(old, new)


def clone_layer(layer):
    """A fresh copy of a leaf layer, from its config (weights copied later)."""
    return layer.__class__.from_config(layer.get_config())


def copy_weights(old, new):
    """`old`'s weights into its copy `new` (nothing for `keras.ops` nodes of
    a Functional graph, which are operations without weights)."""
    if isinstance(new, keras.layers.Layer):
        new.set_weights(old.get_weights())


def rebuild(model, make_layer, call_layer, path=()):
    """Rebuilds `model` layer by layer.

    Args:
        model: a Sequential or Functional model.
        make_layer: `fn(layer, path) -> new layer` for every leaf layer.
        call_layer: `fn(new_layer, path, args, kwargs) -> outputs`, which
            calls a new leaf layer (or a rebuilt nested model) in the graph.
        path: names of the enclosing models (for nested models).

    Returns:
        A new Functional model with the original's name.
    """
    check_graph_model(model)

    def clone_function(layer):
        if is_container(layer):
            return rebuild(layer, make_layer, call_layer, path + (layer.name,))
        return make_layer(layer, path + (layer.name,))

    def call_function(layer, *args, **kwargs):
        return call_layer(layer, path + (layer.name,), args, kwargs)

    if isinstance(model, keras.Sequential):
        source = model.inputs[0]
        inputs = keras.Input(
            batch_shape=source.shape, dtype=source.dtype, name=f"{model.name}_input"
        )
        outputs = inputs
        for layer in model.layers:
            outputs = call_function(clone_function(layer), outputs)
        return keras.Model(inputs, outputs, name=model.name)
    return keras.models.clone_model(
        model, clone_function=clone_function, call_function=call_function
    )


_SUBCLASSED_MESSAGE = (
    "This step rebuilds the model's layer graph, which only Sequential and "
    "Functional models expose; '{name}' is a subclassed model whose call() is "
    "Python code. Pass it through micik_tf.compress() first: it returns a "
    "Functional model around the compressed subclass."
)

"""Rebuilding a Sequential or Functional model with some layers swapped.

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


def check_graph_model(model):
    """Raises a TypeError that says what is supported, for subclassed models."""
    if not is_graph_model(model):
        raise TypeError(_SUBCLASSED_MESSAGE.format(name=type(model).__name__))


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
    "compress() rebuilds the model's layer graph, which only Sequential and "
    "Functional models expose; '{name}' is a subclassed model whose call() is "
    "Python code. Build the part to compress as a Sequential or Functional "
    "model (keras.Model(inputs, outputs)), compress that, and use it inside "
    "your subclass. Subclassed models nested inside a Functional model are "
    "supported only as untouched layers."
)

"""`CompressedBlock`: a composite layer or subclassed model whose inner layers
were replaced by factorized ones, and which saves and loads as such."""

import keras

from micik_tf.layers import sublayers


@keras.saving.register_keras_serializable(package="micik_tf")
class CompressedBlock(keras.layers.Layer):
    """Runs `block` with some of its sublayers replaced.

    `compress()` uses it for layers it finds inside a composite layer (such
    as `keras.layers.MultiHeadAttention`'s projections) or a subclassed model.
    The block's own `get_config()` describes it with its original sublayers,
    so `.keras` loading alone would bring those back. This layer's config
    holds the block's config and each replacement's location and config;
    `from_config` rebuilds the block and puts the replacements back, and the
    weights then load into the same structure they were saved from. Shared
    bases held by the replacements are serialized with Keras' object sharing,
    so they come back as one layer and one variable.

    Args:
        block: a built Keras layer or model (its sublayers built).
        replacements: `[(location, layer), ...]`; `location` is a tuple of
            steps as in `micik_tf.layers.sublayers`, `layer` a built layer
            that computes what the replaced one did.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Input and output: those of `block`; arguments and keyword arguments are
    passed through.
    """

    def __init__(self, block, replacements, **kwargs):
        if not isinstance(block, keras.layers.Layer):
            raise TypeError(f"`block` must be a Keras layer. Received: {type(block).__name__}")
        kwargs.setdefault("dtype", block.dtype_policy)
        super().__init__(**kwargs)
        self.block = block
        locations = []
        for location, layer in replacements:
            location = tuple(tuple(step) for step in location)
            sublayers.replace(block, location, layer)
            locations.append(location)
        self.locations = tuple(locations)

    def replacements(self):
        """`[(location, layer), ...]`: the layers put into the block."""
        return [(at, sublayers.get(self.block, at)) for at in self.locations]

    def call(self, *args, **kwargs):
        return self.block(*args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "block": keras.saving.serialize_keras_object(self.block),
            "replacements": [
                {"location": sublayers.location_to_json(at),
                 "layer": keras.saving.serialize_keras_object(layer)}
                for at, layer in self.replacements()
            ],
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = keras.saving.deserialize_keras_object(config.pop("block"))
        replacements = [
            (item["location"], keras.saving.deserialize_keras_object(item["layer"]))
            for item in config.pop("replacements")
        ]
        return cls(block, replacements, **config)

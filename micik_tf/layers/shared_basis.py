"""`SharedBasis`: the one variable that a group of compressed layers shares."""

import keras
from keras import ops

from micik_tf.validation import positive_int


@keras.saving.register_keras_serializable(package="micik_tf")
class SharedBasis(keras.layers.Layer):
    """Owns a group's shared basis and hands it out as a tensor.

    MICIK writes each layer of a group as `W_l ~= B_g A_l + U_l V_l`. The basis
    `B_g` is stored once, in this layer. Every compressed site of the group calls
    this layer on its own input and passes the returned tensor to its wrapper
    (`FactorizedDense` / `FactorizedConv2D`). The basis is therefore a plain edge
    of the functional graph, which is what makes `.keras` saving keep it shared
    (a wrapper that held the layer as an attribute would store it twice).

    The input is only there to place the call in the graph; its values are
    never read.

    Args:
        rows: number of rows of the basis. For input-side sharing this is the
            flattened kernel input size `m` (`k*k*C_in` for Conv2D, `D_in` for
            Dense); for output-side sharing it is the common rank.
        cols: number of columns of the basis.
        basis_initializer: initializer of the basis variable.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        Any tensor (ignored).

    Output shape:
        `(rows, cols)`, in the layer's compute dtype.
    """

    def __init__(self, rows, cols, basis_initializer="orthogonal", **kwargs):
        super().__init__(**kwargs)
        self.rows = positive_int("rows", rows)
        self.cols = positive_int("cols", cols)
        self.basis_initializer = keras.initializers.get(basis_initializer)

    def build(self, input_shape):
        self.basis = self.add_weight(
            name="basis",
            shape=(self.rows, self.cols),
            initializer=self.basis_initializer,
        )

    def call(self, inputs):
        return ops.cast(self.basis, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (self.rows, self.cols)

    def get_config(self):
        return {
            **super().get_config(),
            "rows": self.rows,
            "cols": self.cols,
            "basis_initializer": keras.initializers.serialize(
                self.basis_initializer
            ),
        }

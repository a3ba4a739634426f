"""Wrapper layers that replace a Dense, Conv1D or Conv2D by MICIK's factorized form.

A compressed layer computes

    y = act( concat(x*L_common, x*U) . [R_common; V] + b )

where, for input-side sharing (the default), `L_common` is the group's shared
basis `B_g` (`m x r_c`, received as a second input from `SharedBasis`) and
`R_common` are this layer's coefficients `A_l` (`r_c x n`). For output-side
sharing the roles swap: the layer owns `m x r_c` coefficients and the basis
(`r_c x n`) is shared. `U` (`m x r_u`) and `V` (`r_u x n`) are the layer's own
low-rank part. For a convolution, `x*L` is a `k x k` convolution to
`r_c + r_u` channels and the product with `[R; V]` is a 1x1 convolution,
so both the storage and the FLOPs fall when the ranks are small.

With `sparse=True` the layer also has a sparse unique part `S` (`m x n`,
stored dense with zeros): `y = act(x*L . R + x*S + b)`, MICIK's shared part
plus a sparse residual (LoSparse; Yu et al. 2017). Its zeros are its mask:
`compress()` chooses them, and recovery keeps them
(`micik_tf.deploy.pruning.MagnitudePruner.fixed_masks`). The zeros save bytes
after gzip, not runtime memory or time.
"""

import contextlib
import contextvars
import math
import re

import numpy as np

import keras
from keras import ops

from micik_tf.layers.shared_basis import SharedBasis
from micik_tf.validation import one_of, positive_int

SHARED_SIDES = ("input", "output")
# How compress() fitted the factors: to the weights, or to the layer's outputs
# on calibration data through the full input covariance or its diagonal.
INITIALIZATIONS = ("weights", "outputs", "outputs_diagonal")


# Set within `basis_kept_apart()`: see there.
_BASIS_APART = contextvars.ContextVar("micik_tf_basis_kept_apart", default=False)


@contextlib.contextmanager
def basis_kept_apart():
    """Within this block, wrappers that have both a shared and a unique part
    compute their output without concatenating the shared basis with their
    own factor. Tracing for TFLite happens here: the converter folds constant
    subgraphs, and `concat([B_g, U_l])` is one, so it would copy the shared
    basis into every member; kept apart, the basis stays one tensor in the
    flatbuffer. The function computed is the same."""
    token = _BASIS_APART.set(True)
    try:
        yield
    finally:
        _BASIS_APART.reset(token)


class _Factorized(keras.layers.Layer):
    """Ranks, factor variables and the two-stage product shared by the wrappers."""

    def __init__(
        self,
        units,
        rank_common=0,
        rank_unique=1,
        shared_side="input",
        activation=None,
        use_bias=True,
        factor_initializer="glorot_uniform",
        bias_initializer="zeros",
        group=None,
        relative_error=None,
        initialization=None,
        basis=None,
        sparse=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = positive_int(self._units_name, units)
        self.rank_common = positive_int("rank_common", rank_common, allow_zero=True)
        self.rank_unique = positive_int("rank_unique", rank_unique, allow_zero=True)
        if not isinstance(sparse, bool):
            raise ValueError(f"Received an invalid value for `sparse`, expected True or False. "
                             f"Received: sparse={sparse!r}")
        self.sparse = sparse
        if self.rank_common + self.rank_unique == 0 and not self.sparse:
            raise ValueError(
                "Received rank_common=0 and rank_unique=0: a factorized layer "
                "needs at least one rank. Give `rank_unique` >= 1 (or "
                "`rank_common` >= 1 with a shared basis), or sparse=True."
            )
        self.shared_side = one_of("shared_side", shared_side, SHARED_SIDES)
        if self.rank_common and group is None:
            raise ValueError(
                "A layer with `rank_common` > 0 reads a shared basis, so it "
                "needs `group`: the name of its `SharedBasis` layer. "
                f"Received: group=None, rank_common={self.rank_common}"
            )
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.factor_initializer = keras.initializers.get(factor_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.group = None if group is None else str(group)
        self.relative_error = (
            None if relative_error is None else float(relative_error)
        )
        self.initialization = None if initialization is None else one_of(
            "initialization", initialization, INITIALIZATIONS)
        if basis is not None and not isinstance(basis, SharedBasis):
            raise TypeError(
                f"`basis` must be a SharedBasis layer. Received: {type(basis).__name__}")
        if basis is not None and not self.rank_common:
            raise ValueError("`basis` is given but rank_common=0: give rank_common > 0.")
        # A held basis (inside composite layers, where no graph edge can
        # bring it) is an attribute; otherwise it is the second input.
        self.shared_basis = basis

    # Subclasses give the input size `m` of the kernel matrix and the first
    # (projection) stage.
    _units_name = "units"
    # Whether `project` puts the rank axis last, so that two projections can
    # be concatenated on it (not an einsum's, in general).
    _rank_axis_last = True

    def _kernel_rows(self, input_shape):
        raise NotImplementedError

    def project(self, x, left):
        """The first stage: `x` times an `m x r` factor (a `k x k`
        convolution for Conv2D). Export uses it to keep the shared basis a
        separate constant in TFLite."""
        raise NotImplementedError

    def combine(self, projected, right):
        """The second stage: the projection times an `r x n` factor (None:
        the projection already has the `n` outputs)."""
        return projected if right is None else ops.matmul(projected, right)

    def bias_shape(self):
        return (self.units,)

    @property
    def rank(self):
        return self.rank_common + self.rank_unique

    def basis_shape(self):
        """Shape of the `SharedBasis` tensor this layer expects."""
        if self.shared_side == "input":
            return (self.kernel_rows, self.rank_common)
        return (self.rank_common, self.units)

    @property
    def holds_basis(self):
        return self.shared_basis is not None

    def build(self, input_shape):
        if self.holds_basis:
            if not self.shared_basis.built:
                self.shared_basis.build(None)
            x_shape, basis_shape = input_shape, tuple(self.shared_basis.basis.shape)
        elif self.rank_common:
            if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
                    and isinstance(input_shape[0], (list, tuple))):
                raise ValueError(
                    f"Layer '{self.name}' has rank_common={self.rank_common} and "
                    "must be called on `[x, basis]`, where `basis` comes from "
                    f"its SharedBasis layer. Received input shape: {input_shape}"
                )
            x_shape, basis_shape = input_shape
        else:
            x_shape, basis_shape = input_shape, None
        self.kernel_rows = self._kernel_rows(x_shape)
        m, n = self.kernel_rows, self.units
        if basis_shape is not None and tuple(basis_shape) != self.basis_shape():
            raise ValueError(
                f"Layer '{self.name}' expects a shared basis of shape "
                f"{self.basis_shape()}, received {tuple(basis_shape)}. The "
                "basis must match the layer's kernel size and rank_common."
            )
        if self.rank_common:
            shape = (
                (self.rank_common, n)
                if self.shared_side == "input"
                else (m, self.rank_common)
            )
            self.coefficients = self.add_weight(
                name="coefficients", shape=shape, initializer=self.factor_initializer
            )
        if self.rank_unique:
            self.unique_left = self.add_weight(
                name="unique_left",
                shape=(m, self.rank_unique),
                initializer=self.factor_initializer,
            )
            self.unique_right = self.add_weight(
                name="unique_right",
                shape=(self.rank_unique, n),
                initializer=self.factor_initializer,
            )
        if self.sparse:
            # Zeros are the mask: compress() sets the kept entries.
            self.sparse_kernel = self.add_weight(
                name="sparse_kernel", shape=(m, n), initializer="zeros")
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=self.bias_shape(), initializer=self.bias_initializer
            )

    def apply_matrix(self, x, matrix):
        """`x` times a full `m x n` kernel matrix, as the original layer
        computes it (the sparse part's product)."""
        return self.combine(self.project(x, matrix), None)

    def _factors(self, basis):
        """Returns the `m x r` left and `r x n` right factors, common part first."""
        left, right = [], []
        if self.rank_common:
            if self.shared_side == "input":
                left.append(basis)
                right.append(self.coefficients)
            else:
                left.append(self.coefficients)
                right.append(basis)
        if self.rank_unique:
            left.append(self.unique_left)
            right.append(self.unique_right)
        if len(left) == 1:
            return left[0], right[0]
        return ops.concatenate(left, axis=1), ops.concatenate(right, axis=0)

    def call(self, inputs):
        if self.holds_basis:
            x, basis = inputs, ops.cast(self.shared_basis.basis, self.compute_dtype)
        elif self.rank_common:
            x, basis = inputs
        else:
            x, basis = inputs, None
        if not self.rank:
            y = self.apply_matrix(x, self.sparse_kernel)
        elif _BASIS_APART.get() and self.rank_common and self.rank_unique:
            y = self._product_basis_apart(x, basis)
        else:
            left, right = self._factors(basis)
            y = self.combine(self.project(x, left), right)
        if self.sparse and self.rank:
            y = ops.add(y, self.apply_matrix(x, self.sparse_kernel))
        if self.use_bias:
            y = ops.add(y, self.bias)
        return self.activation(y)

    def _product_basis_apart(self, x, basis):
        """The product without `concat(basis, own factor)`: input-side,
        `concat(x*B, x*U) . [A; V]` (activations are concatenated, and
        `[A; V]` is the layer's own); otherwise `(x*L) . R + (x*U) . V`."""
        if self.shared_side == "input" and self._rank_axis_last:
            projected = ops.concatenate(
                [self.project(x, basis), self.project(x, self.unique_left)], axis=-1)
            return self.combine(
                projected, ops.concatenate([self.coefficients, self.unique_right], axis=0))
        common = ((basis, self.coefficients) if self.shared_side == "input"
                  else (self.coefficients, basis))
        return ops.add(self.combine(self.project(x, common[0]), common[1]),
                       self.combine(self.project(x, self.unique_left), self.unique_right))

    def reconstruct_kernel(self, basis=None):
        """Returns the dense kernel this layer represents, as a numpy array.

        Args:
            basis: the value of the group's shared basis (required when
                `rank_common` > 0, unless the layer holds its basis).
        """
        if basis is None and self.holds_basis:
            basis = self.shared_basis.basis
        if self.rank_common and basis is None:
            raise ValueError(
                f"Layer '{self.name}' shares a basis: pass its value as `basis`."
            )
        matrix = np.zeros((self.kernel_rows, self.units), np.float32)
        if self.rank:
            left, right = self._factors(basis)
            matrix += np.asarray(ops.convert_to_numpy(ops.matmul(left, right)))
        if self.sparse:
            matrix += np.asarray(ops.convert_to_numpy(self.sparse_kernel))
        return self.kernel_from_matrix(matrix)

    def nonzeros(self):
        """Nonzero entries of the sparse part (0 without one)."""
        if not self.sparse:
            return 0
        return int(np.count_nonzero(ops.convert_to_numpy(self.sparse_kernel)))

    def sparse_zeros(self):
        """Zero entries of the sparse part: its mask, stored but not
        parameters (0 without one)."""
        return int(np.prod(self.sparse_kernel.shape)) - self.nonzeros() if self.sparse else 0

    def kernel_from_matrix(self, matrix):
        """The layer's kernel from its `m x n` matrix."""
        return matrix.reshape(self.kernel_shape())

    def matrix_from_kernel(self, kernel):
        """The inverse of `kernel_from_matrix`: the `m x n` matrix of a kernel
        of this layer's shape."""
        return np.asarray(kernel).reshape(self.kernel_rows, self.units)

    def count_own_params(self):
        """Parameters of this layer's own factors and bias (a held basis is
        the group's, counted once there)."""
        held = {id(w) for w in self.shared_basis.weights} if self.holds_basis else set()
        return int(sum(np.prod(w.shape) for w in self.weights if id(w) not in held))

    def get_config(self):
        return {
            **super().get_config(),
            self._units_name: self.units,
            "rank_common": self.rank_common,
            "rank_unique": self.rank_unique,
            "shared_side": self.shared_side,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "factor_initializer": keras.initializers.serialize(
                self.factor_initializer
            ),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "group": self.group,
            "relative_error": self.relative_error,
            "initialization": self.initialization,
            "basis": None if self.shared_basis is None else _shared_config(self.shared_basis),
            "sparse": self.sparse,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("basis") is not None:
            config["basis"] = keras.saving.deserialize_keras_object(config["basis"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="micik_tf")
class FactorizedDense(_Factorized):
    """A `Dense` layer stored as shared + unique low-rank factors.

    Args:
        units: output size `n`.
        rank_common: rank `r_c` of the shared part (0: no shared basis).
        rank_unique: rank `r_u` of this layer's own low-rank part.
        shared_side: `"input"` (the basis is `m x r_c`) or `"output"` (the
            basis is `r_c x n`).
        activation: activation applied after the bias, as in `Dense`.
        use_bias: whether the layer adds a bias.
        factor_initializer: initializer of the factor variables.
        bias_initializer: initializer of the bias.
        group: name of the `SharedBasis` layer; required when `rank_common` > 0.
        relative_error: `||W - W_hat|| / ||W||` measured by `compress()` against
            the original kernel (metadata for reports; None when built by hand).
        initialization: how `compress()` fitted the factors, one of
            `INITIALIZATIONS` (metadata for reports; None when built by hand).
        basis: optionally, the group's `SharedBasis` layer, held by this
            layer (for layers inside composite layers, where the basis cannot
            be a graph input). Several layers may hold the same one.
        sparse: whether the layer also has a sparse unique part
            `sparse_kernel` (`m x n`, zeros as its mask); with it, both
            ranks may be 0 (a pruned layer).

    Input shape:
        `x` of shape `(..., m)`, or `[x, basis]` when `rank_common` > 0 and
        the layer holds no basis.

    Output shape:
        `(..., units)`.
    """

    def _kernel_rows(self, input_shape):
        m = input_shape[-1]
        if m is None:
            raise ValueError(
                f"Layer '{self.name}' needs a known last input dimension. "
                f"Received input shape: {input_shape}"
            )
        return int(m)

    def kernel_shape(self):
        """Shape of the dense kernel this layer stands for."""
        return (self.kernel_rows, self.units)

    def project(self, x, left):
        return ops.matmul(x, left)

    def compute_output_shape(self, input_shape):
        x_shape = input_shape[0] if self.rank_common and not self.holds_basis else input_shape
        return tuple(x_shape[:-1]) + (self.units,)


class _FactorizedConv(_Factorized):
    """The convolutions: a `k...` convolution to `r_c + r_u` channels, then a
    1x1 convolution (a matmul over channels) to `filters` channels."""

    _units_name = "filters"
    _spatial = 2
    _paddings = ("valid", "same")

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        dilation_rate=1,
        **kwargs,
    ):
        data_format = kwargs.pop("data_format", "channels_last")
        name = type(self).__name__
        if data_format not in (None, "channels_last"):
            raise ValueError(
                f"{name} supports data_format='channels_last' only. "
                f"Received: data_format={data_format!r}"
            )
        super().__init__(filters, **kwargs)
        self.kernel_size = _tuple("kernel_size", kernel_size, self._spatial)
        self.strides = _tuple("strides", strides, self._spatial)
        self.dilation_rate = _tuple("dilation_rate", dilation_rate, self._spatial)
        self.padding = one_of("padding", str(padding).lower(), self._paddings)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides` > 1 and `dilation_rate` > 1 cannot be combined "
                f"(as in Conv{self._spatial}D). Received: strides={self.strides}, "
                f"dilation_rate={self.dilation_rate}"
            )

    @property
    def filters(self):
        return self.units

    def _kernel_rows(self, input_shape):
        if len(input_shape) != self._spatial + 2 or input_shape[-1] is None:
            raise ValueError(
                f"Layer '{self.name}' expects a {self._spatial + 2}D channels-last "
                f"input with a known channel count. Received input shape: {input_shape}"
            )
        self.input_channels = int(input_shape[-1])
        return math.prod(self.kernel_size) * self.input_channels

    def kernel_shape(self):
        """Shape of the dense kernel this layer stands for."""
        return self.kernel_size + (self.input_channels, self.units)

    def project(self, x, left):
        kernel = ops.reshape(
            left, self.kernel_size + (self.input_channels, ops.shape(left)[-1])
        )
        padding = self.padding
        if padding == "causal":
            # As Conv1D does: pad the past, then a valid convolution.
            x = ops.pad(x, ((0, 0), ((self.kernel_size[0] - 1) * self.dilation_rate[0], 0),
                            (0, 0)))
            padding = "valid"
        return ops.conv(
            x,
            kernel,
            strides=self.strides,
            padding=padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "dilation_rate": self.dilation_rate,
        }


@keras.saving.register_keras_serializable(package="micik_tf")
class FactorizedConv2D(_FactorizedConv):
    """A `Conv2D` layer stored as shared + unique low-rank factors.

    The first stage is a `k x k` convolution to `r_c + r_u` channels, the second
    a 1x1 convolution (a matmul over channels) to `filters` channels.

    Args:
        filters: number of output channels `n`.
        kernel_size: int or pair, as in `Conv2D`.
        strides: int or pair.
        padding: `"valid"` or `"same"`.
        dilation_rate: int or pair.
        The other arguments are those of `FactorizedDense`.

    Input shape:
        `x` of shape `(batch, height, width, C_in)` (channels last), or
        `[x, basis]` when `rank_common` > 0 and no basis is held. The kernel matrix has
        `m = k_h * k_w * C_in` rows.

    Output shape:
        `(batch, new_height, new_width, filters)`.
    """


@keras.saving.register_keras_serializable(package="micik_tf")
class FactorizedConv1D(_FactorizedConv):
    """A `Conv1D` layer stored as shared + unique low-rank factors.

    The first stage is a width-`k` convolution to `r_c + r_u` channels, the
    second a pointwise one to `filters` channels.

    Args:
        filters: number of output channels `n`.
        kernel_size: int or 1-tuple, as in `Conv1D`.
        strides: int or 1-tuple.
        padding: `"valid"`, `"same"` or `"causal"`.
        dilation_rate: int or 1-tuple.
        The other arguments are those of `FactorizedDense`.

    Input shape:
        `x` of shape `(batch, steps, C_in)` (channels last), or `[x, basis]`
        when `rank_common` > 0. The kernel matrix has `m = k * C_in` rows.

    Output shape:
        `(batch, new_steps, filters)`.
    """

    _spatial = 1
    _paddings = ("valid", "same", "causal")


def _shared_config(layer):
    """`layer`'s config, marked so that deserializing it in one object-sharing
    scope (as `.keras` loading does) gives every user the same layer.

    Keras marks an object seen twice itself, but by editing the first copy
    of its config after the fact; the parent layers' configs are copied on
    the way up, so that edit is lost. Marking every copy at once keeps it.
    """
    config = keras.saving.serialize_keras_object(layer)
    config["shared_object_id"] = id(layer)
    return config


def _tuple(name, value, length):
    if isinstance(value, int):
        value = (value,) * length
    value = tuple(value)
    if len(value) != length:
        what = "an int or a pair of ints" if length == 2 else f"an int or {length} ints"
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {what}. "
            f"Received: {name}={value!r}"
        )
    return tuple(positive_int(name, v) for v in value)


@keras.saving.register_keras_serializable(package="micik_tf")
class FactorizedEinsumDense(_Factorized):
    """An `EinsumDense`, stored as low-rank factors.

    The kernel is a matrix of its contracted axes (`m` rows) against all its
    other axes (`n` columns, flattened in kernel order). The first stage
    contracts the input's axis with an `m x r` factor (for a last-axis
    contraction, as in attention projections, a matmul like Dense's, so the
    two can share a basis); the second expands the `r` channels into the
    kernel's other axes with the `r x n` factor.

    Args:
        equation: the original layer's equation, e.g. `"abc,cde->abde"`
            or `"abcd,cde->abe"` (two contracted axes, flattened into the
            `m` rows in kernel order).
        kernel_shape: the original kernel's shape.
        bias_shape: the original bias's shape (None: no bias).
        The other arguments are those of `FactorizedDense` (`units` is `n`,
        and is derived from `kernel_shape`).
    """

    _rank_axis_last = False

    def __init__(self, equation, kernel_shape, bias_shape=None, **kwargs):
        kwargs.pop("use_bias", None)
        kwargs.pop("units", None)
        self.equation = str(equation)
        self.full_kernel_shape = tuple(int(d) for d in kernel_shape)
        self.bias_shape_ = None if bias_shape is None else tuple(int(d) for d in bias_shape)
        spec = einsum_spec(self.equation)
        if spec is None:
            raise ValueError(
                f"FactorizedEinsumDense needs an equation whose kernel axes are "
                f"either contracted (a letter in the input and the kernel, not in "
                f"the output) or kept (in the kernel and the output, not in the "
                f"input). Received: {self.equation!r}"
            )
        self._inputs, self._kernel, self._output, self.contracted = spec
        if len(self._kernel) != len(self.full_kernel_shape):
            raise ValueError(
                f"`kernel_shape` {self.full_kernel_shape} does not fit the "
                f"equation {self.equation!r}."
            )
        dims = dict(zip(self._kernel, self.full_kernel_shape))
        self._contracted_dims = tuple(dims[c] for c in self.contracted)
        kernel_rest = "".join(c for c in self._kernel if c not in self.contracted)
        rest = tuple(dims[c] for c in kernel_rest)
        super().__init__(math.prod(rest), use_bias=self.bias_shape_ is not None, **kwargs)
        self._rest = rest
        # The matrix's axes in kernel order are the contracted letters, then the rest.
        self._to_kernel = tuple((self.contracted + kernel_rest).index(c) for c in self._kernel)
        free = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in self.equation)
        first = min(self._inputs.index(c) for c in self.contracted)
        projected = "".join(
            free if i == first else c for i, c in enumerate(self._inputs)
            if c not in self.contracted or i == first)
        self._first = f"{self._inputs},{self.contracted}{free}->{projected}"
        self._second = f"{projected},{free}{kernel_rest}->{self._output}"

    def _kernel_rows(self, input_shape):
        letters = self._inputs.replace("...", "")
        for c, size in zip(self.contracted, self._contracted_dims):
            axis = letters.index(c) - len(letters)
            if input_shape[axis] is not None and int(input_shape[axis]) != size:
                raise ValueError(
                    f"Layer '{self.name}' contracts input axes of sizes "
                    f"{self._contracted_dims}. Received input shape: {input_shape}"
                )
        return math.prod(self._contracted_dims)

    def kernel_shape(self):
        return self.full_kernel_shape

    def kernel_from_matrix(self, matrix):
        kernel = matrix.reshape(self._contracted_dims + self._rest)
        return np.transpose(kernel, self._to_kernel)

    def matrix_from_kernel(self, kernel):
        return np.transpose(np.asarray(kernel), np.argsort(self._to_kernel)).reshape(
            self.kernel_rows, self.units)

    def bias_shape(self):
        return self.bias_shape_

    def project(self, x, left):
        left = ops.reshape(left, self._contracted_dims + (ops.shape(left)[-1],))
        return ops.einsum(self._first, x, left)

    def combine(self, projected, right):
        right = ops.reshape(right, (ops.shape(right)[0],) + self._rest)
        return ops.einsum(self._second, projected, right)

    def apply_matrix(self, x, matrix):
        # The original equation on the kernel the matrix stands for.
        kernel = ops.transpose(ops.reshape(matrix, self._contracted_dims + self._rest),
                               self._to_kernel)
        return ops.einsum(self.equation, x, kernel)

    def get_config(self):
        config = super().get_config()
        for key in ("units", "use_bias"):
            config.pop(key)
        return {**config, "equation": self.equation,
                "kernel_shape": self.full_kernel_shape, "bias_shape": self.bias_shape_}


def einsum_spec(equation):
    """`(input, kernel, output, contracted letters)` of an EinsumDense
    equation whose kernel axes are either contracted with the input or kept
    in the output, else None. The contracted letters are in kernel order
    (`"cd"` for MultiHeadAttention's output projection `"abcd,cde->abe"`)."""
    match = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)", equation.replace(" ", ""))
    if match is None:
        return None
    inputs, kernel, output = match.groups()
    letters = lambda text: set(text.replace("...", ""))  # noqa: E731
    shared = letters(inputs) & set(kernel)
    contracted = shared - letters(output)
    if not contracted or shared != contracted or len(set(kernel)) != len(kernel):
        return None
    # Every other kernel letter goes to the output (no sum over a kernel axis).
    if not (set(kernel) - contracted) <= letters(output):
        return None
    return inputs, kernel, output, "".join(c for c in kernel if c in contracted)


# Every wrapper compress() builds, for code that treats them alike.
FACTORIZED = (FactorizedDense, FactorizedConv1D, FactorizedConv2D, FactorizedEinsumDense)

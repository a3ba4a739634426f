"""Finding the layers MICIK can compress, and grouping them by compatibility.

A *site* is a Dense, Conv1D or Conv2D layer whose kernel can be written as a
matrix and replaced by a factorized wrapper. Two sites may share a basis only
when the computation stays valid: for a convolution on the input side that
means the same kernel size, `C_in`, strides, padding and dilation (MICIK.md
section 1); on
the output side the same `C_out` (the shared factor is the 1x1 stage). Groups
never cross nested-model boundaries, because a layer shared between two
sibling sub-models would be stored twice by `.keras` saving.
"""

import dataclasses
import difflib

import numpy as np

import keras

from micik_tf.layers import FACTORIZED, CompressedBlock, SharedBasis, sublayers
from micik_tf.layers.factorized import einsum_spec

# The layer kinds a site can be.
SITE_TYPES = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
              keras.layers.Conv2D)

SHARE_CHOICES = ("auto", "input", "output")


@dataclasses.dataclass
class Site:
    """One compressible layer of the model (or of a nested model)."""

    layer: keras.layers.Layer
    path: tuple  # names of the enclosing nested models, then the layer's name
    kind: str  # "dense", "conv1d", "conv2d" or "einsum"
    m: int
    n: int
    # For a layer held inside a composite layer (or subclassed model): the
    # composite's path in the graph, and the layer's location below it.
    block: tuple = None
    location: tuple = ()

    @property
    def name(self):
        return "/".join(self.path)

    @property
    def owner(self):
        """The (nested) graph model the site belongs to."""
        return owner_of(self.path, self.block)

    @property
    def held(self):
        return self.block is not None

    def signature(self, side):
        """What two sites must have in common to share a basis on `side`."""
        layer = self.layer
        if side == "output":
            return (self.owner, self.kind, "output", self.n)
        if self.kind == "dense" or self.contracts_last_axis():
            # An EinsumDense contracting its input's last axis projects as a
            # Dense does, so the two may share an input basis.
            return (self.owner, "dense", "input", self.m)
        if self.kind == "einsum":
            return (self.owner, "einsum", "input", self.layer.equation, self.m)
        return (
            self.owner,
            self.kind,
            "input",
            tuple(layer.kernel_size),
            int(layer.kernel.shape[-2]),
            tuple(layer.strides),
            layer.padding,
            tuple(layer.dilation_rate),
        )

    def contracts_last_axis(self):
        if self.kind != "einsum":
            return False
        inputs, _, _, contracted = einsum_spec(self.layer.equation)
        return inputs.endswith(contracted)

    def describe(self, side):
        if side == "output":
            return f"{self.kind} with {self.n} outputs"
        if self.kind == "dense" or self.contracts_last_axis():
            return f"Dense-like with {self.m} inputs"
        if self.kind == "einsum":
            return f"EinsumDense {self.layer.equation!r} with {self.m} contracted inputs"
        layer = self.layer
        return (
            f"{type(layer).__name__} {'x'.join(str(k) for k in layer.kernel_size)}, "
            f"C_in={layer.kernel.shape[-2]}, strides={tuple(layer.strides)}, "
            f"padding={layer.padding!r}, dilation={tuple(layer.dilation_rate)}"
        )

    def kernel(self):
        """The kernel, with the contracted (input) axes first: `kernel_matrix`
        makes it the `m x n` matrix."""
        kernel = np.asarray(keras.ops.convert_to_numpy(self.layer.kernel))
        if self.kind == "einsum":
            _, letters, _, contracted = einsum_spec(self.layer.equation)
            order = [letters.index(c) for c in contracted]
            order += [i for i in range(len(letters)) if i not in order]
            return np.transpose(kernel, order).reshape(self.m, self.n)
        return kernel

    def kernel_from_matrix(self, matrix):
        """The inverse of `kernel()` then `kernel_matrix`: the layer's kernel
        (in its own axis order) from an `m x n` matrix."""
        shape = tuple(self.layer.kernel.shape)
        if self.kind != "einsum":
            return np.asarray(matrix).reshape(shape)
        _, letters, _, contracted = einsum_spec(self.layer.equation)
        order = [letters.index(c) for c in contracted]
        order += [i for i in range(len(letters)) if i not in order]
        return np.transpose(np.asarray(matrix).reshape([shape[i] for i in order]),
                            np.argsort(order))

    def bias_params(self):
        bias = getattr(self.layer, "bias", None)
        return 0 if bias is None else int(np.prod(bias.shape))


def owner_of(path, block):
    """The path of the (nested) graph model that a layer at `path` belongs
    to; for a layer held in a composite layer (`block`: the composite's
    path), the composite's model."""
    return block[:-1] if block else path[:-1]


def graph_bases(model):
    """`{(owner path, name): SharedBasis}` of the basis layers in `model`'s
    graphs (those a group's members do not hold themselves)."""
    return {(path[:-1], layer.name): layer for layer, path, _, _ in walk_deep(model)
            if isinstance(layer, SharedBasis)}


def basis_layer(layer, owner, bases):
    """The `SharedBasis` whose basis the factorized `layer` multiplies: the
    one it holds, else its group's among `bases` (`graph_bases`) in `owner`."""
    return layer.shared_basis or bases[(owner, layer.group)]


def is_graph_model(model):
    """Sequential and Functional models: the kinds whose layer graph we rebuild.

    `keras.Function` is the public base of Functional models (including
    `keras.applications` models); subclassed models only have Python code.
    """
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and isinstance(model, keras.Function)
    )


def is_container(layer):
    """Nested Sequential / Functional models, which compress() recurses into."""
    return isinstance(layer, keras.Model) and is_graph_model(layer)


def untouched_reason(layer):
    """Why a layer with weights is not a site, or None if it is one."""
    if type(layer) is keras.layers.EinsumDense:
        if getattr(layer, "lora_enabled", False):
            return "EinsumDense with LoRA enabled: merge the LoRA weights first"
        if getattr(layer, "quantization_mode", None):
            return "quantized EinsumDense: compress before quantizing"
        if einsum_spec(layer.equation) is None:
            return (f"EinsumDense {layer.equation!r}: a kernel axis that is neither "
                    "contracted with the input nor kept in the output has no matrix form")
        return None
    if type(layer) is keras.layers.Dense:
        if getattr(layer, "lora_enabled", False):
            return "Dense with LoRA enabled: merge the LoRA weights first"
        if getattr(layer, "quantization_mode", None):
            return "quantized Dense: compress before quantizing"
        return None
    name = type(layer).__name__
    if type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D):
        if layer.groups != 1:
            return f"grouped {name} (groups > 1): its kernel is block-diagonal"
        if layer.data_format != "channels_last":
            return f"{name} with channels_first data: use channels_last"
        if getattr(layer, "lora_enabled", False):
            return f"{name} with LoRA enabled: merge the LoRA weights first"
        return None
    if isinstance(layer, (keras.layers.DepthwiseConv2D,)):
        return f"{name}: a depthwise kernel has no matrix dimension to share"
    if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
        return f"{name}: per-channel parameters, nothing to factorize"
    if isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)):
        return f"{name}: a subclass of Dense/Conv1D/Conv2D, whose custom call is kept as it is"
    return f"{name}: not a Dense, Conv1D or Conv2D layer"


def walk(model):
    """Yields `(layer, path)` for every distinct leaf layer, recursing into
    nested models.

    `path` is the names of the enclosing nested models, then the layer's
    name. A layer called at several places of a graph is yielded once, at the
    first: it is one set of weights.
    """
    seen = set()

    def leaves(container, path):
        for layer in container.layers:
            if isinstance(layer, keras.layers.InputLayer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            if is_container(layer):
                yield from leaves(layer, path + (layer.name,))
            else:
                yield layer, path + (layer.name,)

    yield from leaves(model, ())


def _holds_no_layers(layer):
    return (isinstance(layer, (SITE_TYPES, FACTORIZED, SharedBasis))
            or is_container(layer))


def walk_deep(model):
    """Like `walk()`, but a graph layer that holds other layers (a composite
    layer such as MultiHeadAttention, a subclassed model, a
    `CompressedBlock`) is replaced by the layers it holds.

    Yields `(layer, path, block, location)`: `block` is the holding layer's
    path in the graph (None for graph layers) and `location` the layer's
    location below it (`micik_tf.layers.sublayers`). The path of a held layer
    continues with the names of the layers down to it; where two would get
    the same path, the attribute names are used instead.
    """
    seen_paths = set()
    for layer, path in walk(model):
        root = layer.block if isinstance(layer, CompressedBlock) else layer
        held = [] if _holds_no_layers(layer) else list(
            sublayers.leaves(root, _holds_no_layers))
        if not held:
            yield layer, path, None, ()
            continue
        for sub, location in held:
            names = tuple(sublayers.get(root, location[:i + 1]).name
                          for i in range(len(location)))
            if path + names in seen_paths:
                names = tuple(".".join(str(part) for part in step) for step in location)
            seen_paths.add(path + names)
            yield sub, path + names, path, location


def find_sites(model):
    """Splits the model's leaf layers into sites and untouched layers.

    Layers held inside composite layers and subclassed models count too.

    Returns:
        `(sites, untouched)`: a list of `Site`s, and `{path name: reason}` for
        every other layer that holds weights.
    """
    sites, untouched = [], {}
    for layer, path, block, location in walk_deep(model):
        name = "/".join(path)
        reason = untouched_reason(layer)
        if reason is None:
            kernel_shape = tuple(layer.kernel.shape)
            kind = {keras.layers.Dense: "dense", keras.layers.Conv1D: "conv1d",
                    keras.layers.Conv2D: "conv2d", keras.layers.EinsumDense: "einsum"}[type(layer)]
            if kind == "einsum":
                _, letters, _, contracted = einsum_spec(layer.equation)
                m = int(np.prod([kernel_shape[letters.index(c)] for c in contracted]))
                n = int(np.prod(kernel_shape)) // m
            else:
                m, n = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
            sites.append(Site(layer, path, kind, int(m), int(n), block, location))
        elif layer.weights:
            untouched[name] = reason
    return sites, untouched


def resolve_names(names, sites, argument):
    """Maps user-given layer names (plain or `outer/inner`) to sites."""
    by_path = {s.name: s for s in sites}
    by_plain = {}
    for s in sites:
        by_plain.setdefault(s.path[-1], []).append(s)
    resolved, unknown = [], []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"`{argument}` takes layer names (str). Received: {name!r}"
            )
        if name in by_path:
            resolved.append(by_path[name])
        elif len(by_plain.get(name, [])) == 1:
            resolved.append(by_plain[name][0])
        elif len(by_plain.get(name, [])) > 1:
            options = ", ".join(s.name for s in by_plain[name])
            raise ValueError(
                f"`{argument}` names '{name}', which several nested models "
                f"contain. Use the full path: one of {options}."
            )
        else:
            unknown.append(name)
    if unknown:
        known = sorted(by_path) + sorted(by_plain)
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(
            f"Unknown layer names in `{argument}`: {', '.join(hints)}. Only "
            f"Dense, EinsumDense, Conv1D and Conv2D layers can be named; compressible layers are: "
            f"{', '.join(sorted(by_path)) or 'none'}."
        )
    return resolved


def site_side(site, share):
    """The side a site shares on: `share`, or its larger side for "auto"."""
    if share != "auto":
        return share
    return "input" if site.m >= site.n else "output"


def group_sites(sites, share="auto", forced=()):
    """Groups sites whose kernels can share a basis.

    Args:
        sites: the `Site`s to group.
        share: `"auto"` (each layer's larger side), `"input"` or `"output"`.
        forced: lists of sites that the user put in one group; they are
            checked for compatibility and kept out of the automatic groups.

    Returns:
        A list of `(side, [Site, ...])`, in model order.
    """
    groups, taken = [], set()
    for members in forced:
        side = site_side(members[0], share)
        signatures = {s.signature(side) for s in members}
        if len(signatures) > 1:
            detail = "; ".join(f"{s.name}: {s.describe(side)}" for s in members)
            raise ValueError(
                "Layers in one group must have the same "
                + (
                    "kernel size, C_in, strides, padding and dilation (convolutions) "
                    "or input size (Dense), and live in the same (nested) model"
                    if side == "input"
                    else "output size and layer type, and live in the same model"
                )
                + f" to share a basis. Received: {detail}. Split the group or "
                "remove the incompatible layers."
            )
        for s in members:
            if s.name in taken:
                raise ValueError(f"Layer '{s.name}' appears in two `groups`.")
            taken.add(s.name)
        groups.append((side, list(members)))
    buckets = {}
    for s in sites:
        if s.name in taken:
            continue
        side = site_side(s, share)
        buckets.setdefault(s.signature(side), (side, []))[1].append(s)
    groups.extend(buckets.values())
    order = {s.name: i for i, s in enumerate(sites)}
    groups.sort(key=lambda g: order[g[1][0].name])
    return groups

"""Recovery losses: MICIK's similarity and inheritance terms, and logits KD.

The recovery objective (MICIK.md, section 1) is

    L = CE(y, z_S) + alpha * L_kd + beta * L_sim + gamma * L_inh

`CrossLayerSimilarity` is `L_sim`, `LayerInheritance` is `L_inh`, and
`logits_distillation` gives `L_kd`. All three are
`keras.distillation.DistillationLoss`es, so they work in our own training loop
(`loss.compute_loss(teacher_features, student_features)`) and in
`keras.distillation.Distiller` with plain `fit`:

    names = similarity_layer_names(teacher, student)
    distiller = keras.distillation.Distiller(
        teacher=feature_model(teacher, names),
        student=feature_model(student, names),
        distillation_losses=[CrossLayerSimilarity(names), LayerInheritance(names)],
        student_loss_weight=0.0,
    )

The multi-layer losses take their features as a list in layer order, as a dict
keyed by layer name, or as the list that `feature_model(...,
include_output=True)` returns: the model's output first (ignored by these
losses), then one entry per layer.

Similarities are linear CKA (Kornblith et al., 2019) in the Gram form, so they
compare layers of different widths and cost `O(B^2)` per pair on a batch of
`B`. All maths uses `keras.ops` and float32 (float16 features are cast), so the
losses are differentiable, trace in `tf.function` and run per replica under a
`tf.distribute` strategy. The teacher's side always goes through
`keras.ops.stop_gradient`: gradients reach only the student.
"""


import numpy as np

import keras
from keras import ops

from micik_tf.layers import FACTORIZED, CompressedBlock
from micik_tf.validation import names as _names
from micik_tf.validation import non_negative_float as _non_negative_float
from micik_tf.validation import positive_int

# Guards the square roots of (near-)zero norms, e.g. a batch of constant
# features. The Gram matrices are normalized before this is added, so it is
# negligible next to any real norm (which is at least 1/B after normalization).
_EPSILON = 1e-12

_TEACHER_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense,
                  keras.layers.EinsumDense)
_STUDENT_TYPES = _TEACHER_TYPES + FACTORIZED


# ---------------------------------------------------------------------------
# Linear CKA.
# ---------------------------------------------------------------------------


def _normalized_gram(x):
    """The centered Gram matrix of a batch `x`, with unit Frobenius norm.

    `x` (B, ...) is cast to float32, flattened to (B, D) and centered over the
    batch; then `K = X X^T` is already the doubly centered Gram `H K H`. `X` is
    scaled to unit norm first, which CKA does not see (it is scale invariant)
    but which keeps `K` in a range where float32 and the epsilon behave.
    """
    x = ops.cast(x, "float32")
    x = ops.reshape(x, (ops.shape(x)[0], -1))
    x = x - ops.mean(x, axis=0, keepdims=True)
    x = x / ops.sqrt(ops.sum(ops.square(x)) + _EPSILON)
    gram = ops.matmul(x, ops.transpose(x))
    return gram / ops.sqrt(ops.sum(ops.square(gram)) + _EPSILON)


def linear_cka(x, y):
    """Linear CKA between two feature batches of possibly different widths.

    `CKA = <Kc, Lc>_F / (||Kc||_F ||Lc||_F)` with `Kc`, `Lc` the centered
    Gram matrices (B x B) of `x` and `y` flattened to (B, -1). It is 1 for
    features that match up to an orthogonal transform and an isotropic
    scaling, and invariant to both.

    Args:
        x: a tensor of shape (B, ...).
        y: a tensor of shape (B, ...), with the same batch size as `x`.

    Returns:
        A float32 scalar in [0, 1].
    """
    return ops.sum(ops.multiply(_normalized_gram(x), _normalized_gram(y)))


def similarity_matrix(features):
    """The L x L matrix of pairwise linear CKA between a list of features.

    Each Gram matrix is computed, centered and normalized once; the matrix is
    then their pairwise inner products.

    Args:
        features: a list of L tensors, each (B, ...), with one batch size B.

    Returns:
        A float32 tensor of shape (L, L): symmetric, with a unit diagonal
        (except for a layer whose features are constant over the batch).
    """
    grams = [ops.reshape(_normalized_gram(f), (-1,)) for f in features]
    grams = ops.stack(grams, axis=0)  # (L, B*B)
    return ops.matmul(grams, ops.transpose(grams))


# ---------------------------------------------------------------------------
# Argument checks and feature lists.
# ---------------------------------------------------------------------------


def _is_tensor_like(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _count(outputs):
    return len(outputs) if isinstance(outputs, (dict, list, tuple)) else 1


class _MultiLayerLoss(keras.distillation.DistillationLoss):
    """Turns the outputs the loss receives into one feature list per layer."""

    layer_names = ()

    def _require_layer_names(self):
        if self.layer_names is None:
            raise ValueError(
                f"{type(self).__name__}() without `layer_names` takes them from "
                f"the models it is given (the compressed layers, by name): "
                f"use it in micik_tf.Distiller or keras.distillation.Distiller, "
                f"or pass `layer_names`."
            )

    def _features(self, outputs, argument):
        """`outputs` as a list of `len(self.layer_names)` tensors, in order."""
        self._require_layer_names()
        count = len(self.layer_names)
        if isinstance(outputs, dict):
            missing = [n for n in self.layer_names if n not in outputs]
            if missing:
                raise ValueError(
                    f"`{argument}` is a dict without the layers {missing}. "
                    f"It needs one entry per name in `layer_names` "
                    f"{list(self.layer_names)}. Received keys: {list(outputs)}"
                )
            return [outputs[n] for n in self.layer_names]
        if isinstance(outputs, (list, tuple)):
            if len(outputs) == count:
                return list(outputs)
            if len(outputs) == count + 1:
                # feature_model(..., include_output=True): the model's own
                # output comes first and is not one of the compared layers.
                return list(outputs[1:])
        elif count == 1 and _is_tensor_like(outputs):
            return [outputs]
        raise ValueError(
            f"`{argument}` must hold the features of the {count} layers "
            f"{list(self.layer_names)}: a list of {count} tensors in that "
            f"order, a dict keyed by those names, or the {count + 1} outputs "
            f"of `feature_model(model, layer_names)`. Received "
            f"{_count(outputs)} output(s) of type {type(outputs).__name__}."
        )

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Checks that both sides hold one feature per layer in `layer_names`."""
        self._features(teacher_outputs, "teacher_outputs")
        self._features(student_outputs, "student_outputs")

    def _validate_final_outputs(self, teacher, student):
        """Checks that models whose final output is compared return the features."""
        count = len(self.layer_names)
        for role, model in (("teacher", teacher), ("student", student)):
            outputs = getattr(model, "outputs", None)
            if outputs is None:
                continue  # Subclassed: the outputs are checked on the first step.
            if len(outputs) not in (count, count + 1):
                raise ValueError(
                    f"{type(self).__name__} compares the features of the "
                    f"{count} layers {list(self.layer_names)}, but the "
                    f"{role} model '{model.name}' has {len(outputs)} "
                    f"output(s). Wrap both models with "
                    f"`micik_tf.feature_model(model, layer_names)` "
                    f"so that their outputs are those features."
                )


# ---------------------------------------------------------------------------
# The losses.
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="micik_tf")
class CrossLayerSimilarity(_MultiLayerLoss):
    """MICIK's similarity loss: keep the teacher's layer-to-layer structure.

    With `S^T` and `S^S` the L x L linear-CKA matrices between the features of
    the teacher's and the student's layers,

        L_sim = sum_{i<j} w_ij (S^S_ij - S^T_ij)^2
        w_ij  = w_near if |i - j| <= window else w_far

    Args:
        layer_names: the names of the L >= 2 compared layers, in layer order.
            Defaults to None: the Distiller's teacher and student give them
            (`similarity_layer_names`: the compressed layers, by name).
        window: a positive int; pairs at most this many layers apart are
            "near". Defaults to 1 (neighbours).
        w_near: the non-negative weight of near pairs. Defaults to 1.0.
        w_far: the non-negative weight of far pairs. Defaults to 0.5.

    Inputs to `compute_loss`: teacher and student features, each a list of L
    tensors (B, ...) in `layer_names` order, a dict keyed by layer name, or
    the L + 1 outputs of `feature_model(model, layer_names)`.

    Output: a float32 scalar.
    """

    def __init__(self, layer_names=None, window=1, w_near=1.0, w_far=0.5):
        self.window = positive_int("window", window)
        self.w_near = _non_negative_float("w_near", w_near)
        self.w_far = _non_negative_float("w_far", w_far)
        # The losses see the final outputs: the features from feature_model.
        self.teacher_layer_name = None
        self.student_layer_name = None
        self.layer_names = None
        if layer_names is not None:
            self._set_layer_names(layer_names)

    def _set_layer_names(self, layer_names):
        self.layer_names = _names("layer_names", layer_names, minimum=2)
        count = len(self.layer_names)
        i, j = np.meshgrid(np.arange(count), np.arange(count), indexing="ij")
        weights = np.where(np.abs(i - j) <= self.window, self.w_near, self.w_far)
        # Only i < j: the matrices are symmetric and their diagonals are 1.
        self._pair_weights = np.where(i < j, weights, 0.0).astype("float32")

    def validate_model_compatibility(self, teacher, student):
        if self.layer_names is None:
            self._set_layer_names(similarity_layer_names(teacher, student))
        self._validate_final_outputs(teacher, student)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """Returns `L_sim` as a float32 scalar; gradients reach only the student."""
        teacher = self._features(teacher_outputs, "teacher_outputs")
        student = self._features(student_outputs, "student_outputs")
        s_teacher = similarity_matrix([ops.stop_gradient(f) for f in teacher])
        s_student = similarity_matrix(student)
        squared = ops.square(s_student - ops.stop_gradient(s_teacher))
        return ops.sum(ops.multiply(self._pair_weights, squared))

    def get_config(self):
        return {
            "layer_names": None if self.layer_names is None else list(self.layer_names),
            "window": self.window,
            "w_near": self.w_near,
            "w_far": self.w_far,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="micik_tf")
class LayerInheritance(_MultiLayerLoss):
    """MICIK's inheritance loss: tie each compressed layer to its original.

        L_inh = sum_l (1 - CKA(F^S_l, F^T_l))

    With a single layer name, the loss sets `teacher_layer_name` and
    `student_layer_name` to it, so `keras.distillation.Distiller` extracts that
    layer's output from plain teacher and student models. With several names,
    wrap the models with `feature_model(model, layer_names)`.

    Args:
        layer_names: a layer name, or a list of distinct layer names.
            Defaults to None: the Distiller's teacher and student give them
            (`similarity_layer_names`).

    Inputs to `compute_loss`: teacher and student features, each a single
    tensor (B, ...) when there is one name, a list of tensors in
    `layer_names` order, a dict keyed by layer name, or the outputs of
    `feature_model(model, layer_names)`.

    Output: a float32 scalar in [0, L].
    """

    def __init__(self, layer_names=None):
        self.layer_names = None
        self.teacher_layer_name = self.student_layer_name = None
        if layer_names is not None:
            self._set_layer_names(layer_names)

    def _set_layer_names(self, layer_names):
        self.layer_names = _names("layer_names", layer_names, minimum=1)
        single = self.layer_names[0] if len(self.layer_names) == 1 else None
        self.teacher_layer_name = single
        self.student_layer_name = single

    def validate_model_compatibility(self, teacher, student):
        if self.layer_names is None:
            self._set_layer_names(similarity_layer_names(teacher, student))
        if self.teacher_layer_name is None:
            self._validate_final_outputs(teacher, student)
            return
        name = self.teacher_layer_name
        for role, model in (("teacher", teacher), ("student", student)):
            if getattr(model, "inputs", None) is None:
                raise ValueError(
                    f"LayerInheritance('{name}') reads the output of a named "
                    f"layer, which needs a Functional or Sequential {role} "
                    f"model; '{model.name}' has no symbolic inputs."
                )
            _get_layers(model, [name])

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """Returns `L_inh` as a float32 scalar; gradients reach only the student."""
        teacher = self._features(teacher_outputs, "teacher_outputs")
        student = self._features(student_outputs, "student_outputs")
        terms = [
            1.0 - linear_cka(s, ops.stop_gradient(t))
            for t, s in zip(teacher, student)
        ]
        return ops.sum(ops.stack(terms))

    def get_config(self):
        names = self.layer_names
        if names is None:
            return {"layer_names": None}
        return {"layer_names": names[0] if len(names) == 1 else list(names)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def logits_distillation(temperature):
    """Knowledge distillation on the logits: a `keras.distillation.LogitsDistillation`.

    MICIK's `L_kd = T^2 * KL(softmax(z_T/T) || softmax(z_S/T))`. Keras 3.15's
    `LogitsDistillation` computes exactly that when its loss is a
    `keras.losses.KLDivergence` *instance*: it divides both logits by `T`,
    takes `softmax` of each, applies `KLDivergence(y_true=teacher,
    y_pred=student)` averaged over the batch, and multiplies by `T^2` so that
    the gradients keep their scale as `T` changes.

    Its default, `loss="kl_divergence"`, does not: the string resolves to the
    plain `keras.losses.kl_divergence` function, which fails that class's
    `isinstance(loss_fn, keras.losses.KLDivergence)` check, so it takes the
    other branch and compares the scaled logits as if they were
    probabilities, without softmax and without `T^2`. Hence the explicit
    `KLDivergence()` here.

    Args:
        temperature: the positive softmax temperature `T`.

    Returns:
        A `keras.distillation.LogitsDistillation`.
    """
    return keras.distillation.LogitsDistillation(
        temperature=temperature, loss=keras.losses.KLDivergence()
    )


# ---------------------------------------------------------------------------
# Models and layer names.
# ---------------------------------------------------------------------------


def _get_layers(model, names):
    """The top-level layers of `model` with `names`, or a ValueError naming the missing."""
    by_name = {layer.name: layer for layer in model.layers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"Model '{model.name}' has no top-level layer named "
            f"{', '.join(repr(n) for n in missing)}. Layers are matched by "
            f"name at the top level. Available layers: {list(by_name)}"
        )
    return [by_name[n] for n in names]


def feature_model(model, layer_names, include_output=True):
    """A model with `model`'s inputs that returns the features of named layers.

    Its outputs are the list `[model.output, F_1, ..., F_L]`, or
    `[F_1, ..., F_L]` when `include_output=False`, where `F_l` is the output of
    the top-level layer `layer_names[l]`. It shares `model`'s layers and
    weights. Give it as teacher and student to `keras.distillation.Distiller`
    with `CrossLayerSimilarity` / `LayerInheritance`, which ignore the leading
    model output; `LogitsDistillation(temperature=T,
    loss=[keras.losses.KLDivergence()] + [None] * L)` then distils that output
    alone.

    Args:
        model: a built Functional or Sequential `keras.Model`.
        layer_names: a layer name, or a list of top-level layer names.
        include_output: whether the model's own output comes first.

    Returns:
        A `keras.Model` named `f"{model.name}_features"`.
    """
    names = _names("layer_names", layer_names, minimum=1)
    if getattr(model, "inputs", None) is None:
        raise ValueError(
            f"`feature_model` needs a built Functional or Sequential model "
            f"with symbolic inputs; '{model.name}' "
            f"({type(model).__name__}) has none. Build a Sequential model "
            f"with a `keras.Input`, or rebuild a subclassed model as a "
            f"Functional one."
        )
    features = [layer.output for layer in _get_layers(model, names)]
    if isinstance(model, keras.Sequential):
        # A Sequential model has no `input`/`output`, only one-element lists.
        inputs, output = model.inputs[0], model.outputs[0]
    else:
        # `input` keeps the structure the model is called with (a tensor, a
        # list or a dict), so the feature model is called the same way.
        inputs, output = model.input, model.output
    outputs = [output] + features if include_output else features
    return keras.Model(inputs, outputs, name=f"{model.name}_features")


def similarity_layer_names(teacher, student):
    """The layers that `CrossLayerSimilarity` and `LayerInheritance` compare.

    These are the names of the teacher's top-level `Conv2D` and `Dense`
    layers whose name is also a top-level layer of the student, of a type a
    compressed site can have there (`FactorizedConv2D`, `FactorizedDense`, or
    the original `Conv2D`/`Dense`): compression keeps a site's layer name.
    Composite layers with compressed layers inside (a `CompressedBlock` in
    the student, such as an attention layer) are compared at their outputs.

    Args:
        teacher: the original `keras.Model`.
        student: the compressed `keras.Model`.

    Returns:
        A list of layer names, in the teacher's layer order.
    """
    student_layers = {layer.name: layer for layer in student.layers}
    return [
        layer.name
        for layer in teacher.layers
        if (isinstance(layer, _TEACHER_TYPES)
            and isinstance(student_layers.get(layer.name), _STUDENT_TYPES))
        # A composite layer (e.g. attention) with compressed layers inside.
        or isinstance(student_layers.get(layer.name), CompressedBlock)
    ]

"""The recovery objective, shared by the custom loop and `micik_tf.Distiller`.

    L = CE(y, z_S) + alpha * L_kd + beta * L_sim + gamma * L_inh

(MICIK.md section 1). Both training paths compute the cross-entropy their own
way (the loop over the global batch, `fit` through a Keras loss) and hand it
here with the teacher's and the student's `feature_model` outputs; everything
else is this one function, so the two paths cannot drift apart (a test
checks they give the same loss on the same batch).

Inside a `tf.distribute` replica context the batch-level CKA terms are
computed on the all-gathered global batch and count `1/replicas` each, so
that the gradients summed over replicas equal one device's on the same
global batch. The KD term needs no such share: it reduces through a
`keras.losses.Loss`, which Keras already divides by the replica count there.
"""

import dataclasses

import tensorflow as tf

from micik_tf.recovery import losses
from micik_tf.recovery.strategies import in_replica_context
from micik_tf.validation import non_negative_float, positive_float, positive_int

TERMS = ("loss", "ce", "kd", "sim", "inh")


@dataclasses.dataclass
class Weights:
    """The objective's weights and the similarity term's settings (the first
    fields of the loop's `RecoveryConfig`, which checks them with its flags).

    Attributes:
        alpha, beta, gamma: the weights of L_kd, L_sim and L_inh.
        temperature: the KD softmax temperature (the term is scaled by T^2).
        window, w_near, w_far: pairs of layers at most `window` apart weigh
            `w_near` in L_sim, the others `w_far`.
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5
    temperature: float = 4.0
    window: int = 1
    w_near: float = 1.0
    w_far: float = 0.5

    def checked(self):
        """`self`, after a ValueError naming any argument out of range."""
        for name in ("alpha", "beta", "gamma", "w_near", "w_far"):
            non_negative_float(name, getattr(self, name))
        positive_float("temperature", self.temperature)
        positive_int("window", self.window)
        return self


class RecoveryObjective:
    """`L` on the outputs of `feature_model(teacher)` and `feature_model(student)`.

    Args:
        layer_names: the compared layers (may be empty: then L_sim and L_inh
            are zero; L_sim needs at least two).
        weights: a `Weights`.
    """

    def __init__(self, layer_names, weights):
        self.layer_names = list(layer_names)
        self.weights = weights
        self.kd = losses.logits_distillation(weights.temperature)
        self.similarity = (
            losses.CrossLayerSimilarity(self.layer_names, weights.window, weights.w_near, weights.w_far)
            if len(self.layer_names) >= 2 else None
        )
        self.inheritance = losses.LayerInheritance(self.layer_names) if self.layer_names else None

    def __call__(self, teacher_outputs, student_outputs, ce):
        """The total and its terms.

        Args:
            teacher_outputs, student_outputs: `[logits, F_1, ..., F_L]`.
            ce: the student's cross-entropy, already reduced the way the
                caller's training path reduces per-example losses.

        Returns:
            A dict with the float32 scalars `TERMS`: "loss" (the total),
            "ce", "kd", "sim" and "inh" (unweighted).
        """
        w = self.weights
        zero = tf.constant(0.0)
        t_logits = tf.cast(teacher_outputs[0], tf.float32)
        s_logits = tf.cast(student_outputs[0], tf.float32)
        kd = self.kd.compute_loss(t_logits, s_logits) if w.alpha else zero
        t_feats, s_feats = list(teacher_outputs[1:]), list(student_outputs[1:])
        share = 1.0
        if in_replica_context() and (w.beta or w.gamma):
            # CKA is a statistic of the whole batch: gather every replica's
            # features so each computes it on the global batch, as one device
            # would. all_gather's gradient routes back to each replica's slice.
            context = tf.distribute.get_replica_context()
            share = 1.0 / context.num_replicas_in_sync
            if context.num_replicas_in_sync > 1:
                t_feats = [context.all_gather(f, axis=0) for f in t_feats]
                s_feats = [context.all_gather(f, axis=0) for f in s_feats]
        sim = (
            self.similarity.compute_loss(t_feats, s_feats) * share
            if self.similarity is not None and w.beta else zero
        )
        inh = (
            self.inheritance.compute_loss(t_feats, s_feats) * share
            if self.inheritance is not None and w.gamma else zero
        )
        ce = tf.cast(ce, tf.float32)
        total = ce + w.alpha * kd + w.beta * sim + w.gamma * inh
        return {"loss": total, "ce": ce, "kd": kd, "sim": sim, "inh": inh}

"""Recovery from Python: a `keras.distillation.Distiller` with MICIK's losses.

    student = micik_tf.compress(teacher, ratio=16, calibration_data=x[:512])
    distiller = micik_tf.Distiller(teacher, student)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    distiller.fit(train_ds, validation_data=val_ds, epochs=5)

It trains with plain `fit`, under any `tf.distribute` strategy scope, on the
same objective as `tools/train.py`'s loop (`objective.RecoveryObjective`):
cross-entropy, logits KD, cross-layer similarity and inheritance, on the
compressed layers matched by name (or the `layer_names` given).

Keras' Distiller freezes its teacher by setting `teacher.trainable = False`,
which would change the caller's model. This one leaves the flag as it was
and trains the student's variables only (`trainable_weights`); the teacher
runs with `training=False`, so its weights and BatchNorm statistics stay
bit-identical.
"""

import dataclasses

import keras
import tensorflow as tf

from micik_tf.compression import graph
from micik_tf.recovery import losses, objective
from micik_tf.recovery.strategies import in_replica_context
from micik_tf.validation import names as _names


@keras.saving.register_keras_serializable(package="micik_tf")
class Distiller(keras.distillation.Distiller):
    """Recovers a compressed `student` from its `teacher` with `fit`.

    Args:
        teacher: the original model (logits out). A subclassed teacher is
            run as a copy inside a Functional model (its weights copied, the
            original left as it is), as `compress()` returns its student.
        student: its compressed copy (e.g. from `micik_tf.compress`), with
            the same inputs and outputs.
        layer_names: the layers whose features L_sim and L_inh compare, by
            name in both models. Defaults to the teacher's Dense and Conv2D
            layers that the student has under the same name (the compressed
            layers and the ones left whole).
        alpha, beta, gamma: the weights of L_kd, L_sim and L_inh.
        temperature: the KD softmax temperature.
        window, w_near, w_far: L_sim's pair weighting.
        name: the model's name.

    `compile(optimizer, metrics=...)` needs no loss: the student's term is
    sparse categorical cross-entropy on logits unless `loss` says otherwise.
    Calling the distiller runs the student; `distiller.student` is the model
    to save and export.
    """

    def __init__(self, teacher, student, layer_names=None, alpha=1.0, beta=1.0,
                 gamma=0.5, temperature=4.0, window=1, w_near=1.0, w_far=0.5,
                 name="micik_distiller", **kwargs):
        if isinstance(teacher, keras.Model) and not graph.is_graph_model(teacher):
            # A subclassed teacher runs as a copy inside a Functional model,
            # as compress() returns its student: their outputs line up by name.
            teacher = graph.as_graph(teacher)
        for role, model in (("teacher", teacher), ("student", student)):
            _check_model(role, model)
        _check_logits(teacher)
        if layer_names is None:
            layer_names = losses.similarity_layer_names(teacher, student)
        else:
            layer_names = _names("layer_names", layer_names, minimum=1)
        self._weights = objective.Weights(
            alpha, beta, gamma, temperature, window, w_near, w_far).checked()
        self.objective = objective.RecoveryObjective(layer_names, self._weights)
        # Keras' __init__ sets teacher.trainable = False (see the module
        # docstring); the caller's flags are put back right after it.
        flags = _trainable_flags(teacher)
        super().__init__(
            teacher=teacher,
            student=student,
            distillation_losses=[self.objective.kd],
            distillation_loss_weights=[alpha],
            student_loss_weight=0.5,
            name=name,
            **kwargs,
        )
        _restore_trainable_flags(flags)
        self.layer_names = list(layer_names)
        self._teacher_features = losses.feature_model(teacher, self.layer_names, include_output=True) \
            if self.layer_names else None
        self._student_features = losses.feature_model(student, self.layer_names, include_output=True) \
            if self.layer_names else None
        self._last_forward = {}
        self.term_trackers = {
            term: keras.metrics.Mean(name=term) for term in objective.TERMS if term != "loss"
        }

    @property
    def trainable_weights(self):
        # The student's only: the teacher is the caller's, left trainable.
        return self.student.trainable_weights

    @property
    def trainable_variables(self):
        return self.student.trainable_variables

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras' `fit`; a student with sparse unique parts
        (`compress(unique="sparse")`) keeps their masks (zeros) throughout."""
        from micik_tf.deploy.pruning import KeepSparseMasks

        callbacks = list(callbacks or [])
        if not any(isinstance(c, KeepSparseMasks) for c in callbacks):
            callbacks.append(KeepSparseMasks(self.student))
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Keras' `compile`, with cross-entropy on logits as the default loss."""
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._compile_arguments = {"loss": loss, "metrics": metrics}

    def get_compile_config(self):
        # Keras' Distiller compiles its parent with loss=None, so the default
        # compile config would lose the student's loss.
        if getattr(self, "_compile_arguments", None) is None:
            return None
        return keras.saving.serialize_keras_object(
            {"optimizer": self.optimizer, **self._compile_arguments})

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            # So that load_model can restore the optimizer's variables.
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None):
        """The student's output. With features compared, the student runs as
        its feature model, and `compute_loss` reuses this forward pass (one
        pass per step, so BatchNorm statistics move once, as in the loop)."""
        if self._student_features is None:
            return self.student(inputs, training=training)
        outputs = list(self._student_features(inputs, training=training))
        self._last_forward["outputs"] = outputs
        return outputs[0]

    def _student_outputs(self, x, y_pred, training):
        if self._student_features is None:
            return [self.student(x, training=training) if y_pred is None else y_pred]
        last = self._last_forward.pop("outputs", None)
        if y_pred is not None and last is not None and last[0] is y_pred:
            return last
        return list(self._student_features(x, training=training))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """`L` for one batch (see `objective`)."""
        student = self._student_outputs(x, y_pred, training)
        if self._teacher_features is None:
            teacher = [self.teacher(x, training=False)]
        else:
            teacher = list(self._teacher_features(x, training=False))
        ce = self._student_loss(y, student[0])
        terms = self.objective(teacher, student, ce)
        # Each replica's terms count 1/replicas of the global batch's (see
        # `objective`); the logs show the global batch's values.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync if in_replica_context() else 1
        for term, tracker in self.term_trackers.items():
            tracker.update_state(terms[term] * replicas)
        return terms["loss"]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        logs.update({term: tracker.result() for term, tracker in self.term_trackers.items()})
        return logs

    @property
    def metrics(self):
        # Keras' student/distillation/total trackers stay unused: the terms
        # of L are tracked one by one instead.
        unused = {id(self.student_loss_tracker), id(self.distillation_loss_tracker),
                  id(self.total_loss_tracker)}
        kept = [m for m in super().metrics if id(m) not in unused]
        return kept + list(self.term_trackers.values())

    def get_config(self):
        base = keras.Model.get_config(self)
        base.update({
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "layer_names": list(self.layer_names),
            **dataclasses.asdict(self._weights),
        })
        return base

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)


def _check_model(role, model):
    if not isinstance(model, keras.Model) or getattr(model, "inputs", None) is None:
        raise TypeError(
            f"Distiller's {role} must be a built Functional or Sequential "
            f"keras.Model, whose layers' outputs can be read by name. "
            f"Received: {type(model).__name__}."
        )


def _check_logits(teacher):
    """KD and the default loss read logits: refuse a softmax output."""
    last = teacher.layers[-1]
    activation = getattr(last, "activation", None)
    if activation is keras.activations.softmax or isinstance(last, keras.layers.Softmax):
        raise ValueError(
            f"The teacher '{teacher.name}' ends in a softmax, but knowledge "
            f"distillation reads logits. Rebuild its last layer without the "
            f"softmax (the same weights), e.g. keras.Model(teacher.input, "
            f"teacher.layers[-1].input) plus a linear Dense, or apply softmax "
            f"after the model."
        )


def _trainable_flags(model):
    """The `trainable` flags of `model`, its nested models' layers (parents
    first) and its variables, for `_restore_trainable_flags`."""
    layers, stack = [], [model]
    while stack:
        layer = stack.pop(0)
        layers.append(layer)
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
    return ([(layer, layer.trainable) for layer in layers],
            [(variable, variable.trainable) for variable in model.variables])


def _restore_trainable_flags(flags):
    layers, variables = flags
    # Parents first: setting a layer's flag propagates to its sublayers,
    # whose own flags are then set again.
    for layer, trainable in layers:
        layer.trainable = trainable
    for variable, trainable in variables:
        variable.trainable = trainable

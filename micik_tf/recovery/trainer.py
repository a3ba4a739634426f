"""Recovery training: a custom loop under `tf.distribute`.

The student (the compressed model) learns from the frozen teacher through

    L = CE(y, z_S) + alpha * L_kd + beta * L_sim + gamma * L_inh

(MICIK.md section 1). Each step runs on every replica with `strategy.run`.
Per-example losses are averaged over the *global* batch; the KD term (a mean
over the local batch, which Keras' Loss already divides by the replica count)
and the CKA terms (computed on the all-gathered global batch) count
1/replicas each, so that the summed gradients equal those of one device on
the same global batch (a test checks it).

Checkpoints hold the student, the optimizer, the global step and the data
position (epoch and batch within it). Each epoch's shuffle is seeded by the
epoch number, so a resumed run replays exactly the batches it had not seen.
"""

import dataclasses
import os
import shutil
import tempfile
import time


import keras
import tensorflow as tf

from micik_tf import files
from micik_tf.recovery import evaluation, losses, objective, strategies

COMPONENTS = objective.TERMS
# What a step adds to the epoch's sums: the loss components, then the counts
# behind the training accuracy.
SUMMED = COMPONENTS + ("correct", "count")
# Steps between reads of the running losses for the progress bar and
# TensorBoard (each read waits for the device).
LOG_EVERY = 20
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass
class RecoveryConfig(objective.Weights):
    """Hyper-parameters of recovery training.

    Attributes:
        alpha, beta, gamma: weights of L_kd, L_sim and L_inh.
        temperature: softmax temperature of the KD term (scaled by T^2).
        window, w_near, w_far: the similarity weighting: pairs of layers at
            most `window` apart weigh `w_near`, the others `w_far`.
        epochs, batch_size: the schedule; `batch_size` is global.
        optimizer: "adam", "adamw" or "sgd" (momentum 0.9).
        learning_rate, schedule: peak learning rate, "cosine" or "constant".
        weight_decay: for adamw.
        clip_norm: global gradient-norm clipping (None: off).
        mixed_precision: wraps the optimizer in a LossScaleOptimizer.
        checkpoint_every: steps between checkpoints (one is also saved at the
            end of every epoch).
        seed: seeds the data order.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    clip_norm: float | None = None
    mixed_precision: bool = False
    checkpoint_every: int = 100
    seed: int = 0


def make_optimizer(config, total_steps):
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(total_steps, 1)
        )
    elif config.schedule == "constant":
        lr = config.learning_rate
    else:
        raise ValueError(f"Unknown schedule {config.schedule!r}: use 'cosine' or 'constant'.")
    common = dict(learning_rate=lr, global_clipnorm=config.clip_norm)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(weight_decay=config.weight_decay, **common)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=0.9, nesterov=True, **common)
    else:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}: use 'adam', 'adamw' or 'sgd'.")
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class RecoveryTrainer:
    """Trains a compressed student against its teacher.

    Build it inside `strategy.scope()` after creating both models there.

    Args:
        teacher: the original model (frozen; never updated).
        student: the compressed model (layer names match the teacher's at
            compressed sites).
        strategy: the `tf.distribute.Strategy` the models were built under.
        config: a `RecoveryConfig`.
        model_dir: where checkpoints and TensorBoard logs go.
        steps_per_epoch: training steps per epoch (for the schedule and bar).
        feature_layers: layers whose features feed L_sim and L_inh (default:
            the Dense/Conv2D layers present in both models).
        verbose: 1 shows a progress bar per epoch.
        pruner: optional `micik_tf.deploy.pruning.MagnitudePruner`; it is updated
            after every step, outside `strategy.run`, so pruned weights stay
            zero while recovery trains the rest.
        quantizer: optional `micik_tf.deploy.quantization.WeightQuantizer`: from its
            `begin_step` on, each step trains on int8-rounded weights (QAT).
        before_validation: optional `fn()` run before each validation, e.g.
            to re-estimate BatchNorm statistics after pruning.
    """

    def __init__(self, teacher, student, strategy, config, model_dir, steps_per_epoch,
                 feature_layers=None, verbose=1, pruner=None, quantizer=None,
                 before_validation=None):
        self.teacher, self.student, self.strategy = teacher, student, strategy
        self.config, self.model_dir, self.verbose = config, model_dir, verbose
        self.steps_per_epoch = int(steps_per_epoch)
        self.replicas = strategy.num_replicas_in_sync
        self.pruner = pruner
        self.quantizer = quantizer
        self.before_validation = before_validation
        self.chief = strategies.is_chief(strategy)
        if feature_layers is None:
            feature_layers = losses.similarity_layer_names(teacher, student)
        self.feature_layers = list(feature_layers)
        # The teacher is the caller's model: it is not set non-trainable here;
        # the step differentiates the student's variables only, and calls the
        # teacher with training=False.
        self.teacher_features = losses.feature_model(teacher, self.feature_layers)
        self.student_features = losses.feature_model(student, self.feature_layers)
        self.objective = objective.RecoveryObjective(self.feature_layers, config)
        total = self.steps_per_epoch * config.epochs
        self.optimizer = make_optimizer(config, total)
        self.optimizer.build(student.trainable_variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        self.checkpoint = tf.train.Checkpoint(
            student=student, optimizer=self.optimizer, step=self.step,
            epoch=self.epoch, batch=self.batch,
        )
        directory = os.path.join(model_dir, "checkpoints")
        if not self.chief:
            # Every worker must take part in saving (it is a collective), but
            # only the chief's copy is kept.
            directory = tempfile.mkdtemp(prefix="micik_worker_ckpt_")
        self._ckpt_dir = directory
        # Every worker saves the best weights (collective reads); only the
        # chief's copy, in model_dir, is kept.
        self._best_path = (
            os.path.join(model_dir, "best.weights.h5") if self.chief
            else os.path.join(directory, "discard.weights.h5")
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=3)
        self.writer = (
            tf.summary.create_file_writer(os.path.join(model_dir, "logs"))
            if self.chief else tf.summary.create_noop_writer()
        )
        # Per-epoch sums of the step's logs, accumulated on the device: the
        # host reads them only to show progress, not after every step.
        self._sums = tf.Variable(tf.zeros([len(SUMMED)]), trainable=False, name="epoch_sums")
        self.train_step = self._make_train_step()
        self._eval_steps = {}

    # -- steps ---------------------------------------------------------------------

    def _replica_losses(self, x, y):
        t_out = self.teacher_features(x, training=False)
        s_out = self.student_features(x, training=True)
        s_logits = tf.cast(s_out[0], tf.float32)
        per_example = keras.losses.sparse_categorical_crossentropy(y, s_logits, from_logits=True)
        # Over the global batch, so that replicas' gradients sum to one
        # device's (a short last batch still divides by the global size).
        ce = tf.nn.compute_average_loss(per_example, global_batch_size=self.config.batch_size)
        logs = self.objective(t_out, s_out, ce)
        logs["correct"] = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(s_logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        )
        logs["count"] = tf.cast(tf.shape(y)[0], tf.float32)
        return logs["loss"], logs

    def _make_train_step(self):
        variables = self.student.trainable_variables
        optimizer = self.optimizer

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                total, logs = self._replica_losses(x, y)
                if self.config.mixed_precision:
                    total = optimizer.scale_loss(total)
            grads = tape.gradient(total, variables)
            optimizer.apply_gradients(zip(grads, variables))
            # One vector, so that one reduction across replicas carries them all.
            return tf.stack([tf.cast(logs[k], tf.float32) for k in SUMMED])

        @tf.function
        def train_step(x, y, step):
            # Pruning and QAT are TensorFlow ops on the variables, here in the
            # compiled step (cross-replica context, so one assignment updates
            # every replica): nothing goes to the host between steps.
            rounded = self.quantizer.round_weights(step) if self.quantizer else None
            logs = self.strategy.run(replica_step, args=(x, y))
            if self.quantizer is not None:
                # Before the pruner: it ranks the float weights.
                self.quantizer.restore(rounded)
            if self.pruner is not None:
                self.pruner.step(step)
            self._sums.assign_add(self.strategy.reduce("SUM", logs, axis=None))
            self.step.assign_add(1)
            self.batch.assign_add(1)

        return train_step

    def evaluate(self, model, dataset):
        """Top-1 accuracy of `model` on a batched dataset (one trace per model)."""
        if id(model) not in self._eval_steps:
            self._eval_steps[id(model)] = evaluation.accuracy_step(model, self.strategy)
        return evaluation.accuracy(model, dataset, self.strategy, self._eval_steps[id(model)])

    # -- the loop ----------------------------------------------------------------

    def restore(self, with_optimizer=True):
        """Restores the latest checkpoint, if any; returns its step (0 if none).

        Args:
            with_optimizer: also restore the optimizer's state. A resumed run
                that deliberately changed the optimizer's settings starts a
                fresh optimizer (its checkpointed slots would not fit),
                keeping the student, the step and the data position; its
                iteration count is set to the step, so that the learning-rate
                schedule continues where it was.

        Raises:
            ValueError: the checkpoint does not fit this student.
        """
        latest = tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
        if latest is None:
            return 0
        checkpoint = self.checkpoint
        if not with_optimizer:
            checkpoint = tf.train.Checkpoint(student=self.student, step=self.step,
                                             epoch=self.epoch, batch=self.batch)
        try:
            status = checkpoint.restore(latest)
            status.assert_existing_objects_matched()
            if not with_optimizer:
                status.expect_partial()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"The checkpoint in {self.model_dir} does not fit this student "
                f"({str(error).splitlines()[0][:200]}). Use a new --model_dir."
            ) from None
        if not with_optimizer:
            self.optimizer.iterations.assign(self.step)
        if self.pruner is not None:
            # Masks are not checkpointed: the zeros in the weights are.
            self.pruner.masks_from_weights()
        return int(self.step.numpy())

    @property
    def best_from_step(self):
        """The first step whose epoch may be kept as the best: once pruning
        has reached its final sparsity and QAT has begun, so that the kept
        weights are as sparse and as int8-trained as the final ones."""
        return max(self.pruner.final_step if self.pruner is not None else 0,
                   self.quantizer.begin_step if self.quantizer is not None else 0)

    def fit(self, train_dataset_fn, validation_dataset, history=None, on_epoch_end=None):
        """Trains from the current step to the end of the schedule.

        Every epoch ends with a checkpoint and, given a validation split, an
        evaluation; the best eligible epoch's weights (`best_from_step`) are
        kept for `restore_best()`. Without a validation split the final
        weights are kept.

        Args:
            train_dataset_fn: `fn(epoch) -> batched tf.data.Dataset` of one
                epoch (its shuffle seeded by `epoch`), with exactly
                `steps_per_epoch` batches of the global batch size.
            validation_dataset: batched dataset for the per-epoch evaluation
                that picks the best epoch, or None.
            history: epochs already done (from a resumed run).
            on_epoch_end: `fn(history)`, e.g. to persist the history.

        Returns:
            The list of per-epoch records.
        """
        history = list(history or [])
        best = max([h["val_accuracy"] for h in history if h.get("best_eligible")], default=-1.0)
        while int(self.epoch.numpy()) < self.config.epochs:
            record = self._train_epoch(train_dataset_fn)
            if validation_dataset is not None:
                if self.before_validation is not None:
                    self.before_validation()
                record["val_accuracy"] = self.evaluate(self.student, validation_dataset)
                record["best_eligible"] = record["step"] >= self.best_from_step
                with self.writer.as_default(step=record["step"]):
                    tf.summary.scalar("val/accuracy", record["val_accuracy"])
                # Ties go to the later epoch: a small validation split
                # saturates early, and later epochs of the decaying schedule
                # are better converged.
                if record["best_eligible"] and record["val_accuracy"] >= best:
                    best = record["val_accuracy"]
                    self.save_best()
                if self.verbose and self.chief:
                    print(f"  val_accuracy={record['val_accuracy']:.4f} (best {best:.4f})")
            history.append(record)
            self.epoch.assign_add(1)
            self.batch.assign(0)
            self.manager.save(checkpoint_number=int(self.step.numpy()))
            if on_epoch_end is not None and self.chief:
                on_epoch_end(history)
        self.writer.flush()
        return history

    def _train_epoch(self, train_dataset_fn):
        """Runs the rest of the current epoch; returns its record."""
        config = self.config
        epoch, skip = int(self.epoch.numpy()), int(self.batch.numpy())
        step = int(self.step.numpy())
        dataset = train_dataset_fn(epoch).skip(skip)
        bar = None
        if self.verbose and self.chief:
            bar = keras.utils.Progbar(self.steps_per_epoch,
                                      stateful_metrics=COMPONENTS + ("acc", "ex/s"))
            print(f"Epoch {epoch + 1}/{config.epochs}"
                  + (f" (resuming at batch {skip})" if skip else ""))
        self._sums.assign(tf.zeros_like(self._sums))
        steps, tic = 0, time.perf_counter()
        for x, y in self.strategy.experimental_distribute_dataset(dataset):
            step += 1
            steps += 1
            self.train_step(x, y, tf.constant(step, tf.int64))
            if steps % LOG_EVERY == 0:
                self._log_progress(bar, skip + steps, steps, step, tic)
            if step % config.checkpoint_every == 0:
                self.manager.save(checkpoint_number=step)
        means = self._log_progress(bar, skip + steps, steps, step, tic)
        return {
            "epoch": epoch + 1,
            "step": int(self.step.numpy()),
            **{k: means[k] for k in COMPONENTS},
            "train_accuracy": means["acc"],
            "examples_per_second": means["ex/s"],
            "partial_epoch": bool(skip),
        }

    def _log_progress(self, bar, position, steps, step, tic):
        """Reads the epoch's sums (one sync with the device), updates the bar
        and TensorBoard, and returns the means so far."""
        sums = dict(zip(SUMMED, self._sums.numpy().tolist()))
        means = {k: sums[k] / max(steps, 1) for k in COMPONENTS}
        means["acc"] = sums["correct"] / max(sums["count"], 1.0)
        means["ex/s"] = sums["count"] / max(time.perf_counter() - tic, 1e-9)
        if bar is not None and steps:
            bar.update(position, list(means.items()))
        with self.writer.as_default(step=step):
            for k in COMPONENTS:
                tf.summary.scalar(f"train/{k}", means[k])
            tf.summary.scalar("train/examples_per_second", means["ex/s"])
        return means

    def save_best(self):
        """Saves the student's weights as the best so far, atomically: a kill
        mid-write leaves the previous best, never a truncated file."""
        files.save_weights(self.student, self._best_path)

    def restore_best(self):
        """Loads the best-validation weights into the student, if saved."""
        path = self._best_path
        if os.path.exists(path):
            self.student.load_weights(path)
            return True
        return False

    def cleanup(self):
        if not self.chief:
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)

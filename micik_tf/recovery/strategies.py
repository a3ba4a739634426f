"""Strategy names to `tf.distribute` strategies (after TF official models'
`distribute_utils.get_distribution_strategy`)."""

import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


def use_logical_cpus(count):
    """Splits the CPU into `count` logical devices, so MirroredStrategy can be
    exercised without GPUs. Must run before TensorFlow initialises devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as error:
        raise RuntimeError(
            "Logical CPU devices must be configured before TensorFlow "
            f"initialises its devices ({error}). Call use_logical_cpus() first."
        ) from None


def get_distribution_strategy(name="default", num_gpus=0, tpu_address=""):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
        name: one of `STRATEGIES`. `default` is TF's default (no distribution);
            `one_device` pins to one GPU (or the CPU when `num_gpus` is 0);
            `mirrored` replicates over `num_gpus` GPUs, or over all logical
            CPUs when there are no GPUs; `multi_worker_mirrored` reads the
            cluster from `TF_CONFIG`; `tpu` connects to `tpu_address`.
        num_gpus: GPUs to use for `one_device` / `mirrored`.
        tpu_address: the TPU name or grpc address (`""` for a local TPU VM).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}: use one of {', '.join(STRATEGIES)}."
        )
    if num_gpus < 0:
        raise ValueError(f"`num_gpus` must be >= 0. Received: {num_gpus}")
    # Physical, not logical: listing logical devices initialises the runtime,
    # after which MultiWorkerMirroredStrategy can no longer configure itself.
    available = len(tf.config.list_physical_devices("GPU"))
    if num_gpus > available:
        raise ValueError(
            f"--num_gpus={num_gpus} but TensorFlow sees {available} GPU(s). "
            "Install tensorflow[and-cuda] (see BUILD_NOTES.md) or lower --num_gpus."
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if num_gpus else "/cpu:0")
    if name == "mirrored":
        if num_gpus:
            devices = [f"/gpu:{i}" for i in range(num_gpus)]
        else:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy):
    """Whether this worker writes checkpoints, logs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def in_replica_context():
    """Whether the caller runs inside `strategy.run` (a replica context).

    Code that assigns to distributed variables from the host (eagerly,
    between steps) must run in the cross-replica context instead.
    """
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()

"""tf.distribute strategies by name, for train.py (`--strategy`).

    one_device             GPU:0 when there is a GPU, else CPU:0
    mirrored               every local GPU; on a machine without GPUs every logical CPU device, so a
                           CPU split into several logical devices (configure_cpu_devices) exercises the
                           same synchronous data-parallel code path as a multi-GPU machine
    multi_worker_mirrored  several machines (or processes), described by the TF_CONFIG environment
                           variable as Kubernetes/Kubeflow and Vertex AI set it
    tpu                    TPUClusterResolver(tpu=address): "" / None = the local TPU VM, a name or a
                           grpc:// address otherwise

Decisions: an unknown name, or multi_worker_mirrored without TF_CONFIG, raises ValueError with the
allowed choices or the missing variable (train.py prints it as a one-line error). So does `mirrored`
on a host where TensorFlow sees no GPU and the CPU is not split (a TensorFlow without CUDA, or CUDA
that failed to load, would otherwise train on one CPU under a multi-GPU flag), and `tpu` when no TPU
answers. `describe_devices` is the start-up line that names what the run got. The CPU split is done by
`configure_cpu_devices`, which must run before TensorFlow initialises its devices; train.py calls it
when the environment variable CPU_DEVICES_ENV (MASKRCNN_TF_CPU_DEVICES) is set, which is how the tests
get 2 logical CPUs in a subprocess. `configure_host_threads` (train.py's --inter_op_threads) runs one
op at a time on a host whose only device is one CPU (why there).
"""

import hashlib
import json
import os
import tempfile

import tensorflow as tf

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "tpu")
# Number of logical CPU devices train.py splits the host CPU into (testing aid; unset = 1).
CPU_DEVICES_ENV = "MASKRCNN_TF_CPU_DEVICES"


def configure_cpu_devices(count: int) -> None:
    """Splits the first physical CPU into `count` logical devices. Must run before TF initialises
    devices (i.e. before any op runs); RuntimeError otherwise."""
    if count < 1:
        raise ValueError(f"{CPU_DEVICES_ENV} must be an integer >= 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def configure_cpu_devices_from_env() -> None:
    """Applies CPU_DEVICES_ENV when it is set (see configure_cpu_devices)."""
    value = os.environ.get(CPU_DEVICES_ENV)
    if not value:
        return
    try:
        count = int(value)
    except ValueError as e:
        raise ValueError(f"{CPU_DEVICES_ENV} must be an integer, got {value!r}") from e
    configure_cpu_devices(count)


# configure_host_threads: 1 inter-op thread on a single-CPU-device host, TF's default elsewhere.
AUTO_INTER_OP_THREADS = -1


def configure_host_threads(inter_op_threads: int = AUTO_INTER_OP_THREADS, strategy_name: str = None) -> int:
    """Sets TensorFlow's inter-op thread count; must run before the runtime starts (RuntimeError after).

    Args:
      inter_op_threads: n >= 1 sets n; 0 keeps TF's default (one per core); AUTO_INTER_OP_THREADS (-1)
        sets 1 when the host's only device is one CPU and keeps the default otherwise.
      strategy_name: train.py's --strategy; "tpu" keeps TF's default under AUTO_INTER_OP_THREADS (a
        client of a remote TPU sees no local accelerator, yet its host threads feed the TPU).

    Returns:
      The count set, 0 when TF's default is kept.

    Why 1 on a CPU: every op already spreads over all cores through its intra-op pool (oneDNN, Eigen),
    so a second op at the same time shares the same cores and keeps its tensors alive next to the
    first's: lower peak RSS for a few percent of step time (figures: benchmarks/README.md). Not with
    GPUs or TPUs (inter-op threads launch their kernels) nor with
    several logical CPUs (replicas run side by side).
    """
    if inter_op_threads < AUTO_INTER_OP_THREADS:
        raise ValueError(f"inter_op_threads must be >= 1, 0 (TF default) or -1 (auto), got {inter_op_threads}")
    if inter_op_threads == AUTO_INTER_OP_THREADS:
        cpus = tf.config.list_physical_devices("CPU")
        split = tf.config.get_logical_device_configuration(cpus[0]) if cpus else None  # None: not split
        one_cpu_device = len(cpus) == 1 and (split is None or len(split) == 1)
        accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
        inter_op_threads = 1 if one_cpu_device and not accelerators and strategy_name != "tpu" else 0
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    return inter_op_threads


def _tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("--strategy=multi_worker_mirrored needs the TF_CONFIG environment variable "
                         '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}})')
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e})") from e
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return config


def get_strategy(name: str, tpu_address: str = None) -> tf.distribute.Strategy:
    """The tf.distribute.Strategy called `name` (one of STRATEGIES); ValueError for anything else."""
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU")
        if not devices:
            devices = tf.config.list_logical_devices("CPU")
            if len(devices) < 2:
                raise ValueError(
                    "--strategy=mirrored: TensorFlow sees no GPU (a TensorFlow without CUDA, or CUDA that failed "
                    "to load: pip install 'maskrcnn_tf[gpu]' and check nvidia-smi); to train on this CPU use "
                    f"--strategy=one_device, or split it into N replicas with {CPU_DEVICES_ENV}=N")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker_mirrored":
        _tf_config()  # fail with a clear message before TF tries to build a cluster
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            where = f"at {tpu_address!r}" if tpu_address else "on this machine (not a TPU VM?)"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--strategy=tpu: no TPU {where} ({reason}); a TPU VM needs the tensorflow-tpu "
                             "package (README, 'Install')") from e
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; allowed: {' | '.join(STRATEGIES)}")


def describe_devices(strategy: tf.distribute.Strategy) -> str:
    """"2 replica(s) on 2 x GPU (MirroredStrategy)", "4 replica(s) on 2 x GPU on each of 2 workers
    (CollectiveAllReduceStrategy)": what a run trains on, for its start-up line."""
    local = [tf.DeviceSpec.from_string(d).device_type or "CPU" for d in strategy.extended.worker_devices]
    on = ", ".join(f"{local.count(kind)} x {kind}" for kind in sorted(set(local)))
    workers = strategy.num_replicas_in_sync // max(len(local), 1)
    where = f"{on} on each of {workers} workers" if workers > 1 else on
    return f"{strategy.num_replicas_in_sync} replica(s) on {where} ({type(strategy).__name__})"


def worker_scratch_dir(model_dir: str, task_type: str, task_id: int) -> str:
    """Local directory where a non-chief worker saves its (never read) checkpoints: one fixed path per
    model_dir and task (TF_CONFIG's task type and index), so the next start of a killed worker finds
    and empties it."""
    task = f"{task_type}-{task_id}"
    if "://" not in model_dir:
        model_dir = os.path.abspath(model_dir)
    run = hashlib.sha1(model_dir.encode("utf-8")).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"maskrcnn_tf_worker-{run}-{task}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes logs, config and checkpoints (worker 0 / the only process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0
                                                         and "chief" not in resolver.cluster_spec().as_dict())

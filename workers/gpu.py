"""The GPUs a worker runs on: that a GPU asked for is there, memory growth or a
memory cap, TF32 off where fp32 is the reference, and each GPU's physical name.

Everything here runs before any model loads: TensorFlow fixes its device setup
when it first uses a device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.devices import GPU_ID as _GPU_ID
from shared.settings import Settings

log = logging.getLogger(__name__)

# NVIDIA_VISIBLE_DEVICES values under which the container runtime mounts no GPU.
_NO_DEVICES = frozenset({"", "void", "none"})


class GpuError(RuntimeError):
    """A GPU was asked for and this process has none (one line, for the start log)."""


def gpu_requested(settings: Settings, environ: Mapping[str, str] = os.environ) -> str | None:
    """What asked this worker for a GPU (for the refusal), or None when nothing did.

    ``IMGQ_REQUIRE_GPU`` decides when it is set (``imgq worker --gpu`` sets it to
    true); unset, a container given GPUs (``NVIDIA_VISIBLE_DEVICES``, set by the
    NVIDIA container runtime for compose's GPU reservations and ``docker run --gpus``)
    asks for one.
    """
    if settings.require_gpu is not None:
        return "IMGQ_REQUIRE_GPU=true" if settings.require_gpu else None
    nvidia = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is not None and nvidia.strip().lower() not in _NO_DEVICES:
        return f"NVIDIA_VISIBLE_DEVICES={nvidia}"
    return None


def _why_no_gpu(tf: Any, environ: Mapping[str, str]) -> str:
    """The likeliest reason TensorFlow lists no GPU, and what to do."""
    if not tf.test.is_built_with_cuda():
        return (
            "this TensorFlow is built without CUDA (tensorflow-cpu): build the image with "
            "--build-arg TF_PACKAGE='tensorflow[and-cuda]'"
        )
    if str(getattr(tf, "__version__", "")).startswith("2.16."):
        return (
            "TensorFlow 2.16's CUDA wheels find their libraries only through "
            "LD_LIBRARY_PATH: use TensorFlow 2.17 or later on GPU hosts"
        )
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    return (
        f"TensorFlow lists no GPU{where}: no such GPU on this host, or the NVIDIA driver "
        "or CUDA libraries failed to load (TensorFlow's log above says which; nvidia-smi "
        "must work here)"
    )


@dataclass(frozen=True)
class Devices:
    """The GPUs this process uses, as TensorFlow names them and as the host does."""

    names: tuple[str, ...]  # TensorFlow's physical names: /physical_device:GPU:0
    labels: tuple[str, ...]  # the host's: its index or UUID (CUDA/NVIDIA_VISIBLE_DEVICES)
    compute_capability: tuple[int, int] | None  # the lowest of them; None without GPUs


NO_GPU = Devices(names=(), labels=(), compute_capability=None)


def no_tensorflow(settings: Settings, environ: Mapping[str, str] = os.environ) -> Devices:
    """No GPUs, for a worker whose models all run in NumPy (TensorFlow is not even
    imported); a GPUError when a GPU was asked for, as it would go unused."""
    wanted = gpu_requested(settings, environ)
    if wanted:
        raise GpuError(
            f"a GPU was asked for ({wanted}) and this worker's models all run on the "
            "numpy runtime, on the CPU"
        )
    return NO_GPU


def physical_labels(count: int, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The host's name of each of the first ``count`` GPUs TensorFlow numbers 0, 1, ...

    TensorFlow counts the GPUs it sees from 0: the ones CUDA_VISIBLE_DEVICES lists,
    in a container the ones NVIDIA_VISIBLE_DEVICES mounted. GPU 0 of a worker
    started with ``--gpu 2`` is the host's GPU 2.
    """
    labels = [str(i) for i in range(count)]
    nvidia = [v.strip() for v in environ.get("NVIDIA_VISIBLE_DEVICES", "").split(",")]
    if not all(_GPU_ID.match(v) for v in nvidia):  # unset, "all", "void": no mapping
        nvidia = []
    cuda = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if not all(_GPU_ID.match(v) for v in cuda):
        cuda = []
    for i in range(count):
        label = cuda[i] if i < len(cuda) else labels[i]
        if nvidia and label.isdigit() and int(label) < len(nvidia):
            label = nvidia[int(label)]  # a container's index, as the host numbers it
        labels[i] = label
    return tuple(labels)


def configure(
    settings: Settings,
    *,
    environ: Mapping[str, str] = os.environ,
    tf: Any = None,
) -> Devices:
    """Set up TensorFlow's GPUs before any model loads: a GPUError (one line) when a
    GPU was asked for and there is none; then memory growth or the memory cap."""
    if tf is None:
        import tensorflow

        tf = tensorflow
    gpus = list(tf.config.list_physical_devices("GPU"))
    wanted = gpu_requested(settings, environ)
    if wanted and not gpus:
        raise GpuError(f"a GPU was asked for ({wanted}) and {_why_no_gpu(tf, environ)}")
    if len(gpus) > 1:
        log.warning(
            "TensorFlow sees %d GPUs and imgq uses the first: run one worker per GPU "
            "(imgq worker --gpu N)",
            len(gpus),
        )
    limit = settings.gpu_memory_limit_mb
    for gpu in gpus:
        try:
            if limit:
                # A logical device with a cap: this process never takes more, so
                # several workers can share a GPU (memory growth cannot be combined
                # with it, and TensorFlow never returns memory either way).
                config = tf.config.LogicalDeviceConfiguration(memory_limit=limit)
                tf.config.set_logical_device_configuration(gpu, [config])
            elif settings.memory_growth:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: the setting is fixed for this process
            log.warning("GPU memory settings could not be applied (devices already initialised)")
    capabilities = [_capability(tf, gpu) for gpu in gpus]
    known = [c for c in capabilities if c is not None]
    return Devices(
        names=tuple(gpu.name for gpu in gpus),
        labels=physical_labels(len(gpus), environ),
        compute_capability=min(known) if known else None,
    )


def _capability(tf: Any, gpu: Any) -> tuple[int, int] | None:
    try:
        details = tf.config.experimental.get_device_details(gpu)
    except (ValueError, RuntimeError, AttributeError):
        return None
    capability = details.get("compute_capability")
    if not capability:
        return None
    major, minor = capability
    return int(major), int(minor)


def host_gpu_count(dev: Path = Path("/dev")) -> int:
    """The NVIDIA GPUs of this host (or container): its /dev/nvidiaN devices; at least 1."""
    return max(1, sum(1 for p in dev.glob("nvidia*") if p.name[6:].isdigit()))


def decode_threads(settings: Settings, devices: Devices, *, host_gpus: int | None = None) -> int:
    """Decode threads for this worker: IMGQ_DECODE_THREADS when set; on a GPU, the
    cores this process may use divided by the host's GPUs (one worker per GPU), as
    a GPU consumes images many times faster than one core decodes them; else the
    default."""
    if "decode_threads" in settings.model_fields_set or not devices.names:
        return settings.decode_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // (host_gpus or host_gpu_count())
    return max(settings.decode_threads, share)


def exact_fp32(tf: Any = None) -> None:
    """Turn TF32 off: on Ampere and later GPUs TensorFlow runs float32 matrix products
    and convolutions in TF32 (10-bit mantissa) by default, so "fp32" would not be the
    exact reference it is meant to be. Process-wide."""
    if tf is None:
        import tensorflow

        tf = tensorflow
    tf.config.experimental.enable_tensor_float_32_execution(False)


def describe(devices: Devices) -> Sequence[str]:
    """Each GPU for the start log: TensorFlow's name, the host's name."""
    return [
        f"{name.split('physical_device:')[-1]} (host GPU {label})"
        for name, label in zip(devices.names, devices.labels, strict=True)
    ]

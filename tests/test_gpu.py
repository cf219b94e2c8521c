"""A worker's GPU setup, on a CPU host: the refusal when a GPU asked for is missing,
the memory cap and memory growth as TensorFlow's device configuration receives them,
TF32 off for fp32, the host's names of the GPUs, the decode threads per GPU, and the
precisions that would silently not apply."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.devices import check_gpu_id
from shared.modes import Precision, RuntimeKind
from shared.settings import Settings
from workers import gpu
from workers.hardware import Hardware, PrecisionError, resolve_precision


class RecordingConfig:
    """TensorFlow's ``tf.config`` for two GPUs, recording the calls made on it (no GPU
    here to configure for real). The configuration objects are TensorFlow's own."""

    def __init__(self, capability: tuple[int, int] = (9, 0)) -> None:
        import tensorflow as tf

        self.LogicalDeviceConfiguration = tf.config.LogicalDeviceConfiguration
        self.devices = [
            tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU")
            for i in range(2)
        ]
        self.calls: list[tuple[str, Any, Any]] = []
        self.capability = capability
        self.experimental = SimpleNamespace(
            set_memory_growth=lambda d, on: self.calls.append(("memory_growth", d, on)),
            get_device_details=lambda d: {"compute_capability": self.capability},
            enable_tensor_float_32_execution=lambda on: self.calls.append(("tf32", None, on)),
        )

    def list_physical_devices(self, kind: str) -> list[Any]:
        return list(self.devices) if kind == "GPU" else []

    def set_logical_device_configuration(self, device: Any, configs: list[Any]) -> None:
        self.calls.append(("logical", device, configs))


def fake_tf(config: RecordingConfig, cuda: bool = True) -> Any:
    return SimpleNamespace(config=config, test=SimpleNamespace(is_built_with_cuda=lambda: cuda))


def test_the_memory_limit_reaches_tensorflows_device_configuration() -> None:
    config = RecordingConfig()
    devices = gpu.configure(Settings(gpu_memory_limit_mb=6144), environ={}, tf=fake_tf(config))
    assert [c[0] for c in config.calls] == ["logical", "logical"]  # no memory growth with it
    for (_, device, configs), want in zip(config.calls, config.devices, strict=True):
        assert device is want
        assert len(configs) == 1 and configs[0].memory_limit == 6144
    assert devices.names == ("/physical_device:GPU:0", "/physical_device:GPU:1")
    assert devices.compute_capability == (9, 0)


def test_without_a_limit_memory_grows_and_can_be_turned_off() -> None:
    config = RecordingConfig()
    gpu.configure(Settings(), environ={}, tf=fake_tf(config))
    assert [(c[0], c[2]) for c in config.calls] == [("memory_growth", True)] * 2
    config = RecordingConfig()
    gpu.configure(Settings(memory_growth=False), environ={}, tf=fake_tf(config))
    assert config.calls == []


def test_exact_fp32_turns_tf32_off() -> None:
    config = RecordingConfig()
    gpu.exact_fp32(fake_tf(config))
    assert config.calls == [("tf32", None, False)]


def test_a_gpu_asked_for_and_not_seen_is_one_line() -> None:
    # This host's real TensorFlow: it lists no GPU.
    with pytest.raises(gpu.GpuError) as err:
        gpu.configure(Settings(require_gpu=True), environ={"CUDA_VISIBLE_DEVICES": "0"})
    message = str(err.value)
    assert message.startswith("a GPU was asked for (IMGQ_REQUIRE_GPU=true) and ")
    assert "\n" not in message
    # tensorflow-cpu says what to install instead.
    config = RecordingConfig()
    config.devices = []
    with pytest.raises(gpu.GpuError, match=r"NVIDIA_VISIBLE_DEVICES=GPU-1.*built without CUDA"):
        gpu.configure(
            Settings(), environ={"NVIDIA_VISIBLE_DEVICES": "GPU-1"}, tf=fake_tf(config, cuda=False)
        )
    # Nothing asked for one: a CPU worker, as before.
    assert gpu.configure(Settings(), environ={}).names == ()


@pytest.mark.parametrize(
    ("require", "environ", "asked"),
    [
        (None, {}, None),
        (True, {}, "IMGQ_REQUIRE_GPU=true"),
        (None, {"NVIDIA_VISIBLE_DEVICES": "all"}, "NVIDIA_VISIBLE_DEVICES=all"),
        (None, {"NVIDIA_VISIBLE_DEVICES": "2"}, "NVIDIA_VISIBLE_DEVICES=2"),
        (None, {"NVIDIA_VISIBLE_DEVICES": "void"}, None),
        (None, {"NVIDIA_VISIBLE_DEVICES": ""}, None),
        (False, {"NVIDIA_VISIBLE_DEVICES": "all"}, None),  # an explicit no wins
        (None, {"CUDA_VISIBLE_DEVICES": "0"}, None),
    ],
)
def test_what_asks_for_a_gpu(
    require: bool | None, environ: dict[str, str], asked: str | None
) -> None:
    assert gpu.gpu_requested(Settings(require_gpu=require), environ) == asked


def test_gpu_ids_are_one_index_or_one_uuid() -> None:
    for good in ("0", "7", "GPU-8c2f1a3e-1b2c-4d5e-9f00-0a1b2c3d4e5f", "MIG-GPU-8c2f/1/0"):
        assert check_gpu_id(good) == good
    for bad in ("0,1", "all", "", "-1", "gpu0", "0 1"):
        with pytest.raises(ValueError, match="is not one GPU"):
            check_gpu_id(bad)


@pytest.mark.parametrize(
    ("environ", "labels"),
    [
        ({}, ("0", "1")),
        ({"CUDA_VISIBLE_DEVICES": "2,0"}, ("2", "0")),
        ({"CUDA_VISIBLE_DEVICES": "3,1"}, ("3", "1")),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa"}, ("GPU-aa", "1")),
        ({"NVIDIA_VISIBLE_DEVICES": "5,6"}, ("5", "6")),  # a container given GPUs 5 and 6
        ({"NVIDIA_VISIBLE_DEVICES": "5,6", "CUDA_VISIBLE_DEVICES": "1,0"}, ("6", "5")),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-x,GPU-y"}, ("GPU-x", "GPU-y")),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, ("0", "1")),
    ],
)
def test_the_device_memory_gauge_names_the_hosts_gpu(
    environ: dict[str, str], labels: tuple[str, ...]
) -> None:
    assert gpu.physical_labels(2, environ) == labels


def test_decode_threads_are_the_cores_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu.os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    on_gpu = gpu.Devices(("/physical_device:GPU:0",), ("0",), (8, 0))
    assert gpu.decode_threads(Settings(), on_gpu, host_gpus=8) == 8
    assert gpu.decode_threads(Settings(), on_gpu, host_gpus=32) == 4  # never below the default
    assert gpu.decode_threads(Settings(decode_threads=3), on_gpu, host_gpus=1) == 3  # as set
    assert gpu.decode_threads(Settings(), gpu.Devices((), (), None), host_gpus=1) == 4  # a CPU


def test_host_gpu_count_reads_dev(tmp_path: Path) -> None:
    assert gpu.host_gpu_count(tmp_path) == 1
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert gpu.host_gpu_count(tmp_path) == 2


H100 = Hardware("Xeon", frozenset(), gpus=("GPU:0",), compute_capability=(9, 0))
P100 = Hardware("Xeon", frozenset(), gpus=("GPU:0",), compute_capability=(6, 0))


def test_fp16_that_would_silently_not_apply_is_refused() -> None:
    tf = RuntimeKind.TENSORFLOW
    assert resolve_precision(Precision.FP16, tf, H100, "m") is Precision.FP16
    # XLA bypasses the float16 rewrite: refused, for fp16 and for auto on a GPU.
    for asked in (Precision.FP16, Precision.AUTO):
        with pytest.raises(PrecisionError, match="IMGQ_JIT_COMPILE=true") as err:
            resolve_precision(asked, tf, H100, "m", jit_compile=True)
        assert "\n" not in str(err.value)
    assert resolve_precision(Precision.FP32, tf, H100, "m", jit_compile=True) is Precision.FP32
    # Below compute capability 7.0 the rewrite skips the GPU: auto is fp32, fp16 refused.
    assert resolve_precision(Precision.AUTO, tf, P100, "m") is Precision.FP32
    with pytest.raises(PrecisionError, match=r"compute capability 7\.0 or later.*has 6\.0"):
        resolve_precision(Precision.FP16, tf, P100, "m")
    assert "compute capability 9.0" in H100.describe()

"""What the worker's machine can run natively, and the precision each model gets on it.

CPU features come from ``/proc/cpuinfo`` (Linux); elsewhere no feature is assumed,
so bf16 is refused and ``auto`` means fp32 on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.modes import Precision, RuntimeKind

CPUINFO = Path("/proc/cpuinfo")
# Instructions that run bfloat16 matrix products in hardware (Sapphire Rapids and
# later, Cooper Lake, Zen 4+). Without them oneDNN and OpenVINO emulate bf16 in
# float32, slower than float32 itself.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Shown in the start-up line: what the fast paths use.
# TensorFlow's float16 rewrite skips GPUs below compute capability 7.0 (no tensor
# cores): there fp16 would silently run as fp32.
FP16_MIN_CAPABILITY = (7, 0)
REPORTED_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx512f")


class PrecisionError(ValueError):
    """A precision this device cannot run natively was asked for."""


@dataclass(frozen=True)
class Hardware:
    """The CPU model and its feature flags, and the GPUs TensorFlow sees."""

    cpu: str
    flags: frozenset[str]
    gpus: tuple[str, ...] = ()
    compute_capability: tuple[int, int] | None = None  # the lowest GPU's; None: unknown

    @property
    def fp16(self) -> bool:
        """True when TensorFlow's float16 rewrite applies on these GPUs (capability
        7.0 or later, or not reported)."""
        cc = self.compute_capability
        return bool(self.gpus) and (cc is None or cc >= FP16_MIN_CAPABILITY)

    @property
    def bf16(self) -> bool:
        """True when the CPU has bfloat16 matrix instructions."""
        return any(flag in self.flags for flag in BF16_FLAGS)

    def describe(self) -> str:
        """One line for the worker's log: CPU, its relevant flags, bf16 support, GPUs."""
        shown = [flag for flag in REPORTED_FLAGS if flag in self.flags]
        bf16 = "native bf16" if self.bf16 else "no bf16 instructions (bf16 refused)"
        gpus = ", ".join(self.gpus) if self.gpus else "no GPU"
        if self.gpus and self.compute_capability:
            gpus += " (compute capability {}.{})".format(*self.compute_capability)
        return f"CPU {self.cpu or 'unknown'} [{' '.join(shown) or 'no AVX-512'}]: {bf16}; {gpus}"


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The model name and the flags of the first processor in a /proc/cpuinfo text."""
    name = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return name, flags


def detect(
    gpus: Sequence[str] = (),
    cpuinfo: Path = CPUINFO,
    compute_capability: tuple[int, int] | None = None,
) -> Hardware:
    """This machine's CPU features (from /proc/cpuinfo on Linux) and the given GPUs."""
    text = ""
    if sys.platform.startswith("linux"):
        try:
            text = cpuinfo.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    name, flags = parse_cpuinfo(text)
    return Hardware(cpu=name, flags=flags, gpus=tuple(gpus), compute_capability=compute_capability)


def resolve_precision(
    requested: Precision,
    runtime: RuntimeKind,
    hardware: Hardware,
    model: str,
    *,
    jit_compile: bool = False,
) -> Precision:
    """The precision a model runs in on this hardware; PrecisionError (one line) when the
    requested one would be emulated, cannot run here, or would silently not apply.

    TensorFlow runs a model on the GPU when there is one; OpenVINO always on the CPU.
    fp16 is TensorFlow's graph rewrite, which XLA-compiled functions bypass
    (``IMGQ_JIT_COMPILE``) and which skips GPUs below compute capability 7.0: both
    are refused rather than run as fp32 under fp16's name.
    """
    if runtime is RuntimeKind.NUMPY:
        if requested in (Precision.AUTO, Precision.FP32):
            return Precision.FP32
        raise PrecisionError(
            f"model {model!r}: the numpy runtime runs in fp32 only, not {requested.value}; "
            "use precision fp32 or auto"
        )
    on_gpu = runtime is RuntimeKind.TENSORFLOW and bool(hardware.gpus)
    if requested is Precision.AUTO:
        if on_gpu:
            resolved = Precision.FP16 if hardware.fp16 else Precision.FP32
            if resolved is Precision.FP16 and jit_compile:
                raise PrecisionError(_jit_fp16(model, "auto (fp16 on this GPU)"))
            return resolved
        return Precision.BF16 if hardware.bf16 else Precision.FP32
    if requested is Precision.BF16:
        if on_gpu:
            raise PrecisionError(
                f"model {model!r}: precision bf16 is a CPU mode and this worker runs TensorFlow "
                "on a GPU; use fp16 (or auto) on GPUs"
            )
        if not hardware.bf16:
            raise PrecisionError(
                f"model {model!r}: precision bf16 needs a CPU with AMX-BF16 or AVX512-BF16, and "
                f"this one ({hardware.cpu or 'unknown'}) has neither, so bf16 would be emulated, "
                "slower than fp32; use precision fp32 or auto"
            )
    if requested is Precision.FP16 and not on_gpu:
        where = "OpenVINO runs on the CPU" if hardware.gpus else "this worker has no GPU"
        instead = "bf16 or auto" if hardware.bf16 else "fp32 or auto"
        raise PrecisionError(
            f"model {model!r}: precision fp16 is for GPUs and {where}; use {instead} on this CPU"
        )
    if requested is Precision.FP16:
        if not hardware.fp16:
            raise PrecisionError(
                f"model {model!r}: precision fp16 needs a GPU of compute capability 7.0 or "
                "later (TensorFlow's float16 rewrite skips older ones, so it would run fp32); "
                "this one has {}.{}; use fp32 or auto".format(*(hardware.compute_capability or ()))
            )
        if jit_compile:
            raise PrecisionError(_jit_fp16(model, "fp16"))
    return requested


def _jit_fp16(model: str, what: str) -> str:
    return (
        f"model {model!r}: precision {what} with IMGQ_JIT_COMPILE=true: XLA-compiled "
        "functions bypass TensorFlow's float16 graph rewrite, so the model would run fp32; "
        "unset IMGQ_JIT_COMPILE, or use precision fp32"
    )

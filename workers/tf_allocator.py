"""TensorFlow's CPU memory allocator in a worker: BFC (keep and reuse), not malloc.

TensorFlow's default CPU allocator asks malloc for each tensor and gives it back when
the tensor dies. A batch's activations are large (ResNet-50 at batch 32: 100 MB for
its first convolution's output alone), and glibc serves blocks that large with
``mmap`` and returns them with ``munmap``, so every model call maps its working
memory afresh and the kernel zero-fills it page by page: on 2 cores, about 215,000
minor page faults (0.9 GB) and an eighth of the call's CPU time in the kernel for
each 32-image ResNet-50 batch. TensorFlow's BFC allocator, the one it uses for GPU
memory, keeps what it has taken and hands it out again: after the first batch no
faults, and about a quarter less time per batch (x1.30 the speed, per round x1.12 to
x1.39, on 2 cores: ``benchmarks/allocator.py``). What it
costs: the worker's resident memory stays at its peak between batches instead of
falling back (the peak itself does not grow).

TensorFlow reads the choice once, from the environment, when it first allocates on
the CPU, so it is made before TensorFlow loads (``workers.app``). A value already in
the environment wins: ``TF_CPU_ALLOCATOR_USE_BFC=false`` keeps malloc, and
``TF_CPU_BFC_MEM_LIMIT_IN_MB`` (TensorFlow's, 65536 by default) caps the pool.
GPU memory has its own allocator and is not affected. Where TensorFlow turns oneDNN's
operations on (by default on CPUs with AVX-512 VNNI, BF16 or AMX; its log says "oneDNN
custom operations are on"), its CPU allocator is oneDNN's, which already keeps and
reuses large blocks: there the variable changes nothing (``TF_ENABLE_ONEDNN_OPTS=0``
turns oneDNN off, and the choice made here applies again).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

USE_BFC = "TF_CPU_ALLOCATOR_USE_BFC"

# What TensorFlow takes for true (ReadBoolFromEnvVar, any case); "0" and "false" are
# false, and anything else is refused with an error in its log and taken as false.
_TRUE = {"1", "true"}


def prefer_bfc(environ: MutableMapping[str, str] | None = None) -> bool:
    """Have TensorFlow's CPU allocator be BFC unless ``environ`` (the process's by
    default) already says; whether it will be. Call before TensorFlow allocates."""
    env = os.environ if environ is None else environ
    env.setdefault(USE_BFC, "true")
    return env[USE_BFC].lower() in _TRUE

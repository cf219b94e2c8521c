"""How one GPU is named, for ``imgq worker --gpu`` and the worker's device setup: an
index, or a UUID as ``nvidia-smi -L`` prints it (GPU-..., MIG-...)."""

from __future__ import annotations

import re

GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/-]+)$")


def check_gpu_id(value: str) -> str:
    """``value`` when it names one GPU (an index or a UUID); ValueError otherwise."""
    value = value.strip()
    if not GPU_ID.match(value):
        raise ValueError(
            f"{value!r} is not one GPU: give one index (0) or one UUID (GPU-..., from "
            "nvidia-smi -L); run one worker process per GPU"
        )
    return value

"""How a model is run: numeric precision, inference runtime, and how JPEGs are decoded.

Plain enums, shared by the registry (per model) and the settings (per worker).
"""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    """The numeric precision of a model call."""

    FP32 = "fp32"  # the SavedModel as it is: the reference
    BF16 = "bf16"  # bfloat16 on CPUs with AMX-BF16 or AVX512-BF16
    FP16 = "fp16"  # float16 on GPUs (TensorFlow's mixed-precision rewrite)
    AUTO = "auto"  # the fastest of the above that the device runs natively


class RuntimeKind(StrEnum):
    """What executes the model."""

    TENSORFLOW = "tensorflow"
    OPENVINO = "openvino"  # converted at load, CPU only; the `openvino` extra
    NUMPY = "numpy"  # a linear model file (.npz) in NumPy: no TensorFlow loaded


class DecodeMode(StrEnum):
    """How JPEGs are decoded and resized to the model's input."""

    FAST = "fast"  # DCT-domain downscaling while decoding, then a bilinear resize
    EXACT = "exact"  # a full decode, then a bilinear resize of the whole image

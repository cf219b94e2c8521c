"""The interface every runtime implements, and what they share: load errors, the
uint8 input every runtime takes, and a NumPy top-k with the model's activation.

Images travel from the decoders to the runtime as uint8 RGB, ``(n, height, width,
3)``: a quarter of float32's bytes to stack, pad, queue and copy to a device. Each
runtime casts them to float32 and scales them to [0, 1] inside its own graph
(``to_unit``'s arithmetic), which is what TF Hub's image models expect.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from shared.modes import Precision
from shared.registry import Activation


class ModelLoadError(RuntimeError):
    """A model could not be loaded or does not fit its registry record."""


class ConversionError(RuntimeError):
    """A runtime could not convert the model (the worker falls back to TensorFlow)."""


INPUT_DTYPE = np.uint8
# 0..255 to [0, 1]: a division by 255 in float32, the same in every runtime.
SCALE = 255.0


class Backend(Protocol):
    """A loaded model: a uint8 batch in, top-k indices, scores and the output width out.

    ``stage`` and ``__call__`` are two steps so that a caller can stage the next
    batch (on a GPU: copy it to the device) while the current one runs.
    """

    name: str  # "tensorflow" or "openvino"
    precision: Precision  # the precision it actually runs in (never AUTO)
    from_cache: bool  # loaded from a conversion cache instead of converted now

    def stage(self, batch: np.ndarray) -> object:
        """The uint8 batch ``(n, height, width, 3)`` made ready for ``__call__``, where
        the model runs (a device tensor on a GPU); any thread may call it."""
        ...

    def __call__(self, batch: object) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k indices (n, k), activated scores (n, k), best first, and the class count
        of a staged batch (or a uint8 array, staged on the way).

        For an embedding model (``spec.is_embedding``): the pooled vectors (n, D)
        float32, an empty (n, 0) array, and D.
        """
        ...


def check_uint8(batch: np.ndarray) -> np.ndarray:
    """The batch as given when it is uint8; TypeError otherwise (a float batch would be
    scaled a second time and classify garbage without any error)."""
    if batch.dtype != INPUT_DTYPE:
        raise TypeError(f"a model takes uint8 images (0..255), not {batch.dtype}")
    return batch


def to_unit(batch: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1], as the runtimes compute it in their graphs."""
    return batch.astype(np.float32) / np.float32(SCALE)


def pooled(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """An embedding model's outputs as a backend returns them: (n, D) float32 vectors
    (a pooled ``(n, 1, 1, D)`` output flattened), an empty (n, 0), and D."""
    vectors = np.asarray(outputs, dtype=np.float32).reshape(outputs.shape[0], -1)
    return vectors, np.zeros((vectors.shape[0], 0), np.float32), int(vectors.shape[1])


def top_k(logits: np.ndarray, k: int, activation: Activation) -> tuple[np.ndarray, np.ndarray, int]:
    """The k best classes of each row, best first (ties: lower index first, as
    ``tf.math.top_k``), and their activated scores."""
    logits = np.asarray(logits, dtype=np.float32)
    width = logits.shape[-1]
    k = min(k, width)
    part = np.argpartition(-logits, k - 1, axis=-1)[:, :k] if k < width else None
    candidates = part if part is not None else np.tile(np.arange(width), (logits.shape[0], 1))
    values = np.take_along_axis(logits, candidates, axis=-1)
    order = np.lexsort((candidates, -values), axis=-1)
    indices = np.take_along_axis(candidates, order, axis=-1)
    top = np.take_along_axis(values, order, axis=-1).astype(np.float64)
    # Rank on the raw outputs, then activate only the top k (as the TensorFlow path).
    if activation is Activation.SOFTMAX:
        wide = logits.astype(np.float64)
        peak = wide.max(axis=-1, keepdims=True)
        lse = peak + np.log(np.exp(wide - peak).sum(axis=-1, keepdims=True))
        scores = np.exp(top - lse)
    elif activation is Activation.SIGMOID:
        scores = 1.0 / (1.0 + np.exp(-top))
    else:
        scores = top
    return indices.astype(np.int64), scores.astype(np.float32), int(width)

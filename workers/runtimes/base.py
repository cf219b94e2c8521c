"""The interface every runtime implements, and what they share: load errors and a
NumPy top-k with the model's activation."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from shared.modes import Precision
from shared.registry import Activation


class ModelLoadError(RuntimeError):
    """A model could not be loaded or does not fit its registry record."""


class ConversionError(RuntimeError):
    """A runtime could not convert the model (the worker falls back to TensorFlow)."""


class Backend(Protocol):
    """A loaded model: a batch of images in, top-k indices, scores and the output width out."""

    name: str  # "tensorflow" or "openvino"
    precision: Precision  # the precision it actually runs in (never AUTO)
    from_cache: bool  # loaded from a conversion cache instead of converted now

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k indices (n, k), activated scores (n, k), best first, and the class count."""
        ...


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

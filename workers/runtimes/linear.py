"""The NumPy runtime: a linear model over a pooled colour grid of the image, saved as
an ``.npz`` file and run in NumPy, with no TensorFlow loaded.

It is not a pretrained network: it is for running the queue itself without one (a
deployment smoke test, a load test of brokers and stores, a worker that starts in
about a second) and for the project's own tests of the queue's machinery. A worker
whose models all run here never imports TensorFlow.

The model (``save_linear`` writes it): the image scaled to [0, 1], averaged over a
``grid x grid`` raster of equal blocks (TensorFlow's ``area`` resize for a size that
the grid divides), flattened channel-last, centred on 0.5, then ``@ weights + bias``.
Its outputs are logits (or, for an embedding model, the vector); the model's
activation is applied to the top k as for any other runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.modes import Precision, RuntimeKind
from shared.registry import ModelSpec
from workers.runtimes.base import ModelLoadError, check_uint8, pooled, to_unit, top_k

SUFFIX = ".npz"


def save_linear(path: Path, weights: np.ndarray, bias: np.ndarray, *, grid: int) -> Path:
    """Write a linear model: ``weights`` ``(grid * grid * 3, outputs)``, ``bias``
    ``(outputs,)``. The file the ``numpy`` runtime loads (``handle`` in the models file)."""
    weights = np.asarray(weights, np.float32)
    bias = np.asarray(bias, np.float32)
    if weights.ndim != 2 or weights.shape[0] != grid * grid * 3:
        raise ValueError(f"weights must be ({grid * grid * 3}, outputs), not {weights.shape}")
    if bias.shape != (weights.shape[1],):
        raise ValueError(f"bias must be ({weights.shape[1]},), not {bias.shape}")
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"a linear model's file ends in {SUFFIX}: {path}")
    with path.open("wb") as handle:
        np.savez(handle, weights=weights, bias=bias, grid=np.int64(grid))
    return path


class LinearBackend:
    """A linear model of ``save_linear`` for one model spec, in float32 NumPy."""

    name = RuntimeKind.NUMPY.value
    precision = Precision.FP32
    from_cache = False

    def __init__(self, spec: ModelSpec, *, top_k: int) -> None:
        self.spec = spec
        self.top_k = top_k
        self.weights = np.zeros((0, 0), np.float32)
        self.bias = np.zeros(0, np.float32)
        self.grid = 0

    def load(self) -> LinearBackend:
        """Read and check the ``.npz`` file named by the handle; ModelLoadError if unfit."""
        handle = self.spec.handle
        if "://" in handle or not handle.endswith(SUFFIX):
            raise ModelLoadError(
                f"the numpy runtime loads a linear model file ({SUFFIX}, written by "
                f"workers.runtimes.linear.save_linear), not {handle!r}"
            )
        try:
            with np.load(handle, allow_pickle=False) as data:
                weights = np.asarray(data["weights"], np.float32)
                bias = np.asarray(data["bias"], np.float32)
                grid = int(data["grid"])
        except FileNotFoundError:
            raise ModelLoadError(f"no linear model file at {handle}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{handle} is not a linear model file: {exc}") from None
        height, width = self.spec.input_size
        if grid < 1 or height % grid or width % grid:
            raise ModelLoadError(
                f"its grid ({grid}) must divide the input size {height}x{width}; "
                "fix input_size in IMGQ_MODELS_FILE"
            )
        if weights.ndim != 2 or weights.shape[0] != grid * grid * 3:
            raise ModelLoadError(f"its weights are {weights.shape}, not ({grid * grid * 3}, N)")
        if bias.shape != (weights.shape[1],):
            raise ModelLoadError(f"its bias is {bias.shape}, not ({weights.shape[1]},)")
        self.weights, self.bias, self.grid = weights, bias, grid
        return self

    def stage(self, batch: np.ndarray) -> object:
        """The uint8 batch itself: nothing to copy anywhere."""
        return check_uint8(batch)

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw outputs (n, N) of a uint8 batch."""
        images = to_unit(check_uint8(batch))
        n, height, width, _ = images.shape
        g = self.grid
        blocks = images.reshape(n, g, height // g, g, width // g, 3)
        features = blocks.mean(axis=(2, 4), dtype=np.float32).reshape(n, g * g * 3) - 0.5
        return features @ self.weights + self.bias

    def __call__(self, batch: object) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k indices, activated scores and the class count (an embedding model: the
        vectors, an empty (n, 0) and their width)."""
        assert isinstance(batch, np.ndarray)
        outputs = self.outputs(batch)
        if self.spec.is_embedding:
            return pooled(outputs)
        return top_k(outputs, self.top_k, self.spec.activation)

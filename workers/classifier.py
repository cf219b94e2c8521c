"""A model's lifecycle apart from Celery: load once, warm up, then ``predict`` batches.

Loads any TF2 SavedModel that follows TF Hub's image-classification convention:
float32 ``[batch, height, width, 3]`` RGB in [0, 1] in, ``[batch, classes]`` out,
and runs it with a runtime of ``workers.runtimes`` (TensorFlow or OpenVINO) in the
precision asked for.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.labels import load_labels
from shared.modes import Precision, RuntimeKind
from shared.registry import ModelSpec
from workers.runtimes.base import Backend, ConversionError, ModelLoadError
from workers.runtimes.tensorflow import TensorFlowBackend

log = logging.getLogger(__name__)

TOP_K = 5


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The fixed batch sizes a model is called with: powers of two, from 12 on also
    the points halfway between them (12, 24, 48, ...), up to the maximum, and it.

    A batch is padded up to the next bucket, so the graph is traced at most once
    per bucket instead of once per distinct batch size, and a partial batch (a
    job's first or last) wastes at most a third of its compute on padding.
    """
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        if size >= 8 and size * 3 // 2 < max_batch_size:
            sizes.add(size * 3 // 2)
        size *= 2
    return tuple(sorted(sizes))


def configure_devices(*, memory_growth: bool) -> list[str]:
    """GPU memory growth (before any model loads); the GPUs TensorFlow sees."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        if memory_growth:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised: the setting is fixed for this process
                log.warning("GPU memory growth could not be set (devices already initialised)")
    return [gpu.name for gpu in gpus]


def _load_message(spec: ModelSpec, reason: str) -> str:
    cache = os.environ.get("TFHUB_CACHE_DIR", "(unset)")
    return (
        f"model {spec.name!r} could not be loaded from handle {spec.handle!r}: {reason}\n"
        f"  What to do: with network access, TF Hub downloads the model once into "
        f"TFHUB_CACHE_DIR (now {cache}); keep that directory on a volume so workers reuse it. "
        f"Without network access, download the SavedModel elsewhere and point the model at "
        f"the local directory in IMGQ_MODELS_FILE:\n"
        f'    [models.{spec.name}]\n    handle = "/path/to/saved_model_dir"'
    )


@dataclass
class Predictions:
    """Top-k indices and activated scores for a batch of images."""

    indices: np.ndarray  # (n, k) int
    scores: np.ndarray  # (n, k) float


DEFAULT_CACHE_DIR = Path("~/.cache/imgq/openvino")


class Classifier:
    """One loaded model: ``predict`` takes up to ``max_batch_size`` images, returns top-k."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        max_batch_size: int,
        top_k: int = TOP_K,
        jit_compile: bool = False,
        precision: Precision = Precision.FP32,
        runtime: RuntimeKind = RuntimeKind.TENSORFLOW,
        cache_dir: Path = DEFAULT_CACHE_DIR,
    ) -> None:
        self.spec = spec
        self.jit_compile = jit_compile
        self.max_batch_size = max_batch_size
        self.top_k = top_k
        self.precision = precision
        self.runtime = runtime  # the one asked for; backend.name is the one running
        self.cache_dir = cache_dir
        self.labels: tuple[str, ...] = ()
        self.num_classes = 0
        self.buckets = batch_buckets(max_batch_size)
        self.backend: Backend | None = None

    # -- lifecycle ----------------------------------------------------------------
    def load(self) -> Classifier:
        """Load the model in its runtime, the labels, and check the output width; idempotent."""
        try:
            self.labels = load_labels(self.spec.labels, base_dir=self.spec.labels_base_dir)
        except ValueError as exc:
            raise ModelLoadError(f"model {self.spec.name!r}: {exc}") from exc
        try:
            self.backend = self._load_backend()
        except ModelLoadError as exc:
            raise ModelLoadError(_load_message(self.spec, str(exc))) from exc
        except Exception as exc:
            raise ModelLoadError(_load_message(self.spec, f"{type(exc).__name__}: {exc}")) from exc
        self._height, self._width = self.spec.input_size
        self._check_output()
        return self

    def _load_backend(self) -> Backend:
        if self.runtime is RuntimeKind.OPENVINO:
            from workers.runtimes.openvino import OpenVINOBackend, import_openvino

            import_openvino()  # a missing package is a load error, not a fallback
            try:
                return OpenVINOBackend(
                    self.spec,
                    top_k=self.top_k,
                    precision=self.precision,
                    max_batch_size=self.max_batch_size,
                    cache_dir=self.cache_dir,
                ).load()
            except ConversionError as exc:
                # Not every op has an OpenVINO conversion: the model still runs, in
                # TensorFlow, with the same precision.
                log.warning(
                    "model %s: OpenVINO cannot convert it (%s); running it in TensorFlow",
                    self.spec.name,
                    exc,
                )
        return TensorFlowBackend(
            self.spec, top_k=self.top_k, precision=self.precision, jit_compile=self.jit_compile
        ).load()

    def _check_output(self) -> None:
        """Run the largest bucket once (tracing it) and compare the output width with the labels."""
        assert self.backend is not None
        zeros = np.zeros((self.max_batch_size, self._height, self._width, 3), np.float32)
        if isinstance(self.backend, TensorFlowBackend):
            self.backend.check_xla(zeros)
            self.jit_compile = self.backend.jit_compile
        try:
            _, _, width = self.backend(zeros)
        except Exception as exc:
            raise ModelLoadError(
                _load_message(self.spec, f"a test call on a zero batch failed: {exc}")
            ) from exc
        self.num_classes = int(width)
        if self.num_classes != len(self.labels):
            raise ModelLoadError(
                f"model {self.spec.name!r} (handle {self.spec.handle!r}) outputs "
                f"{self.num_classes} classes but its label set {self.spec.labels!r} has "
                f"{len(self.labels)} labels; fix 'labels' (or the handle) in IMGQ_MODELS_FILE"
            )

    def warm_up(self) -> float:
        """Trace and run every fixed batch size once (the largest was at load); the seconds.

        Without it, the first partial batch of each size pays for tracing the graph
        (from milliseconds for a small model to seconds for a large one).
        """
        assert self.backend is not None, "load() the classifier first"
        start = time.perf_counter()
        for bucket in self.buckets:
            zeros = np.zeros((bucket, self._height, self._width, 3), np.float32)
            # Twice: the first call after tracing still sets up the kernels.
            for _ in range(2):
                self.backend(zeros)
        return time.perf_counter() - start

    # -- inference ------------------------------------------------------------------
    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> Predictions:
        """Top-k of up to ``max_batch_size`` images (each ``height x width x 3`` in [0, 1])."""
        batch = np.asarray(images, dtype=np.float32)
        n = batch.shape[0]
        if n == 0:
            return Predictions(np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k)))
        if n > self.max_batch_size:
            raise ValueError(f"{n} images exceed the batch size {self.max_batch_size}")
        bucket = next(b for b in self.buckets if b >= n)
        if bucket > n:  # pad to a fixed shape so the graph is not traced again
            pad = np.zeros((bucket - n, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, pad])
        assert self.backend is not None, "load() the classifier first"
        indices, scores, _ = self.backend(batch)
        return Predictions(indices[:n], scores[:n])

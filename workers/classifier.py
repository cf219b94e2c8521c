"""A model's lifecycle apart from Celery: load once, warm up, then ``predict`` batches.

Loads any TF2 SavedModel that follows TF Hub's image-classification convention:
float32 ``[batch, height, width, 3]`` RGB in [0, 1] in, ``[batch, classes]`` out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.labels import load_labels
from shared.registry import Activation, ModelSpec

log = logging.getLogger(__name__)

TOP_K = 5


class ModelLoadError(RuntimeError):
    """A model could not be loaded or does not fit its registry record."""


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


def configure_devices(*, memory_growth: bool, mixed_precision: bool = False) -> list[str]:
    """GPU memory growth and optional mixed precision (before any model loads); the GPUs."""
    import tensorflow as tf

    if mixed_precision:
        # Grappler's rewrite runs float32 graphs (any SavedModel) in float16 where
        # it is safe, on GPUs with Tensor Cores; on a CPU it changes nothing.
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision": True})
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


def _resolve_callable(obj: Any) -> Callable[[Any], Any]:
    """The inference function: the SavedModel's ``__call__``, else its serving signature."""
    if callable(obj):
        return obj
    signatures = getattr(obj, "signatures", {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    raise ModelLoadError("the SavedModel is not callable and has no 'serving_default' signature")


@dataclass
class Predictions:
    """Top-k indices and activated scores for a batch of images."""

    indices: np.ndarray  # (n, k) int
    scores: np.ndarray  # (n, k) float


class Classifier:
    """One loaded model: ``predict`` takes up to ``max_batch_size`` images, returns top-k."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        max_batch_size: int,
        top_k: int = TOP_K,
        jit_compile: bool = False,
    ) -> None:
        self.spec = spec
        self.jit_compile = jit_compile
        self.max_batch_size = max_batch_size
        self.top_k = top_k
        self.labels: tuple[str, ...] = ()
        self.num_classes = 0
        self.buckets = batch_buckets(max_batch_size)
        self._fn: Any = None
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------
    def load(self) -> Classifier:
        """Load the SavedModel, the labels, and check the output width; idempotent."""
        import tensorflow as tf

        try:
            self.labels = load_labels(self.spec.labels, base_dir=self.spec.labels_base_dir)
        except ValueError as exc:
            raise ModelLoadError(f"model {self.spec.name!r}: {exc}") from exc
        try:
            obj = self._load_savedmodel()
            call = _resolve_callable(obj)
        except ModelLoadError as exc:
            raise ModelLoadError(_load_message(self.spec, str(exc))) from exc
        except Exception as exc:
            raise ModelLoadError(_load_message(self.spec, f"{type(exc).__name__}: {exc}")) from exc
        self._obj = obj  # keep the SavedModel's variables alive
        height, width = self.spec.input_size
        activation = self.spec.activation
        top_k = self.top_k

        def infer(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            out = call(images)
            if isinstance(out, dict):
                if len(out) != 1:
                    raise ModelLoadError(f"the model returns several outputs: {sorted(out)}")
                out = next(iter(out.values()))
            logits = tf.cast(out, tf.float32)
            width = tf.shape(logits)[-1]
            # Rank on the raw outputs, then activate only the top k: both
            # activations are monotonic, and this keeps classes apart that a
            # float32 sigmoid would round to the same 1.0.
            top = tf.math.top_k(logits, k=tf.minimum(top_k, width), sorted=True)
            if activation is Activation.SOFTMAX:
                lse = tf.math.reduce_logsumexp(logits, axis=-1, keepdims=True)
                scores = tf.exp(top.values - lse)
            elif activation is Activation.SIGMOID:
                scores = tf.math.sigmoid(top.values)
            else:
                scores = top.values
            return top.indices, scores, width

        self._fn = infer
        self._height, self._width = height, width
        self._check_output()
        return self

    def _load_savedmodel(self) -> Any:
        import tensorflow as tf

        handle = self.spec.handle
        if "://" not in handle:
            if not os.path.isdir(handle):
                raise ModelLoadError(f"no SavedModel directory at {handle}")
            return tf.saved_model.load(handle)
        import tensorflow_hub as hub

        # hub.load resolves TF Hub and Kaggle URLs through TFHUB_CACHE_DIR.
        return hub.load(handle)

    def _compiled_for(self, batch: int) -> Any:
        fn = self._compiled.get(batch)
        if fn is None:
            import tensorflow as tf

            with self._lock:
                fn = self._compiled.get(batch)
                if fn is None:
                    spec = tf.TensorSpec([batch, self._height, self._width, 3], tf.float32)
                    fn = tf.function(
                        self._fn, input_signature=[spec], jit_compile=self.jit_compile or None
                    )
                    self._compiled[batch] = fn
        return fn

    def _check_output(self) -> None:
        """Run the largest bucket once (tracing it) and compare the output width with the labels."""
        zeros = np.zeros((self.max_batch_size, self._height, self._width, 3), np.float32)
        if self.jit_compile:
            try:
                self._compiled_for(self.max_batch_size)(zeros)
            except Exception as exc:
                # XLA compiles only some graphs (not every op has an XLA kernel):
                # an opt-in speed-up, so the model runs without it rather than not at all.
                log.warning(
                    "model %s: XLA cannot compile this SavedModel (%s); running it without XLA",
                    self.spec.name,
                    str(exc).splitlines()[0][:300],
                )
                self.jit_compile = False
                self._compiled.clear()
        try:
            _, _, width = self._compiled_for(self.max_batch_size)(zeros)
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
        start = time.perf_counter()
        for bucket in self.buckets:
            zeros = np.zeros((bucket, self._height, self._width, 3), np.float32)
            # Twice: the first call after tracing still sets up the kernels.
            for _ in range(2):
                self._compiled_for(bucket)(zeros)
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
        indices, scores, _ = self._compiled_for(bucket)(batch)
        return Predictions(indices.numpy()[:n], scores.numpy()[:n])

"""A model's lifecycle apart from Celery: load once, warm up, then ``predict`` batches.

Loads any TF2 SavedModel that follows TF Hub's image conventions: float32
``[batch, height, width, 3]`` RGB in [0, 1] in, and ``[batch, classes]`` out for a
classifier, ``[batch, features]`` (the pooled pre-logit vector) for an embedding
model; runs it with a runtime of ``workers.runtimes`` (TensorFlow or OpenVINO) in
the precision asked for. Images come in as uint8 (0..255); the runtime casts and
scales them inside the model's graph.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.labels import load_labels
from shared.modes import Precision, RuntimeKind
from shared.registry import ModelSpec
from workers.runtimes.base import Backend, ConversionError, ModelLoadError
from workers.runtimes.tensorflow import DEFAULT_HUB_CACHE_DIR, TensorFlowBackend

log = logging.getLogger(__name__)

# What TensorFlow warns when a function is traced for several input shapes in a
# short time, which is what a warm-up does on purpose.
_RETRACING_WARNING = "triggered tf.function retracing"


class _DropRetracingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RETRACING_WARNING not in record.getMessage()


@contextlib.contextmanager
def _expected_retracing() -> Iterator[None]:
    """Drop TensorFlow's retracing warning while the block traces shapes on purpose."""
    tf_logger = logging.getLogger("tensorflow")
    dropper = _DropRetracingWarning()
    tf_logger.addFilter(dropper)
    try:
        yield
    finally:
        tf_logger.removeFilter(dropper)


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


def _load_message(spec: ModelSpec, reason: str, hub_cache_dir: Path) -> str:
    cache = hub_cache_dir
    return (
        f"model {spec.name!r} could not be loaded from handle {spec.handle!r}: {reason}\n"
        f"  What to do: with network access, TF Hub downloads the model once into "
        f"TFHUB_CACHE_DIR (now {cache}); keep that directory on a volume so workers reuse it. "
        f"Without network access, download the SavedModel elsewhere and point the model at "
        f"the local directory in IMGQ_MODELS_FILE:\n"
        f'    [models.{spec.name}]\n    handle = "/path/to/saved_model_dir"'
    )


@dataclass
class Staged:
    """A batch padded to its fixed size and staged by the runtime (on a GPU: on the
    device); ``n`` of its images are real."""

    batch: object
    n: int


@dataclass
class Predictions:
    """Top-k indices and activated scores for a batch of images; for an embedding
    model, empty (n, 0) top-k and the vectors."""

    indices: np.ndarray  # (n, k) int
    scores: np.ndarray  # (n, k) float
    vectors: np.ndarray | None = None  # (n, dim) float32, embedding models only


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
        hub_cache_dir: Path = DEFAULT_HUB_CACHE_DIR,
    ) -> None:
        self.spec = spec
        self.jit_compile = jit_compile
        self.max_batch_size = max_batch_size
        self.top_k = top_k
        self.precision = precision
        self.runtime = runtime  # the one asked for; backend.name is the one running
        self.cache_dir = cache_dir
        self.hub_cache_dir = hub_cache_dir  # where TF Hub and Kaggle handles are downloaded
        self.labels: tuple[str, ...] = ()
        self.num_classes = 0  # a classifier's output width
        self.dim = 0  # an embedding model's vector width
        self.buckets = batch_buckets(max_batch_size)
        self.backend: Backend | None = None

    # -- lifecycle ----------------------------------------------------------------
    def load(self) -> Classifier:
        """Load the model in its runtime, the labels (classifiers), and check the output
        width; idempotent."""
        if not self.spec.is_embedding:
            try:
                self.labels = load_labels(self.spec.labels, base_dir=self.spec.labels_base_dir)
            except ValueError as exc:
                raise ModelLoadError(f"model {self.spec.name!r}: {exc}") from exc
        try:
            self.backend = self._load_backend()
        except ModelLoadError as exc:
            if self.runtime is RuntimeKind.NUMPY:  # a local file: TF Hub's advice is no help
                raise ModelLoadError(
                    f"model {self.spec.name!r} (runtime numpy) could not be loaded: {exc}"
                ) from exc
            raise ModelLoadError(_load_message(self.spec, str(exc), self.hub_cache_dir)) from exc
        except Exception as exc:
            raise ModelLoadError(
                _load_message(self.spec, f"{type(exc).__name__}: {exc}", self.hub_cache_dir)
            ) from exc
        self._height, self._width = self.spec.input_size
        self._check_output()
        return self

    def _load_backend(self) -> Backend:
        if self.runtime is RuntimeKind.NUMPY:
            from workers.runtimes.linear import LinearBackend

            return LinearBackend(self.spec, top_k=self.top_k).load()
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
                    hub_cache_dir=self.hub_cache_dir,
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
            self.spec,
            top_k=self.top_k,
            precision=self.precision,
            jit_compile=self.jit_compile,
            hub_cache_dir=self.hub_cache_dir,
        ).load()

    def _check_output(self) -> None:
        """Run the largest bucket once (tracing it) and compare the output width with the
        labels (an embedding model: record its vector width)."""
        assert self.backend is not None
        zeros = self._zeros(self.max_batch_size)
        if isinstance(self.backend, TensorFlowBackend):
            self.backend.check_xla(zeros)
            self.jit_compile = self.backend.jit_compile
        try:
            _, _, width = self.backend(zeros)
        except Exception as exc:
            raise ModelLoadError(
                _load_message(
                    self.spec, f"a test call on a zero batch failed: {exc}", self.hub_cache_dir
                )
            ) from exc
        if self.spec.is_embedding:
            self.dim = int(width)
            return
        self.num_classes = int(width)
        if self.num_classes != len(self.labels):
            raise ModelLoadError(
                f"model {self.spec.name!r} (handle {self.spec.handle!r}) outputs "
                f"{self.num_classes} classes but its label set {self.spec.labels!r} has "
                f"{len(self.labels)} labels; fix 'labels' (or the handle) in IMGQ_MODELS_FILE"
            )

    def _zeros(self, n: int) -> np.ndarray:
        return np.zeros((n, self._height, self._width, 3), np.uint8)

    def warm_up(self, *, largest_only: bool = False) -> float:
        """Trace and run every fixed batch size once (the largest was at load); the seconds.

        Without it, the first partial batch of each size pays for tracing the graph
        (from milliseconds for a small model to seconds for a large one; minutes for
        BiT on a GPU, where each size is also rewritten and autotuned).
        ``largest_only``: only the largest, the one bulk work runs under load; the
        others are traced when a partial batch first needs them.
        """
        assert self.backend is not None, "load() the classifier first"
        start = time.perf_counter()
        sizes = self.buckets[-1:] if largest_only else self.buckets
        # One trace per size is the point: TensorFlow's warning about frequent
        # retracing would only alarm whoever reads the worker's start log.
        with _expected_retracing():
            for bucket in sizes:
                zeros = self._zeros(bucket)
                # Twice: the first call after tracing still sets up the kernels.
                for _ in range(2):
                    self.backend(zeros)
        return time.perf_counter() - start

    def precision_speedup(self) -> tuple[float, float] | None:
        """Seconds of the largest batch in fp32 and in the model's reduced precision
        (TensorFlow bf16/fp16, whose graph rewrite can silently change nothing); None
        when there is nothing to compare."""
        backend = self.backend
        if not isinstance(backend, TensorFlowBackend) or backend.precision is Precision.FP32:
            return None
        zeros = self._zeros(self.max_batch_size)
        return backend.seconds_per_call(zeros, fp32=True), backend.seconds_per_call(zeros)

    # -- inference ------------------------------------------------------------------
    def stage(self, images: np.ndarray | Sequence[np.ndarray]) -> Staged:
        """Up to ``max_batch_size`` uint8 images (each ``height x width x 3``) stacked,
        padded to the next fixed size and staged by the runtime; any thread may call it."""
        n = len(images)
        if n > self.max_batch_size:
            raise ValueError(f"{n} images exceed the batch size {self.max_batch_size}")
        if any(image.dtype != np.uint8 for image in images):
            kinds = sorted({str(image.dtype) for image in images} - {"uint8"})
            raise TypeError(f"a model takes uint8 images (0..255), not {', '.join(kinds)}")
        # Stacked straight into the padded batch (one copy); the padding is zeros, so
        # the graph is not traced again for a partial batch.
        bucket = next(b for b in self.buckets if b >= n)
        shape = (bucket, *images[0].shape)
        batch = np.empty(shape, np.uint8) if bucket == n else np.zeros(shape, np.uint8)
        np.stack(list(images), out=batch[:n])
        assert self.backend is not None, "load() the classifier first"
        return Staged(self.backend.stage(batch), n)

    def run(self, staged: Staged) -> Predictions:
        """Top-k of a staged batch's real images (an embedding model: the vectors)."""
        assert self.backend is not None, "load() the classifier first"
        indices, scores, _ = self.backend(staged.batch)
        n = staged.n
        if self.spec.is_embedding:
            return Predictions(np.zeros((n, 0), np.int64), scores[:n], vectors=indices[:n])
        return Predictions(indices[:n], scores[:n])

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> Predictions:
        """Top-k (an embedding model: the vectors) of up to ``max_batch_size`` uint8
        images (each ``height x width x 3``)."""
        if len(images) == 0:
            empty = Predictions(np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k)))
            if self.spec.is_embedding:
                empty.vectors = np.zeros((0, self.dim), np.float32)
            return empty
        return self.run(self.stage(images))

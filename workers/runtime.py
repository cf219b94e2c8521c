"""What a worker process holds once started: its loaded models, their batchers, the
decode threads, and the code that turns a chunk of image references into result
records. No Celery here."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client import Histogram

from shared.contract import ResultDict, error_result, ok_result
from shared.modes import DecodeMode
from shared.registry import ModelSpec, get_model, load_registry
from shared.schemas import ErrorCode, ImageRef
from shared.settings import Settings
from workers import metrics
from workers.batcher import DynamicBatcher, Skipped, TopK
from workers.classifier import Classifier, ModelLoadError, configure_devices
from workers.hardware import PrecisionError, detect, resolve_precision
from workers.inputs import ImageError, ReadLimits, load_image

log = logging.getLogger(__name__)


DECODE_NICENESS = 5


_niced = threading.local()


def _lower_priority() -> None:
    """Run this thread (decoding, task bookkeeping) at a lower CPU priority than the
    model's threads; once per thread.

    Decoding the next batch should use the cycles the model leaves, not slow the
    model down: on a CPU host, TensorFlow's threads stall when another thread takes
    their core; on a GPU host, the thread that feeds the GPU must not wait. Linux
    gives each thread its own nice value; elsewhere this does nothing.
    """
    if getattr(_niced, "done", False):
        return
    _niced.done = True
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


@dataclass
class Runtime:
    """A worker's loaded models (each with its batcher), decode threads and read limits."""

    batchers: dict[str, DynamicBatcher]
    limits: ReadLimits
    decode_pool: ThreadPoolExecutor
    decode_threads: int
    http: httpx.Client = field(default_factory=lambda: httpx.Client(follow_redirects=False))
    exact_decode: set[str] = field(default_factory=set)  # models whose JPEGs are decoded in full

    @property
    def classifiers(self) -> dict[str, Classifier]:
        """The loaded models by name."""
        return {name: b.classifier for name, b in self.batchers.items()}

    @classmethod
    def start(cls, models: Sequence[str], settings: Settings) -> Runtime:
        """Load every model (once, before anything is consumed); ModelLoadError on failure."""
        if not models:
            raise ModelLoadError(
                "a worker needs at least one model: pass --model NAME (imgq worker), "
                "-Q imgq.NAME (celery worker) or set IMGQ_WORKER_MODELS"
            )
        registry = load_registry(settings.models_file)
        specs: list[ModelSpec] = []
        for name in models:
            try:
                specs.append(get_model(registry, name))
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
        # TF Hub reads its cache location from the environment, so the setting
        # goes there; a named, persistent folder instead of TF Hub's temporary one.
        cache = settings.tfhub_cache_dir.expanduser()
        os.environ["TFHUB_CACHE_DIR"] = str(cache)
        if any("://" in spec.handle for spec in specs):
            log.info("models from TF Hub are downloaded once into %s (TFHUB_CACHE_DIR)", cache)
        gpus = configure_devices(memory_growth=settings.memory_growth)
        hardware = detect(gpus)
        log.info("devices: %s", hardware.describe())
        metrics.watch_devices(gpus)
        batchers: dict[str, DynamicBatcher] = {}
        for spec in specs:
            batch = spec.batch_size or settings.batch_size
            delay_ms = (
                spec.max_batch_delay_ms
                if spec.max_batch_delay_ms is not None
                else settings.max_batch_delay_ms
            )
            runtime = spec.runtime or settings.runtime
            requested = spec.precision or settings.precision
            try:
                precision = resolve_precision(requested, runtime, hardware, spec.name)
            except PrecisionError as exc:
                raise ModelLoadError(str(exc)) from None
            log.info("loading model %s from %s", spec.name, spec.handle)
            clf = Classifier(
                spec,
                max_batch_size=batch,
                jit_compile=settings.jit_compile,
                precision=precision,
                runtime=runtime,
                cache_dir=settings.openvino_cache_dir,
            ).load()
            if settings.warm_up:
                seconds = clf.warm_up()
                metrics.record_warmup(spec.name, seconds)
                log.info(
                    "model %s warmed up: batch sizes %s traced in %.2f s",
                    spec.name,
                    list(clf.buckets),
                    seconds,
                )
            batchers[spec.name] = DynamicBatcher(clf, max_delay=delay_ms / 1000.0)
            decode = spec.decode or settings.decode
            backend = clf.backend
            assert backend is not None
            ran = backend.name + (" (converted model from the cache)" if backend.from_cache else "")
            log.info(
                "model %s ready: %d classes, input %dx%d, activation %s, batches of up to %d "
                "(waiting up to %g ms), fixed batch sizes %s; runtime %s, precision %s%s, "
                "decode %s",
                spec.name,
                clf.num_classes,
                *spec.input_size,
                spec.activation.value,
                batch,
                delay_ms,
                list(clf.buckets),
                ran,
                precision.value,
                f" (asked: {requested.value})" if requested is not precision else "",
                decode.value,
            )
        return cls(
            batchers=batchers,
            limits=ReadLimits.from_settings(settings),
            decode_pool=ThreadPoolExecutor(
                max_workers=settings.decode_threads,
                thread_name_prefix="imgq-decode",
                initializer=_lower_priority,
            ),
            decode_threads=settings.decode_threads,
            exact_decode={
                spec.name for spec in specs if (spec.decode or settings.decode) is DecodeMode.EXACT
            },
        )

    def close(self) -> None:
        """Finish queued batches, release threads and connections."""
        for batcher in self.batchers.values():
            batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def _decode(
        self,
        ref: ImageRef,
        size: tuple[int, int],
        exact: bool = False,
        timer: Histogram | None = None,
    ) -> np.ndarray | ImageError:
        start = time.perf_counter()
        try:
            return load_image(ref.ref, size, self.limits, client=self.http, exact=exact)
        except ImageError as exc:
            return exc
        except Exception as exc:  # a decoder bug must not fail the other images
            log.exception("unexpected error decoding %s", ref.src)
            return ImageError(ErrorCode.DECODE_FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            if timer is not None:
                timer.observe(time.perf_counter() - start)

    def _decode_many(
        self,
        refs: Sequence[ImageRef],
        size: tuple[int, int],
        exact: bool = False,
        timer: Histogram | None = None,
    ) -> list[np.ndarray | ImageError]:
        """Decode images in order, in parallel where it pays.

        URLs are fetched one per thread (waiting on the network). Local files go in
        runs of at least 8 per thread: a thread hop per small image costs more than
        decoding it, while big JPEGs decode in C without the GIL and run in parallel.
        """
        if any("://" in r.ref for r in refs):
            return list(self.decode_pool.map(lambda r: self._decode(r, size, exact, timer), refs))
        parts = max(1, min(self.decode_threads, len(refs) // 8))
        if parts == 1:
            return [self._decode(r, size, exact, timer) for r in refs]
        bounds = [len(refs) * i // parts for i in range(parts + 1)]
        runs = [refs[bounds[i] : bounds[i + 1]] for i in range(parts)]
        out: list[np.ndarray | ImageError] = []
        for run in self.decode_pool.map(
            lambda rs: [self._decode(r, size, exact, timer) for r in rs], runs
        ):
            out.extend(run)
        return out

    def classify(
        self,
        job_id: str,
        model: str,
        images: Sequence[ImageRef],
        *,
        skip: Callable[[], bool] | None = None,
    ) -> list[ResultDict]:
        """One record per image, in order: top-5 for those that decode, an error for the rest.

        ``skip`` goes to the batcher (a cancelled job's images are dropped before
        the model call): Skipped is raised when it dropped any.

        Records are ``shared.contract.ResultDict`` (what the result backend stores):
        built directly, as this runs for every image.

        The chunk is decoded a batch at a time and each batch handed to the model's
        batcher at once, so the next batch decodes while the model runs this one,
        and a task holds at most one batch of decoded images beyond the batcher's
        bounded queue.
        """
        _lower_priority()  # the task's own thread too: it decodes small chunks itself
        batcher = self.batchers.get(model)
        if batcher is None:
            message = f"this worker serves {sorted(self.batchers)}, not {model!r}"
            return [
                error_result(job_id, ref.src, model, ErrorCode.UNKNOWN_MODEL, message)
                for ref in images
            ]
        size = batcher.classifier.spec.input_size
        exact = model in self.exact_decode
        step = batcher.max_batch_size
        timer = batcher.metrics.decode_seconds if batcher.metrics else None
        outcomes: list[ImageError | Future[TopK]] = []
        for start in range(0, len(images), step):
            decoded = self._decode_many(images[start : start + step], size, exact, timer)
            arrays = [d for d in decoded if not isinstance(d, ImageError)]
            futures = iter(batcher.submit(arrays, skip=skip))
            outcomes.extend(d if isinstance(d, ImageError) else next(futures) for d in decoded)
        labels = batcher.classifier.labels
        records: list[ResultDict] = []
        for ref, outcome in zip(images, outcomes, strict=True):
            if isinstance(outcome, ImageError):
                records.append(error_result(job_id, ref.src, model, outcome.code, outcome.message))
                continue
            try:
                top = outcome.result()
            except Skipped:
                raise
            except Exception as exc:
                log.warning("model %s failed on %s: %s", model, ref.src, exc)
                records.append(
                    error_result(
                        job_id,
                        ref.src,
                        model,
                        ErrorCode.INFERENCE_FAILED,
                        f"the model failed on this image: {type(exc).__name__}: {exc}",
                    )
                )
                continue
            records.append(ok_result(job_id, ref.src, model, top.indices, top.scores, labels))
        return records

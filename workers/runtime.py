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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client import Histogram

from shared.contract import ResultDict, embedding_result, error_result, ok_result
from shared.heads import HeadCache, HeadError, is_head_ref
from shared.modes import DecodeMode, Precision, RuntimeKind
from shared.registry import ModelSpec, get_model, load_registry
from shared.schemas import ErrorCode, ImageRef
from shared.settings import Settings
from workers import gpu, metrics
from workers.batcher import DynamicBatcher, Skipped, TopK
from workers.cache import WorkerCache, record_of
from workers.classifier import Classifier, ModelLoadError
from workers.hardware import PrecisionError, detect, resolve_precision
from workers.inputs import ImageError, ReadLimits, decode_image, load_image, read_source

log = logging.getLogger(__name__)


DECODE_NICENESS = 5
# A head's top classes (at most its number of labels).
TOP_K = 5
# Chunks whose base-model records are kept for a job's other heads.
HEAD_MEMO_CHUNKS = 64


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


def _check_vector_store(settings: Settings, model: str) -> None:
    """ModelLoadError (one line) when an embedding model's vectors have nowhere to go:
    the Redis results store, or PostgreSQL without pgvector."""
    from shared.vectors import VectorStore, VectorStoreError

    if not settings.results_url.lower().startswith("postgres"):
        raise ModelLoadError(
            f"model {model!r} is an embedding model: its vectors are kept in PostgreSQL "
            "(pgvector), never in Redis; set IMGQ_RESULTS_URL=postgresql://USER:PASSWORD@HOST/DB"
        )
    try:
        VectorStore(settings.results_url).check()
    except VectorStoreError as exc:
        raise ModelLoadError(str(exc)) from None


def batch_size_of(spec: ModelSpec, settings: Settings) -> int:
    """A model's largest batch: the models file's ``batch_size``, else IMGQ_BATCH_SIZE or
    ``--batch-size`` when set, else the built-in model's own (BiT: 16), else the default."""
    if spec.batch_size:
        return spec.batch_size
    if "batch_size" in settings.model_fields_set or not spec.default_batch_size:
        return settings.batch_size
    return spec.default_batch_size


# Below this speed-up over fp32 a reduced precision probably did not apply.
MIN_SPEEDUP = 1.1


def _log_precision_speedup(clf: Classifier) -> None:
    """Time the largest batch in fp32 and in the model's reduced precision and log the
    ratio: a rewrite that changed nothing shows as no speed-up (a warning)."""
    timed = clf.precision_speedup()
    if timed is None:
        return
    fp32, reduced = timed
    ratio = fp32 / reduced if reduced > 0 else float("inf")
    level = logging.INFO if ratio >= MIN_SPEEDUP else logging.WARNING
    log.log(
        level,
        "model %s: a batch of %d takes %.1f ms in %s, %.1f ms in fp32 (x%.2f)%s",
        clf.spec.name,
        clf.max_batch_size,
        reduced * 1000,
        clf.precision.value,
        fp32 * 1000,
        ratio,
        ""
        if ratio >= MIN_SPEEDUP
        else f"; the {clf.precision.value} rewrite may not have applied (no speed-up)",
    )


@dataclass
class Runtime:
    """A worker's loaded models (each with its batcher), decode threads and read limits."""

    batchers: dict[str, DynamicBatcher]
    limits: ReadLimits
    decode_pool: ThreadPoolExecutor
    decode_threads: int
    http: httpx.Client = field(default_factory=lambda: httpx.Client(follow_redirects=False))
    exact_decode: set[str] = field(default_factory=set)  # models whose JPEGs are decoded in full
    cache: WorkerCache | None = None  # the result cache (PostgreSQL store, IMGQ_RESULT_CACHE)
    heads: HeadCache | None = None  # your own labels' heads, read from the job store
    # The base model's records of the latest chunks, for the other heads of the job.
    _memo: OrderedDict[tuple[str, str, int, tuple[str, ...]], Future[list[ResultDict]]] = field(
        default_factory=OrderedDict
    )
    _memo_lock: threading.Lock = field(default_factory=threading.Lock)

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
        embedding = [s.name for s in specs if s.is_embedding]
        if embedding:
            _check_vector_store(settings, embedding[0])
        # A named, persistent folder for TF Hub downloads instead of TF Hub's
        # temporary one; handed to each model's loader (workers.runtimes.tensorflow).
        cache = settings.tfhub_cache_dir.expanduser()
        if any("://" in spec.handle for spec in specs):
            log.info("models from TF Hub are downloaded once into %s (TFHUB_CACHE_DIR)", cache)
        try:
            if all((s.runtime or settings.runtime) is RuntimeKind.NUMPY for s in specs):
                devices = gpu.no_tensorflow(settings)
            else:
                devices = gpu.configure(settings)
        except gpu.GpuError as exc:
            raise ModelLoadError(str(exc)) from None
        hardware = detect(gpu.describe(devices), compute_capability=devices.compute_capability)
        log.info("devices: %s", hardware.describe())
        if devices.names and settings.gpu_memory_limit_mb:
            log.info("GPU memory capped at %d MiB", settings.gpu_memory_limit_mb)
        metrics.watch_devices(devices.names, devices.labels)
        decode_threads = gpu.decode_threads(settings, devices)
        if decode_threads != settings.decode_threads:
            log.info(
                "%d decode threads: the cores of this host per GPU (IMGQ_DECODE_THREADS sets it)",
                decode_threads,
            )
        batchers: dict[str, DynamicBatcher] = {}
        for spec in specs:
            batch = batch_size_of(spec, settings)
            delay_ms = (
                spec.max_batch_delay_ms
                if spec.max_batch_delay_ms is not None
                else settings.max_batch_delay_ms
            )
            runtime = spec.runtime or settings.runtime
            requested = spec.precision or settings.precision
            try:
                precision = resolve_precision(
                    requested, runtime, hardware, spec.name, jit_compile=settings.jit_compile
                )
            except PrecisionError as exc:
                raise ModelLoadError(str(exc)) from None
            if devices.names and runtime is RuntimeKind.TENSORFLOW and precision is Precision.FP32:
                # fp32 is the exact reference: not TF32, Ampere's default (process-wide).
                gpu.exact_fp32()
                log.info("model %s: fp32 on the GPU with TF32 off (exact float32)", spec.name)
            log.info("loading model %s from %s", spec.name, spec.handle)
            clf = Classifier(
                spec,
                max_batch_size=batch,
                jit_compile=settings.jit_compile,
                precision=precision,
                runtime=runtime,
                cache_dir=settings.openvino_cache_dir,
                hub_cache_dir=cache,
            ).load()
            if settings.warm_up:
                largest = settings.warm_up_sizes == "largest"
                seconds = clf.warm_up(largest_only=largest)
                metrics.record_warmup(spec.name, seconds)
                log.info(
                    "model %s warmed up: batch sizes %s traced in %.2f s",
                    spec.name,
                    list(clf.buckets[-1:] if largest else clf.buckets),
                    seconds,
                )
                _log_precision_speedup(clf)
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
        results_cache: WorkerCache | None = None
        if settings.result_cache and settings.results_url.lower().startswith("postgres"):
            decode_modes = {s.name: (s.decode or settings.decode).value for s in specs}
            try:
                results_cache = WorkerCache.for_models(
                    settings.results_url,
                    {name: b.classifier for name, b in batchers.items()},
                    decode_modes,
                )
            except Exception as exc:
                log.warning("result cache off: %s", " ".join(str(exc).split()))
            else:
                log.info("result cache on: images computed before are not computed again")
        return cls(
            cache=results_cache,
            batchers=batchers,
            limits=ReadLimits.from_settings(settings),
            decode_pool=ThreadPoolExecutor(
                max_workers=decode_threads,
                thread_name_prefix="imgq-decode",
                initializer=_lower_priority,
            ),
            decode_threads=decode_threads,
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
        if self.cache is not None:
            self.cache.close()

    def _read(self, ref: ImageRef) -> bytes | ImageError:
        try:
            return read_source(ref.ref, self.limits, client=self.http)
        except ImageError as exc:
            return exc
        except Exception as exc:
            log.exception("unexpected error reading %s", ref.src)
            return ImageError(ErrorCode.DECODE_FAILED, f"{type(exc).__name__}: {exc}")

    def _read_many(self, refs: Sequence[ImageRef]) -> list[bytes | ImageError]:
        """Every image's bytes (or why not), in order; URLs fetched in parallel."""
        if any("://" in r.ref for r in refs):
            return list(self.decode_pool.map(self._read, refs))
        return [self._read(r) for r in refs]

    def _decode(
        self,
        ref: ImageRef,
        size: tuple[int, int],
        exact: bool = False,
        timer: Histogram | None = None,
        data: bytes | ImageError | None = None,
    ) -> np.ndarray | ImageError:
        """One image decoded: read here, or from ``data`` already read (the cache's path)."""
        start = time.perf_counter()
        try:
            if isinstance(data, ImageError):
                return data
            if data is not None:
                return decode_image(data, size, max_pixels=self.limits.max_pixels, exact=exact)
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
        data: Sequence[bytes | ImageError] | None = None,
    ) -> list[np.ndarray | ImageError]:
        """Decode images in order, in parallel where it pays (``data``: their bytes,
        already read).

        URLs are fetched one per thread (waiting on the network). Local files go in
        runs of at least 8 per thread: a thread hop per small image costs more than
        decoding it, while big JPEGs decode in C without the GIL and run in parallel.
        """
        items = list(zip(refs, data if data is not None else [None] * len(refs), strict=True))
        if data is None and any("://" in r.ref for r in refs):
            return list(
                self.decode_pool.map(lambda it: self._decode(it[0], size, exact, timer), items)
            )
        parts = max(1, min(self.decode_threads, len(refs) // 8))
        if parts == 1:
            return [self._decode(r, size, exact, timer, d) for r, d in items]
        bounds = [len(refs) * i // parts for i in range(parts + 1)]
        runs = [items[bounds[i] : bounds[i + 1]] for i in range(parts)]
        out: list[np.ndarray | ImageError] = []
        for run in self.decode_pool.map(
            lambda its: [self._decode(r, size, exact, timer, d) for r, d in its], runs
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
        """One record per image, in order: top-5 (an embedding model: the vector) for
        those that decode, an error for the rest.

        With the result cache, every image is read and hashed first; the images
        computed before (same bytes, same model identity) get their record from the
        cache, without a decode or a model call; the rest are computed as below and
        kept in the cache.
        """
        if is_head_ref(model):
            return self._classify_head(job_id, model, images, skip=skip)
        if self.cache is None or model not in self.batchers:
            return self._compute(job_id, model, images, skip=skip)
        _lower_priority()
        data = self._read_many(images)
        lookup = self.cache.lookup(model, [d if isinstance(d, bytes) else None for d in data])
        todo = [i for i in range(len(images)) if i not in lookup.hits]
        computed = self._compute(
            job_id, model, [images[i] for i in todo], skip=skip, data=[data[i] for i in todo]
        )
        out: list[ResultDict | None] = [None] * len(images)
        for i, hit in lookup.hits.items():
            out[i] = record_of(job_id, images[i].src, model, hit)
        for i, record in zip(todo, computed, strict=True):
            out[i] = record
        records = [r for r in out if r is not None]
        assert len(records) == len(images)
        self.cache.store(model, lookup, records, todo)
        return records

    def _classify_head(
        self,
        job_id: str,
        ref: str,
        images: Sequence[ImageRef],
        *,
        skip: Callable[[], bool] | None = None,
    ) -> list[ResultDict]:
        """A head of your own labels (``NAME@V``): the base model's vectors, then the
        head's softmax and top-5 over its labels.

        The vectors come from one backbone pass per image for every head of a job on
        that base: the base's records of a chunk are kept for a moment
        (``HEAD_MEMO_CHUNKS``), so the next head's task on the same chunk (sent right
        after it) takes them instead of running the model again; with the result cache
        on, any worker reuses them (same image bytes, same base model).
        """
        try:
            if self.heads is None:
                raise HeadError(f"this worker reads no heads of your own labels ({ref!r})")
            head = self.heads.get(ref)
        except HeadError as exc:
            return [
                error_result(job_id, r.src, ref, ErrorCode.UNKNOWN_MODEL, str(exc)) for r in images
            ]
        except Exception as exc:  # Redis away: the task's retry, not a wrong record
            raise RuntimeError(f"cannot read model {ref}: {exc}") from exc
        base = head.info.base
        if base not in self.batchers:
            message = f"{ref} runs on {base!r}; this worker serves {sorted(self.batchers)}"
            return [
                error_result(job_id, r.src, ref, ErrorCode.UNKNOWN_MODEL, message) for r in images
            ]
        base_records = self._base_records(job_id, base, images, skip)
        ok = [i for i, r in enumerate(base_records) if r.get("error") is None]
        out: list[ResultDict] = []
        probs = (
            head.probabilities(np.asarray([base_records[i]["embedding"] for i in ok], np.float32))
            if ok
            else np.zeros((0, len(head.labels)), np.float32)
        )
        top = min(TOP_K, len(head.labels))
        rows = dict(zip(ok, range(len(ok)), strict=True))
        for i, (image, record) in enumerate(zip(images, base_records, strict=True)):
            error = record.get("error")
            if error is not None:
                out.append(
                    error_result(job_id, image.src, ref, ErrorCode(error["code"]), error["message"])
                )
                continue
            p = probs[rows[i]]
            best = np.argsort(-p, kind="stable")[:top]
            out.append(
                ok_result(
                    job_id,
                    image.src,
                    ref,
                    [int(k) for k in best],
                    [float(p[k]) for k in best],
                    head.labels,
                )
            )
        return out

    def _base_records(
        self,
        job_id: str,
        base: str,
        images: Sequence[ImageRef],
        skip: Callable[[], bool] | None,
    ) -> list[ResultDict]:
        """The base model's records of a chunk, computed once for all the heads that ask
        for it while it is remembered: the first task computes, the others (the job's
        other heads, often running at the same moment in other threads) wait for it."""
        key = (job_id, base, len(images), tuple(r.ref for r in images))
        with self._memo_lock:
            pending = self._memo.get(key)
            mine = pending is None
            if pending is None:
                pending = self._memo[key] = Future()
                while len(self._memo) > HEAD_MEMO_CHUNKS:
                    self._memo.popitem(last=False)
        if not mine:
            return pending.result()
        try:
            records = self.classify(job_id, base, images, skip=skip)
        except BaseException as exc:
            with self._memo_lock:  # not remembered: a later task computes again
                if self._memo.get(key) is pending:
                    del self._memo[key]
            pending.set_exception(exc)
            raise
        pending.set_result(records)
        return records

    def _compute(
        self,
        job_id: str,
        model: str,
        images: Sequence[ImageRef],
        *,
        skip: Callable[[], bool] | None = None,
        data: Sequence[bytes | ImageError] | None = None,
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
            decoded = self._decode_many(
                images[start : start + step],
                size,
                exact,
                timer,
                None if data is None else data[start : start + step],
            )
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
            if top.vector is not None:
                records.append(embedding_result(job_id, ref.src, model, top.vector))
            else:
                records.append(ok_result(job_id, ref.src, model, top.indices, top.scores, labels))
        return records

"""Dynamic batching across tasks: one batcher per model collects decoded images from
all the tasks running in a worker and calls the model on up to ``max_batch_size``
of them at once, as soon as it has that many, or ``max_delay`` after the first once
the model is free: while the model runs a batch, a partial next batch keeps filling
(images that come one task at a time would otherwise make every other batch small).

Tasks decode their images in other threads while the model runs, so the model
never waits for input that is ready (Pillow and TensorFlow release the GIL). Two
threads per model: one gathers the next batch, stacks and pads it (uint8) and has
the runtime stage it (on a GPU: the copy to the device), while the other runs the
model on the current one; at most one staged batch waits between them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from workers import metrics
from workers.classifier import Classifier, Staged

log = logging.getLogger(__name__)

# Put in the queue when the model thread runs out of work, to wake a gathering that
# waits for the model to be free (never given to the model).
_WAKE = object()


@dataclass(frozen=True)
class TopK:
    """One image's top-k: indices into the model output, activated scores, best first;
    for an embedding model, no top-k and the image's vector."""

    indices: tuple[int, ...]
    scores: tuple[float, ...]
    vector: np.ndarray | None = None  # (dim,) float32, embedding models only


@dataclass
class _Item:
    image: np.ndarray
    future: Future[TopK]
    queued: float = 0.0  # perf_counter() when submitted (metrics on)
    skip: Callable[[], bool] | None = None  # True: drop the image (its job was cancelled)


class BatcherClosed(RuntimeError):
    """The batcher was closed (the worker is stopping)."""


class Skipped(RuntimeError):
    """The image was dropped before the model call: its ``skip`` said so."""


class DynamicBatcher:
    """Runs one model on batches gathered from concurrent callers, in a thread of its own."""

    def __init__(
        self,
        classifier: Classifier,
        *,
        max_batch_size: int | None = None,
        max_delay: float = 0.002,
        max_pending: int | None = None,
    ) -> None:
        self.classifier = classifier
        self.max_batch_size = min(
            max_batch_size or classifier.max_batch_size, classifier.max_batch_size
        )
        self.max_delay = max_delay
        # Bounds the decoded images waiting for the model (memory), whatever the
        # number of tasks running: submit() blocks while it is full.
        self._queue: queue.Queue[_Item | object | None] = queue.Queue(
            maxsize=max_pending or 4 * self.max_batch_size
        )
        # Staged batches waiting for the model: one, so that staging runs one batch
        # ahead of the model and no further (device memory).
        self._ready: queue.Queue[tuple[list[_Item], Staged | Exception] | None] = queue.Queue(
            maxsize=1
        )
        # Set while the model thread has no staged batch to run.
        self._model_idle = threading.Event()
        self._model_idle.set()
        self._closed = False
        self.batches = 0
        self.images = 0
        self.sizes: Counter[int] = Counter()  # batch size -> how many batches had it
        self.busy_s = 0.0  # time spent in model calls
        self.metrics = metrics.for_model(classifier.spec.name)  # None: metrics off
        self._thread = threading.Thread(
            target=self._run, name=f"imgq-batcher-{classifier.spec.name}", daemon=True
        )
        self._model_thread = threading.Thread(
            target=self._run_model, name=f"imgq-model-{classifier.spec.name}", daemon=True
        )
        self._model_thread.start()
        self._thread.start()

    def submit(
        self, images: Sequence[np.ndarray], *, skip: Callable[[], bool] | None = None
    ) -> list[Future[TopK]]:
        """Queue images for the model; one future per image.

        ``skip`` is asked just before the batch that would take them is staged
        (one batch before its model call): when it says True, their futures fail
        with Skipped instead.
        """
        if self._closed:
            raise BatcherClosed(f"the batcher of {self.classifier.spec.name!r} is closed")
        futures: list[Future[TopK]] = []
        now = time.perf_counter() if self.metrics else 0.0
        for image in images:
            item = _Item(image, Future(), now, skip)
            futures.append(item.future)
            self._queue.put(item)
        return futures

    def predict(self, images: Sequence[np.ndarray]) -> list[TopK | Exception]:
        """Top-k for each image (or the exception the model raised on it), in order."""
        out: list[TopK | Exception] = []
        for future in self.submit(images):
            try:
                out.append(future.result())
            except Exception as exc:
                out.append(exc)
        return out

    def close(self, timeout: float = 30) -> None:
        """Finish what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        self._model_thread.join(max(0.0, deadline - time.monotonic()))
        if self.batches:
            log.info(
                "model %s: %d images in %d batches (mean %.1f), %.1f s in model calls; "
                "batch sizes %s",
                self.classifier.spec.name,
                self.images,
                self.batches,
                self.images / self.batches,
                self.busy_s,
                dict(sorted(self.sizes.items())),
            )

    # -- the batching thread -----------------------------------------------------------
    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """Up to max_batch_size items: what is queued now, then what comes before the
        deadline, and after it, for as long as the model is still busy with the batch
        before (a partial batch staged then would run no sooner, only smaller)."""
        items = [first]
        deadline = time.monotonic() + self.max_delay
        stop = False
        while len(items) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 and self._model_idle.is_set():
                    break
                try:
                    # Past the deadline: until an item comes or the model wakes us.
                    item = self._queue.get(timeout=left if left > 0 else None)
                except queue.Empty:
                    if self._model_idle.is_set():
                        break
                    continue
            if item is None:
                stop = True
                break
            if item is _WAKE:
                continue
            assert isinstance(item, _Item)
            items.append(item)
        return items, stop

    def _run(self) -> None:
        """Gather, stack, pad and stage batches for the model thread, one ahead."""
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                if first is _WAKE:
                    continue
                assert isinstance(first, _Item)
                items, stop = self._gather(first)
                items = self._without_skipped(items)
                if items:
                    staged: Staged | Exception
                    try:
                        staged = self.classifier.stage([it.image for it in items])
                    except Exception as exc:  # the model thread sorts it out image by image
                        staged = exc
                    self._ready.put((items, staged))
                if stop:
                    return
        finally:
            self._ready.put(None)

    def _run_model(self) -> None:
        """Run the model on each staged batch, in order."""
        while True:
            try:
                ready = self._ready.get_nowait()
            except queue.Empty:
                self._model_idle.set()
                # A gathering that waits for the model to be free ends now (where the
                # queue is full, the batch being gathered fills without it).
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_WAKE)
                ready = self._ready.get()
            self._model_idle.clear()
            if ready is None:
                return
            self._execute(*ready)

    @staticmethod
    def _without_skipped(items: list[_Item]) -> list[_Item]:
        """The items to run; the others' futures fail with Skipped (one check per caller)."""
        answers: dict[int, bool] = {}
        keep: list[_Item] = []
        for item in items:
            if item.skip is not None:
                key = id(item.skip)
                if key not in answers:
                    answers[key] = item.skip()
                if answers[key]:
                    item.future.set_exception(Skipped("dropped before the model call"))
                    continue
            keep.append(item)
        return keep

    def _execute(self, items: list[_Item], staged: Staged | Exception | None = None) -> None:
        start = time.perf_counter()
        try:
            if isinstance(staged, Exception):
                raise staged
            if staged is None:
                staged = self.classifier.stage([it.image for it in items])
            preds = self.classifier.run(staged)
        except Exception as exc:
            if self.metrics:
                self.metrics.failures.inc()
            if len(items) == 1:
                items[0].future.set_exception(exc)
                return
            # One bad input must not fail the others: run them one by one.
            log.warning(
                "model %s failed on a batch of %d (%s); retrying one by one",
                self.classifier.spec.name,
                len(items),
                exc,
            )
            for item in items:
                self._execute([item])
            return
        seconds = time.perf_counter() - start
        if self.metrics:
            self.metrics.record_batch(len(items), start - items[0].queued, seconds)
        self.busy_s += seconds
        self.batches += 1
        self.images += len(items)
        self.sizes[len(items)] += 1
        if preds.vectors is not None:
            for item, vector in zip(items, preds.vectors, strict=True):
                item.future.set_result(TopK((), (), vector))
            return
        for item, idx, sc in zip(items, preds.indices, preds.scores, strict=True):
            item.future.set_result(TopK(tuple(int(i) for i in idx), tuple(float(s) for s in sc)))

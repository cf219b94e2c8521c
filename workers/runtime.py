"""What a worker process holds once started: its loaded models and the code that
turns a chunk of image references into result records. No Celery here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np

from shared.images import ImageError, ReadLimits, load_image
from shared.registry import ModelSpec, get_model, load_registry
from shared.schemas import ErrorCode, ImageRef, Prediction, ResultRecord, error_record
from shared.settings import Settings
from workers.classifier import Classifier, ModelLoadError, configure_devices

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """A worker's loaded models, decode threads and read limits."""

    classifiers: dict[str, Classifier]
    limits: ReadLimits
    decode_pool: ThreadPoolExecutor
    http: httpx.Client = field(default_factory=lambda: httpx.Client(follow_redirects=False))

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
        gpus = configure_devices(memory_growth=settings.memory_growth)
        log.info("devices: %s", ", ".join(gpus) or "CPU only")
        classifiers: dict[str, Classifier] = {}
        for spec in specs:
            log.info("loading model %s from %s", spec.name, spec.handle)
            classifiers[spec.name] = Classifier(spec, max_batch_size=settings.batch_size).load()
            log.info(
                "model %s ready: %d classes, input %dx%d, activation %s",
                spec.name,
                classifiers[spec.name].num_classes,
                *spec.input_size,
                spec.activation.value,
            )
        return cls(
            classifiers=classifiers,
            limits=ReadLimits.from_settings(settings),
            decode_pool=ThreadPoolExecutor(
                max_workers=settings.decode_threads, thread_name_prefix="imgq-decode"
            ),
        )

    def close(self) -> None:
        """Release threads and connections."""
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def _decode(self, ref: ImageRef, size: tuple[int, int]) -> np.ndarray | ImageError:
        try:
            return load_image(ref.ref, size, self.limits, client=self.http)
        except ImageError as exc:
            return exc

    def classify(self, job_id: str, model: str, images: Sequence[ImageRef]) -> list[ResultRecord]:
        """One record per image, in order: top-5 for those that decode, an error for the rest."""
        classifier = self.classifiers.get(model)
        if classifier is None:
            return [
                _error(
                    job_id,
                    model,
                    ref,
                    ErrorCode.UNKNOWN_MODEL,
                    f"this worker serves {sorted(self.classifiers)}, not {model!r}",
                )
                for ref in images
            ]
        size = classifier.spec.input_size
        decoded = list(self.decode_pool.map(lambda r: self._decode(r, size), images))
        records: list[ResultRecord | None] = [None] * len(images)
        good: list[int] = []
        for i, (ref, item) in enumerate(zip(images, decoded, strict=True)):
            if isinstance(item, ImageError):
                records[i] = _error(job_id, model, ref, item.code, item.message)
            else:
                good.append(i)
        step = classifier.max_batch_size
        for start in range(0, len(good), step):
            idx = good[start : start + step]
            batch = [decoded[i] for i in idx]
            for i, record in zip(
                idx,
                self._predict(job_id, model, classifier, [images[i] for i in idx], batch),
                strict=True,
            ):
                records[i] = record
        return [r for r in records if r is not None]

    def _predict(
        self,
        job_id: str,
        model: str,
        classifier: Classifier,
        refs: Sequence[ImageRef],
        batch: Sequence[np.ndarray | ImageError],
    ) -> list[ResultRecord]:
        """Run one batch; if the model fails on it, run its images one by one so that
        only the image that makes it fail gets an error."""
        arrays = [b for b in batch if isinstance(b, np.ndarray)]
        try:
            preds = classifier.predict(arrays)
        except Exception as exc:
            if len(arrays) == 1:
                log.warning("model %s failed on %s: %s", model, refs[0].src, exc)
                return [
                    _error(
                        job_id,
                        model,
                        refs[0],
                        ErrorCode.INFERENCE_FAILED,
                        f"the model failed on this image: {type(exc).__name__}: {exc}",
                    )
                ]
            log.warning("model %s failed on a batch of %d; retrying one by one", model, len(arrays))
            out: list[ResultRecord] = []
            for ref, arr in zip(refs, arrays, strict=True):
                out.extend(self._predict(job_id, model, classifier, [ref], [arr]))
            return out
        labels = classifier.labels
        return [
            ResultRecord(
                job_id=job_id,
                image=ref.src,
                model=model,
                top5=[
                    Prediction(index=int(i), label=labels[int(i)], score=float(s))
                    for i, s in zip(indices, scores, strict=True)
                ],
            )
            for ref, indices, scores in zip(refs, preds.indices, preds.scores, strict=True)
        ]


def _error(job_id: str, model: str, ref: ImageRef, code: ErrorCode, message: str) -> ResultRecord:
    return error_record(job_id, ref.src, model, code, message)

"""The queue contract: what a producer puts on a model's queue and what a worker
answers, defined once for the producer, the job records and the workers.

- **Task id**: ``<job>.<model>.<chunk>`` (:func:`task_id`, :func:`parse_task_id`).
  Derived, so a task sent or delivered twice has one id, one result, one count.
- **Task message**: :class:`ClassifyMessage`. On the wire it is the Celery task's
  positional arguments ``[job_id, model, chunk]`` (:meth:`ClassifyMessage.to_args`):
  a reference to one chunk of the job record, where the worker reads the chunk's
  image list (``shared.jobs.JobStore.chunk``). A job's images are kept in Redis
  once, not once more per model in every queued message; a 200,000-image job
  queues a few hundred messages of a few hundred bytes. The older form
  ``[job_id, model, chunk, [path or [src, ref], ...]]``, the images inline, is
  still accepted. The image list is also how a job's chunks are kept in Redis
  (:func:`encode_images`, :func:`decode_images`).
- **Result record**: :class:`ResultDict`, one per image and model, the JSON the
  worker returns and the result backend stores. It is the wire form of
  :class:`shared.schemas.ResultRecord`, the model the producer parses it into.

Why the record is a ``TypedDict`` and not the pydantic model on the worker side:
it is built for every image, and building the dict directly costs about a ninth of
building and dumping the pydantic model (``benchmarks/record_contract.py``: 1.6 us
against 14 us per record on the 2-core CI machine; see docs/benchmarks.md). The contract
test checks that the records a worker builds validate against ``ResultRecord``
and dump back to the same JSON, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from shared.schemas import ErrorCode, ImageRef


def task_id(job_id: str, model: str, chunk: int) -> str:
    """The Celery task id of one chunk for one model (deterministic)."""
    return f"{job_id}.{model}.{chunk:06d}"


def parse_task_id(tid: str) -> tuple[str, str, int]:
    """(job id, model, chunk index) from a task id made by :func:`task_id`."""
    job_id, model, chunk = tid.split(".")
    return job_id, model, int(chunk)


def encode_images(refs: Iterable[ImageRef]) -> list[str | list[str]]:
    """Image references as they travel: the path alone when it is the source as given
    (absolute paths, URLs), else ``[src, ref]``; half the bytes of messages and job
    records for the usual case."""
    return [r.ref if r.src == r.ref else [r.src, r.ref] for r in refs]


def decode_images(items: Any) -> list[ImageRef]:
    """Image references from their wire form; TypeError or ValueError when malformed."""
    if not isinstance(items, list | tuple):
        raise TypeError(f"the image list must be a list, not {type(items).__name__}")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(ImageRef(src=item, ref=item))
        else:
            src, ref = item
            out.append(ImageRef(src=src, ref=ref))
    return out


class ClassifyMessage(BaseModel):
    """One task: classify one chunk of a job's images with one model.

    ``images`` is None when the message refers to the chunk in the job record
    (what producers send); a message of the older form carries them inline.
    ``size`` is the chunk's image count, for what monitoring shows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    model: str
    chunk: int = Field(ge=0)
    images: tuple[ImageRef, ...] | None = None
    size: int | None = Field(default=None, ge=0)

    @property
    def task_id(self) -> str:
        """The task's id, derived from job, model and chunk."""
        return task_id(self.job_id, self.model, self.chunk)

    def to_args(self) -> list[Any]:
        """The Celery task's positional arguments (the images only when inline)."""
        args: list[Any] = [self.job_id, self.model, self.chunk]
        if self.images is not None:
            args.append(encode_images(self.images))
        return args

    def argsrepr(self, name: str = "") -> str:
        """What monitoring shows for the task: job, its name, model and size, not
        hundreds of paths."""
        size = len(self.images) if self.images is not None else self.size
        shown = "?" if size is None else str(size)
        return (
            f"(job={self.job_id!r}, name={name!r}, model={self.model!r}, chunk={self.chunk}, "
            f"images={shown})"
        )

    @classmethod
    def from_args(cls, job_id: Any, model: Any, chunk: Any, images: Any = None) -> ClassifyMessage:
        """The message from the task's arguments; ValueError when they are malformed."""
        if images is None:
            return cls(job_id=job_id, model=model, chunk=chunk)
        try:
            refs = decode_images(images)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed image list in the task message: {exc}") from exc
        return cls(job_id=job_id, model=model, chunk=chunk, images=tuple(refs))


class PredictionDict(TypedDict):
    """One of the top-5 classes on the wire (``shared.schemas.Prediction``)."""

    index: int
    label: str
    score: float


class ErrorDict(TypedDict):
    """Why one image has no top-5, on the wire (``shared.schemas.ErrorInfo``)."""

    code: str
    message: str


class ResultDict(TypedDict):
    """One result record on the wire (``shared.schemas.ResultRecord``); keys in this order.

    A classifier's record has ``top5``; an embedding model's has ``embedding`` (the
    pooled vector, float32 values as floats) and ``dim`` in its place. A failed
    image's record is the same for both: ``top5`` empty and ``error``.
    """

    job_id: str
    image: str
    model: str
    top5: NotRequired[list[PredictionDict]]
    embedding: NotRequired[list[float]]
    dim: NotRequired[int]
    error: ErrorDict | None


def ok_result(
    job_id: str,
    image: str,
    model: str,
    indices: Sequence[int],
    scores: Sequence[float],
    labels: Sequence[str],
) -> ResultDict:
    """The record of a classified image: its top classes (model output indices, best
    first), their scores, and the model's labels to name them."""
    return {
        "job_id": job_id,
        "image": image,
        "model": model,
        "top5": [
            {"index": k, "label": labels[k], "score": s}
            for k, s in zip(indices, scores, strict=True)
        ],
        "error": None,
    }


def embedding_result(job_id: str, image: str, model: str, vector: Any) -> ResultDict:
    """The record of an embedded image: its vector (a float32 array or sequence)."""
    values = vector.tolist() if hasattr(vector, "tolist") else [float(v) for v in vector]
    return {
        "job_id": job_id,
        "image": image,
        "model": model,
        "embedding": values,
        "dim": len(values),
        "error": None,
    }


def error_result(job_id: str, image: str, model: str, code: ErrorCode, message: str) -> ResultDict:
    """The record of an image that has no top-5, and why."""
    return {
        "job_id": job_id,
        "image": image,
        "model": model,
        "top5": [],
        "error": {"code": code.value, "message": message},
    }

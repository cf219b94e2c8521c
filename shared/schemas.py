"""The pydantic models of what travels on the queue and what comes back: image
references, error codes, and result records as the producer reads them.

Messages carry references to images (paths, URLs), never image bytes. Results are
one record per image and model; a per-image failure is a record with an error.
How these go on the wire (task ids, the task message, the record a worker builds)
is ``shared.contract``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorCode(StrEnum):
    """Stable codes for per-image failures. Documented in docs/errors.md."""

    NOT_FOUND = "not_found"  # the path does not exist
    IS_DIRECTORY = "is_directory"  # the path is a directory, not a file
    PERMISSION_DENIED = "permission_denied"  # the worker may not read the file
    OUTSIDE_ALLOWED_ROOTS = (
        "outside_allowed_roots"  # path (or symlink target) outside IMGQ_ALLOWED_ROOTS
    )
    EMPTY_FILE = "empty_file"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # Pillow does not recognise the format
    TRUNCATED = "truncated"  # a known format, but the data ends early or is corrupt
    TOO_LARGE = "too_large"  # file/download over IMGQ_MAX_IMAGE_BYTES
    DECOMPRESSION_BOMB = "decompression_bomb"  # pixels over IMGQ_MAX_IMAGE_PIXELS
    UNSUPPORTED_SOURCE = "unsupported_source"  # a scheme imgq cannot read (ftp://, data: ...)
    URL_REFUSED = "url_refused"  # a URL to a private/loopback/link-local address
    FETCH_FAILED = "fetch_failed"  # HTTP error status, connection refused, DNS failure
    FETCH_TIMEOUT = "fetch_timeout"  # the server did not answer in IMGQ_FETCH_TIMEOUT
    NO_SUCH_KEY = "no_such_key"  # s3://: the bucket has no object with that key
    NO_SUCH_BUCKET = "no_such_bucket"  # s3://: the bucket does not exist
    ACCESS_DENIED = "access_denied"  # s3://: the credentials may not read it, or are wrong
    THROTTLED = "throttled"  # s3://: 503 SlowDown on every one of IMGQ_S3_MAX_ATTEMPTS tries
    DECODE_FAILED = "decode_failed"  # any other decoder failure
    INFERENCE_FAILED = "inference_failed"  # the model failed on this image alone
    TASK_FAILED = "task_failed"  # the whole task failed after its retries
    UNKNOWN_MODEL = "unknown_model"  # the task named a model this worker does not serve
    WORKER_CRASHED = "worker_crashed"  # a worker process died while working on this image


class ImageRef(BaseModel):
    """One image on the queue: ``src`` as the user gave it, ``ref`` as the worker reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    src: str = Field(description="The source exactly as the user gave it (kept in results).")
    ref: str = Field(
        description="What the worker reads: an absolute path, an http(s) or an s3:// URL."
    )


class ErrorInfo(BaseModel):
    """Why one image has no top-5."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str


class Prediction(BaseModel):
    """One of the top-5 classes: position in the model output, its label, activated score."""

    model_config = ConfigDict(extra="forbid")

    index: int
    label: str
    score: float


class ResultRecord(BaseModel):
    """One record per image and model: a classifier's ``top5``, or an embedding
    model's ``embedding`` and ``dim`` in its place; ``error`` when the image failed."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    image: str
    model: str
    top5: list[Prediction] = Field(default_factory=list)
    embedding: list[float] | None = None
    dim: int | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        """True when the image was classified (or embedded)."""
        return self.error is None

    @property
    def is_embedding(self) -> bool:
        """True for an embedded image's record (its vector in place of top-5)."""
        return self.embedding is not None

    def to_json_dict(self) -> dict[str, Any]:
        """The record as plain JSON types (enum codes as strings): ``top5`` for a
        classifier, ``embedding`` and ``dim`` in its place for an embedding model."""
        if self.embedding is None:
            return self.model_dump(mode="json", exclude={"embedding", "dim"})
        return self.model_dump(mode="json", exclude={"top5"})


def error_record(
    job_id: str, image: str, model: str, code: ErrorCode, message: str
) -> ResultRecord:
    """A failure record for one image and model."""
    return ResultRecord(
        job_id=job_id, image=image, model=model, error=ErrorInfo(code=code, message=message)
    )

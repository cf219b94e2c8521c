"""Objects in S3 and S3-compatible stores (``s3://bucket/key``), read directly by the
worker: within the byte cap and the overall deadline of an http(s) fetch, throttling
retried with backoff by the client, and every failure an ``ImageError`` with a code
(a missing key, a missing bucket, access denied ...), so that one object never fails
its chunk."""

from __future__ import annotations

import threading
import time
from typing import Any

from shared.s3 import S3Error, parse_s3_url, s3_client, s3_error
from shared.schemas import ErrorCode
from shared.settings import get_settings
from workers.inputs.errors import ImageError, human_size, too_large
from workers.inputs.fetch import fetch_timeout, run_until
from workers.inputs.limits import ReadLimits

_READ_CHUNK = 1024 * 1024

# S3's error codes (and the names of failures without one) to per-image codes.
_CODES = {
    "NoSuchKey": ErrorCode.NO_SUCH_KEY,
    "NotFound": ErrorCode.NO_SUCH_KEY,
    "NoSuchBucket": ErrorCode.NO_SUCH_BUCKET,
    "AccessDenied": ErrorCode.ACCESS_DENIED,
    "AllAccessDisabled": ErrorCode.ACCESS_DENIED,
    "InvalidAccessKeyId": ErrorCode.ACCESS_DENIED,
    "SignatureDoesNotMatch": ErrorCode.ACCESS_DENIED,
    "ExpiredToken": ErrorCode.ACCESS_DENIED,
    "InvalidToken": ErrorCode.ACCESS_DENIED,
    "credentials": ErrorCode.ACCESS_DENIED,
    "SlowDown": ErrorCode.THROTTLED,
    "Throttling": ErrorCode.THROTTLED,
    "ThrottlingException": ErrorCode.THROTTLED,
    "RequestLimitExceeded": ErrorCode.THROTTLED,
    "TooManyRequests": ErrorCode.THROTTLED,
    "refused": ErrorCode.URL_REFUSED,
    "missing": ErrorCode.UNSUPPORTED_SOURCE,
    "timeout": ErrorCode.FETCH_TIMEOUT,
}


def read_object(url: str, limits: ReadLimits) -> bytes:
    """The bytes of ``s3://bucket/key``, within limits.max_bytes and limits.fetch_timeout
    overall (retries and their backoff included)."""
    try:
        where = parse_s3_url(url)
    except ValueError as exc:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, str(exc)) from exc
    if not where.key or where.key.endswith("/"):
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"{url!r} names a prefix, not an object (submit it to have its objects listed)",
        )
    deadline = time.monotonic() + limits.fetch_timeout
    cancel = threading.Event()

    def fetch() -> bytes:
        try:
            client = s3_client(get_settings(), timeout=limits.fetch_timeout)
            response = client.get_object(Bucket=where.bucket, Key=where.key)
            return _read_body(response, limits, deadline, cancel)
        except ImageError:
            raise
        except Exception as exc:  # botocore's, S3Error, or anything else: one code each
            raise _image_error(exc, url, limits) from exc

    return run_until(fetch, deadline, cancel, limits.fetch_timeout)


def _read_body(
    response: dict[str, Any], limits: ReadLimits, deadline: float, cancel: threading.Event
) -> bytes:
    """The object's body, refused before reading when its size is over the cap."""
    stream = response["Body"]
    try:
        size = int(response.get("ContentLength") or 0)
        if size > limits.max_bytes:
            raise too_large(f"the object is {human_size(size)}", limits.max_bytes)
        body = bytearray()
        while chunk := stream.read(_READ_CHUNK):
            body += chunk
            if len(body) > limits.max_bytes:
                raise too_large(
                    f"the object is over {human_size(limits.max_bytes)}", limits.max_bytes
                )
            if cancel.is_set() or time.monotonic() > deadline:
                raise fetch_timeout(limits.fetch_timeout)
    finally:
        stream.close()
    if not body:
        raise ImageError(ErrorCode.EMPTY_FILE, "the object has zero bytes")
    return bytes(body)


def _image_error(exc: BaseException, url: str, limits: ReadLimits) -> ImageError:
    """The per-image error for a failed read: S3's code mapped, the message kept."""
    error = exc if isinstance(exc, S3Error) else s3_error(exc, f"reading {url}")
    code = _CODES.get(error.code, ErrorCode.FETCH_FAILED)
    if code is ErrorCode.FETCH_TIMEOUT:
        return fetch_timeout(limits.fetch_timeout)
    return ImageError(code, error.message)

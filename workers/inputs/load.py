"""One image reference to pixels: pick the reader by the reference, then decode."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt

from shared.schemas import ErrorCode
from workers.inputs.decode import decode_image
from workers.inputs.errors import ImageError
from workers.inputs.fetch import fetch_url
from workers.inputs.files import file_url_path, read_file
from workers.inputs.limits import ReadLimits
from workers.inputs.s3 import read_object


def read_source(ref: str, limits: ReadLimits, *, client: httpx.Client | None = None) -> bytes:
    """The bytes of a local absolute path, a file:// URL, an http(s) or an s3:// URL."""
    try:
        scheme = urlsplit(ref).scheme.lower()
    except ValueError as exc:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"not a valid URL or path: {exc}") from exc
    if scheme in ("http", "https"):
        return fetch_url(ref, limits, client)
    if scheme == "s3":
        return read_object(ref, limits)
    if scheme == "file":
        return read_file(file_url_path(ref), limits)
    if not scheme and os.path.isabs(ref):
        return read_file(ref, limits)
    if not scheme:
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"{ref!r} is a relative path; workers read absolute paths or http(s) URLs only",
        )
    raise ImageError(
        ErrorCode.UNSUPPORTED_SOURCE,
        f"imgq cannot read {scheme}:// sources; use a local path, file://, http(s):// or s3://",
    )


def load_image(
    ref: str,
    size: tuple[int, int],
    limits: ReadLimits,
    *,
    client: httpx.Client | None = None,
    exact: bool = False,
) -> npt.NDArray[np.uint8]:
    """Read and decode one image reference: read_source then decode_image."""
    data = read_source(ref, limits, client=client)
    return decode_image(data, size, max_pixels=limits.max_pixels, exact=exact)

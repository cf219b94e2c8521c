"""``s3://`` sources to image references: a prefix listed recursively (image objects
by extension), a glob (``s3://bucket/photos/**/*.jpg``), or one object.

Listings stream: objects are listed a page at a time (``LIST_PAGE``, S3's own
maximum of 1,000 keys) and yielded as each page arrives, in S3's key order, so that
what holds the references (the submit) decides how many are in memory. A key with
an image extension is taken as it is, with no request: a missing one gets its
``no_such_key`` record from the worker that reads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import lru_cache

from producer.sources import SourceError
from shared.image_formats import IMAGE_EXTENSIONS
from shared.s3 import S3Error, botocore_errors, parse_s3_url, s3_client, s3_error
from shared.schemas import ImageRef
from shared.settings import Settings, get_settings

LIST_PAGE = 1000
_GLOB_CHARS = "*?["


def expand_s3(
    source: str, *, settings: Settings | None = None, page_size: int = LIST_PAGE
) -> Iterator[ImageRef]:
    """The image references an ``s3://`` source names, as a stream (see the module)."""
    try:
        where = parse_s3_url(source)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    settings = settings or get_settings()
    key = where.key
    glob_at = min((key.index(c) for c in _GLOB_CHARS if c in key), default=-1)
    if glob_at >= 0:
        pattern = glob_regex(key)
        found = False
        for ref in _list(where.bucket, key[:glob_at], settings, page_size):
            if pattern.fullmatch(ref.ref[len(f"s3://{where.bucket}/") :]):
                found = True
                yield ref
        if not found:
            raise SourceError(f"no image object matches {source!r}")
        return
    if not key or key.endswith("/"):
        yield from _list(where.bucket, key, settings, page_size)
        return
    if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS:
        yield ImageRef(src=source, ref=str(where))
        return
    # A name without an image extension: a "folder" when objects lie under it.
    listed = False
    for ref in _list(where.bucket, key + "/", settings, page_size):
        listed = True
        yield ref
    if not listed:
        yield ImageRef(src=source, ref=str(where))


def _list(bucket: str, prefix: str, settings: Settings, page_size: int) -> Iterator[ImageRef]:
    """The image objects under a prefix, recursively, a page at a time."""
    what = f"listing s3://{bucket}/{prefix}"
    try:
        client = s3_client(settings)
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        for page in pages:
            for item in page.get("Contents", ()):
                key = item["Key"]
                if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS:
                    url = f"s3://{bucket}/{key}"
                    yield ImageRef(src=url, ref=url)
    except S3Error as exc:
        raise SourceError(exc.message) from exc
    except Exception as exc:
        if isinstance(exc, botocore_errors()):
            raise SourceError(_listing_hint(s3_error(exc, what))) from exc
        raise


def _listing_hint(error: S3Error) -> str:
    """The listing's error, with what to check for the common ones."""
    hints = {
        "NoSuchBucket": "check the bucket's name and the endpoint (IMGQ_S3_ENDPOINT_URL)",
        "AccessDenied": "the credentials may not list this bucket (s3:ListBucket)",
        "InvalidAccessKeyId": "check the AWS credentials",
        "SignatureDoesNotMatch": "check the AWS secret key",
    }
    hint = hints.get(error.code)
    return f"{error.message}; {hint}" if hint else error.message


@lru_cache(maxsize=64)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A key glob as a regular expression: ``*`` and ``?`` within one path segment,
    ``**`` across segments (``a/**/b`` matches ``a/b`` too), ``[...]`` a class."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)

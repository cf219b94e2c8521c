"""Results exported straight to a bucket (``imgq results JOB --out s3://bucket/key``):
a writable binary stream that uploads as it goes, so an export of any size holds one
part in memory and never touches the local disk.

Up to ``PART_SIZE`` bytes are buffered; a file that stays smaller is one PUT when the
stream closes, a larger one a multipart upload (a part each time the buffer fills,
completed on close, aborted when the export fails, so that no partial object and
no orphaned parts are left).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import click

from shared.s3 import S3Error, S3Url, parse_s3_url, s3_client, s3_error
from shared.settings import Settings, get_settings

# S3's smallest part but the last is 5 MiB; 8 MiB parts reach 80 GB in 10,000 parts.
PART_SIZE = 8 * 1024 * 1024


class S3Writer(io.RawIOBase):
    """A write-only binary stream to one object (see the module)."""

    def __init__(self, url: str, *, settings: Settings | None = None) -> None:
        """Open the object for writing; nothing is sent before PART_SIZE bytes or close()."""
        super().__init__()
        self.where = parse_s3_url(url)
        self._client = s3_client(settings or get_settings())
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.written = 0

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        """Finish the object, or abort the upload when the block raised."""
        if exc is not None:
            self.abort()
        else:
            self.close()

    def writable(self) -> bool:
        """Always: the stream is write-only."""
        return True

    def write(self, data: Any) -> int:
        """Buffer the bytes; upload a part whenever PART_SIZE is reached."""
        if self.closed:
            raise ValueError("write to a closed S3Writer")
        view = memoryview(data).cast("B")
        self._buffer += view
        self.written += len(view)
        while len(self._buffer) >= PART_SIZE:
            self._upload_part(bytes(self._buffer[:PART_SIZE]))
            del self._buffer[:PART_SIZE]
        return len(view)

    def tell(self) -> int:
        """Bytes written so far (pyarrow asks)."""
        return self.written

    def close(self) -> None:
        """Send what is buffered and finish the object."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self._call(
                    "put_object",
                    Bucket=self.where.bucket,
                    Key=self.where.key,
                    Body=bytes(self._buffer),
                )
            else:
                if self._buffer:
                    self._upload_part(bytes(self._buffer))
                self._call(
                    "complete_multipart_upload",
                    Bucket=self.where.bucket,
                    Key=self.where.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            self._buffer.clear()
        except BaseException:
            self.abort()
            raise
        finally:
            super().close()

    def abort(self) -> None:
        """Drop the upload: its parts are deleted, no object is made."""
        if self._upload_id is not None:
            # Best effort: a bucket lifecycle rule cleans up what remains.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self.where.bucket, Key=self.where.key, UploadId=self._upload_id
                )
            self._upload_id = None
        self._buffer.clear()
        if not self.closed:
            super().close()

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            started = self._call(
                "create_multipart_upload", Bucket=self.where.bucket, Key=self.where.key
            )
            self._upload_id = str(started["UploadId"])
        number = len(self._parts) + 1
        answer = self._call(
            "upload_part",
            Bucket=self.where.bucket,
            Key=self.where.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, operation)(**kwargs)
        except S3Error:
            raise
        except Exception as exc:
            raise s3_error(exc, f"writing {self.where}") from exc


def check_s3_out(url: str, *, option: str = "--out") -> S3Url:
    """Refuse an s3:// output before any work starts: no key, a key ending in ``/``,
    an endpoint refused by the guard, or a bucket that cannot be reached."""
    try:
        where = parse_s3_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc
    if not where.key or where.key.endswith("/"):
        raise click.BadParameter(
            f"{url!r} names no object; give a key, like s3://{where.bucket}/results.parquet",
            param_hint=option,
        )
    try:
        s3_client(get_settings()).head_bucket(Bucket=where.bucket)
    except S3Error as exc:
        raise click.BadParameter(exc.message, param_hint=option) from exc
    except Exception as exc:
        error = s3_error(exc, f"s3://{where.bucket}")
        if error.code in ("NotFound", "NoSuchBucket"):
            raise click.BadParameter(
                f"{url!r}: the bucket {where.bucket!r} does not exist", param_hint=option
            ) from exc
        raise click.BadParameter(error.message, param_hint=option) from exc
    return where

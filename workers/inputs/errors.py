"""Per-image failures: the ImageError every input step raises, and its message helpers."""

from __future__ import annotations

from shared.schemas import ErrorCode


class ImageError(Exception):
    """A per-image failure: a stable code and a human-readable message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        """Keep the code and message; str() gives the message."""
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        """Code and message, for logs."""
        return f"ImageError({self.code.value!r}, {self.message!r})"


def too_large(what: str, max_bytes: int) -> ImageError:
    """TOO_LARGE with the limit and the setting that raises it."""
    return ImageError(
        ErrorCode.TOO_LARGE,
        f"{what}, over the {human_size(max_bytes)} limit (IMGQ_MAX_IMAGE_BYTES)",
    )


def human_size(n: int) -> str:
    """A byte count for people."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def describe(exc: BaseException) -> str:
    """A short description of an exception for messages (no object reprs)."""
    text = str(exc)
    if not text or " object at 0x" in text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"

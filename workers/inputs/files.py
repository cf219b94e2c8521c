"""Local files: file:// URLs and absolute paths, read only under the allowed roots."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.schemas import ErrorCode
from workers.inputs.errors import ImageError, human_size, too_large
from workers.inputs.limits import ReadLimits

_READ_CHUNK = 1024 * 1024


def file_url_path(url: str) -> str:
    """The local path named by a file:// URL (host empty or localhost)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"file:// URL names another host ({parts.netloc!r}); use file:///absolute/path",
        )
    path = unquote(parts.path, errors="surrogateescape")
    if not os.path.isabs(path):
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"file:// URL without a path: {url!r}")
    return path


def read_file(path: str, limits: ReadLimits) -> bytes:
    """Read a local file after the allowed-roots, type and size checks."""
    if limits.allowed_roots:
        try:
            real = os.path.realpath(path)
        except (ValueError, OSError) as exc:
            raise ImageError(ErrorCode.NOT_FOUND, f"invalid path {path!r}: {exc}") from exc
        _check_roots(path, real, limits.allowed_roots)
        fd = _open_file(path, real)
    else:  # no roots to enforce: symlinks may go anywhere, skip resolving them
        fd = _open_file(path, path, follow=True)
    try:
        if limits.allowed_roots:
            _check_roots(path, _opened_path(fd) or real, limits.allowed_roots)
        info = os.fstat(fd)
        _check_file_kind(path, info)
        if info.st_size > limits.max_bytes:
            raise too_large(f"the file is {human_size(info.st_size)}", limits.max_bytes)
        data = _read_bounded(fd, limits.max_bytes, info.st_size)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise too_large(f"the file is over {human_size(limits.max_bytes)}", limits.max_bytes)
    if not data:
        raise ImageError(ErrorCode.EMPTY_FILE, f"{path} is empty (0 bytes)")
    return data


def _check_roots(path: str, real: str, roots: tuple[Path, ...]) -> None:
    """Refuse a resolved path outside every allowed root (no check when there are none)."""
    if not roots or any(_is_within(real, root) for root in roots):
        return
    listed = ",".join(str(root) for root in roots)
    raise ImageError(
        ErrorCode.OUTSIDE_ALLOWED_ROOTS,
        f"{path} is outside the allowed roots (symlinks followed, '..' resolved); workers "
        f"read only under IMGQ_ALLOWED_ROOTS={listed}: move the image there or add its "
        "directory to IMGQ_ALLOWED_ROOTS",
    )


def _is_within(real: str, root: Path) -> bool:
    """True when the resolved path is the resolved root or lies below it."""
    try:
        resolved_root = os.path.realpath(root)
    except (ValueError, OSError):
        return False
    return Path(real).is_relative_to(resolved_root)


def _open_file(path: str, real: str, *, follow: bool = False) -> int:
    """Open the resolved path read-only, without blocking on FIFOs or following a new symlink."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(real, flags)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ImageError(ErrorCode.NOT_FOUND, f"invalid path {path!r}: {exc}") from exc


def _opened_path(fd: int) -> str | None:
    """The path the kernel reports for an open descriptor (Linux), to re-check the roots."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _check_file_kind(path: str, info: os.stat_result) -> None:
    """Refuse directories and anything that is not a regular file."""
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(ErrorCode.IS_DIRECTORY, f"{path} is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"{path} is not a regular file (a device, FIFO or socket); give an image file",
        )


def _read_bounded(fd: int, max_bytes: int, expected: int = _READ_CHUNK) -> bytes:
    """Read until end of file or one byte past max_bytes, whichever comes first.

    The first read asks for the size stat reported (plus one byte, to see the end):
    os.read allocates what it is asked for, and most images are far below 1 MiB.
    """
    chunks: list[bytes] = []
    total = 0
    want = max(1, min(expected + 1, _READ_CHUNK))
    while total <= max_bytes:
        chunk = os.read(fd, min(want, max_bytes + 1 - total))
        want = _READ_CHUNK
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _os_error(path: str, exc: OSError) -> ImageError:
    """The ImageError for a failed open/stat/read of a local file."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return ImageError(ErrorCode.NOT_FOUND, f"no such file: {path}")
    if isinstance(exc, IsADirectoryError):
        return ImageError(ErrorCode.IS_DIRECTORY, f"{path} is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return ImageError(
            ErrorCode.PERMISSION_DENIED,
            f"the worker may not read {path} (permission denied): make it readable by the "
            "user the workers run as",
        )
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):  # the path cannot name a file
        return ImageError(ErrorCode.NOT_FOUND, f"cannot open {path}: {reason}")
    return ImageError(ErrorCode.FETCH_FAILED, f"could not read {path}: {reason}")

"""The image input layer: read an image reference (path or URL) and decode it for a model.

No TensorFlow here: Pillow decodes, numpy hands the pixels over, httpx fetches URLs.
Every per-image failure is raised as :class:`ImageError` with a stable :class:`ErrorCode`.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import os
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from shared.schemas import ErrorCode
from shared.settings import Settings

try:  # libjpeg-turbo with little Python per image; Pillow decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - the worker extra installs it
    simplejpeg = None

T = TypeVar("T")

# Formats imgq decodes. Others (EPS, which runs Ghostscript; PSD; exotic scientific
# formats) are refused as NOT_AN_IMAGE: less attack surface for untrusted input.
SUPPORTED_FORMATS: tuple[str, ...] = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "TIFF",
    "BMP",
    "AVIF",
    "ICO",
    "PPM",
)
# Unambiguous signatures of supported formats: data that starts like one of these
# but that Pillow cannot open is a broken file (TRUNCATED), not a non-image.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# Errors Pillow raises while reading pixel data of a broken (truncated/corrupt) file.
_CORRUPT_ERRORS: tuple[type[Exception], ...] = (EOFError, SyntaxError, struct.error, zlib.error)
_CORRUPT_HINTS = (
    "truncated",
    "broken",
    "corrupt",
    "premature",
    "decoding error",
    "buffer overrun",
    "unrecognized data stream",
    "not enough image data",
    "failed to read next frame",
    "decoder error -1",
    "decoder error -2",
    "decoder error -3",
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 1024 * 1024
_REQUEST_HEADERS = {"Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}


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


@dataclass(frozen=True)
class ReadLimits:
    """What a worker may read and how much: roots, byte/pixel caps, URL fetch policy."""

    allowed_roots: tuple[Path, ...]
    max_bytes: int
    max_pixels: int
    fetch_timeout: float
    max_redirects: int
    allow_private_urls: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        """The limits configured by IMGQ_* settings."""
        return cls(
            allowed_roots=tuple(settings.allowed_roots),
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout=settings.fetch_timeout,
            max_redirects=settings.fetch_max_redirects,
            allow_private_urls=settings.allow_private_urls,
        )


# --------------------------------------------------------------------------- reading


def read_source(ref: str, limits: ReadLimits, *, client: httpx.Client | None = None) -> bytes:
    """The bytes of a local absolute path, a file:// URL or an http(s) URL."""
    try:
        scheme = urlsplit(ref).scheme.lower()
    except ValueError as exc:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"not a valid URL or path: {exc}") from exc
    if scheme in ("http", "https"):
        return _fetch_url(ref, limits, client)
    if scheme == "file":
        return _read_file(_file_url_path(ref), limits)
    if not scheme and os.path.isabs(ref):
        return _read_file(ref, limits)
    if not scheme:
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"{ref!r} is a relative path; workers read absolute paths or http(s) URLs only",
        )
    raise ImageError(
        ErrorCode.UNSUPPORTED_SOURCE,
        f"imgq cannot read {scheme}:// sources; use a local path, file://, http:// or https://",
    )


def _file_url_path(url: str) -> str:
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


def _read_file(path: str, limits: ReadLimits) -> bytes:
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
            raise _too_large(f"the file is {_size(info.st_size)}", limits.max_bytes)
        data = _read_bounded(fd, limits.max_bytes, info.st_size)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise _too_large(f"the file is over {_size(limits.max_bytes)}", limits.max_bytes)
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


def _too_large(what: str, max_bytes: int) -> ImageError:
    """TOO_LARGE with the limit and the setting that raises it."""
    return ImageError(
        ErrorCode.TOO_LARGE,
        f"{what}, over the {_size(max_bytes)} limit (IMGQ_MAX_IMAGE_BYTES)",
    )


def _size(n: int) -> str:
    """A byte count for people."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


# ------------------------------------------------------------------------------ URLs


def _fetch_url(url: str, limits: ReadLimits, client: httpx.Client | None) -> bytes:
    """Fetch a URL within limits.fetch_timeout overall (DNS, connect, redirects, body)."""
    deadline = time.monotonic() + limits.fetch_timeout
    cancel = threading.Event()

    def fetch() -> bytes:
        if client is not None:
            return _fetch_guarded(url, limits, client, deadline, cancel)
        with httpx.Client(follow_redirects=False) as own:
            return _fetch_guarded(url, limits, own, deadline, cancel)

    return _run_until(fetch, deadline, cancel, limits.fetch_timeout)


def _run_until(fn: Callable[[], T], deadline: float, cancel: threading.Event, limit: float) -> T:
    """Run fn in a helper thread; give up with FETCH_TIMEOUT at the deadline."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=target, name="imgq-fetch", daemon=True).start()
    wait([future], timeout=max(0.0, deadline - time.monotonic()))
    if not future.done():
        cancel.set()  # the helper stops at its next chunk; its sockets time out on their own
        raise _timeout(limit)
    return future.result()


def _timeout(limit: float) -> ImageError:
    """FETCH_TIMEOUT naming the limit and its setting."""
    return ImageError(
        ErrorCode.FETCH_TIMEOUT,
        f"the fetch did not finish within {limit:g} s (IMGQ_FETCH_TIMEOUT); the server is "
        "slow or unreachable",
    )


def _fetch_guarded(
    url: str, limits: ReadLimits, client: httpx.Client, deadline: float, cancel: threading.Event
) -> bytes:
    """Follow redirects and read the body, turning every failure into an ImageError."""
    try:
        return _follow(url, limits, client, deadline, cancel)
    except ImageError:
        raise
    except httpx.TimeoutException as exc:
        raise _timeout(limits.fetch_timeout) from exc
    except httpx.InvalidURL as exc:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"not a valid URL: {exc}") from exc
    except httpx.ConnectError as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, f"could not connect: {_describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, f"the download failed: {_describe(exc)}") from exc
    except Exception as exc:  # never let a per-image fetch problem escape as another type
        raise ImageError(ErrorCode.FETCH_FAILED, f"the download failed: {_describe(exc)}") from exc


def _follow(
    url: str, limits: ReadLimits, client: httpx.Client, deadline: float, cancel: threading.Event
) -> bytes:
    """GET the URL, following up to max_redirects redirects by hand."""
    current = _http_url(url)
    for _ in range(limits.max_redirects + 1):
        try:
            result = _get_once(current, limits, client, deadline, cancel)
        except httpx.ConnectError as exc:
            raise ImageError(
                ErrorCode.FETCH_FAILED, f"could not connect to {current.host}: {_describe(exc)}"
            ) from exc
        if isinstance(result, bytes):
            return result
        current = _http_url(str(result))
    raise ImageError(
        ErrorCode.FETCH_FAILED,
        f"too many redirects (more than {limits.max_redirects}, IMGQ_FETCH_MAX_REDIRECTS)",
    )


def _http_url(text: str) -> httpx.URL:
    """Parse an http(s) URL with a host; anything else is UNSUPPORTED_SOURCE."""
    url = httpx.URL(text)
    if url.scheme not in ("http", "https"):
        raise ImageError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"imgq cannot read {url.scheme or 'scheme-less'}:// sources (redirected or given)",
        )
    if not url.host:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"URL without a host: {text!r}")
    return url


def _get_once(
    url: httpx.URL,
    limits: ReadLimits,
    client: httpx.Client,
    deadline: float,
    cancel: threading.Event,
) -> bytes | httpx.URL:
    """One GET: the body, or the URL a redirect points to."""
    if limits.allow_private_urls:
        return _request(url, url, limits, client, deadline, cancel)
    addresses = _public_addresses(url)
    if url.scheme == "https":  # TLS checks the name: a rebound address cannot pass for it
        return _request(url, url, limits, client, deadline, cancel)
    last: httpx.ConnectError | None = None
    for address in addresses:  # plain http: connect to the checked address, no second lookup
        try:
            return _request(url, url.copy_with(host=address), limits, client, deadline, cancel)
        except httpx.ConnectError as exc:
            last = exc
    assert last is not None  # _public_addresses never returns an empty list
    raise last


def _request(
    url: httpx.URL,
    target: httpx.URL,
    limits: ReadLimits,
    client: httpx.Client,
    deadline: float,
    cancel: threading.Event,
) -> bytes | httpx.URL:
    """Send one GET to target (url, or url pinned to an address) and read the answer."""
    remaining = _remaining(deadline, limits.fetch_timeout)
    headers = dict(_REQUEST_HEADERS)
    if target != url:
        headers["Host"] = url.netloc.decode("ascii")
    with client.stream(
        "GET", target, headers=headers, timeout=httpx.Timeout(remaining), follow_redirects=False
    ) as response:
        if response.status_code in _REDIRECTS:
            return _redirect_target(url, response)
        _check_status(url, response)
        return _read_body(response, limits, deadline, cancel)


def _remaining(deadline: float, limit: float) -> float:
    """Seconds left before the deadline; FETCH_TIMEOUT when none."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(limit)
    return remaining


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL:
    """Where a redirect response points, resolved against the URL that was asked for."""
    location = response.headers.get("location")
    if not location:
        raise ImageError(
            ErrorCode.FETCH_FAILED,
            f"HTTP {response.status_code} redirect without a Location header from {url.host}",
        )
    return url.join(location)


def _check_status(url: httpx.URL, response: httpx.Response) -> None:
    """FETCH_FAILED for any final status other than 2xx."""
    status = response.status_code
    if 200 <= status < 300:
        return
    reason = response.reason_phrase or "error"
    raise ImageError(
        ErrorCode.FETCH_FAILED,
        f"the server answered HTTP {status} {reason} for {url.host}{url.path}",
    )


def _read_body(
    response: httpx.Response, limits: ReadLimits, deadline: float, cancel: threading.Event
) -> bytes:
    """Stream the body with a byte cap and the overall deadline."""
    declared = _content_length(response)
    if declared is not None and declared > limits.max_bytes:
        raise _too_large(f"the server declares {_size(declared)}", limits.max_bytes)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limits.max_bytes:
            raise _too_large(f"the download is over {_size(limits.max_bytes)}", limits.max_bytes)
        if cancel.is_set() or time.monotonic() > deadline:
            raise _timeout(limits.fetch_timeout)
    if not body:
        raise ImageError(ErrorCode.EMPTY_FILE, "the server returned an empty body")
    return bytes(body)


def _content_length(response: httpx.Response) -> int | None:
    """The declared Content-Length, or None when absent or malformed."""
    value = response.headers.get("content-length", "")
    return int(value) if value.strip().isdigit() else None


def _is_ip_literal(host: str) -> bool:
    """True when the host is an IPv4/IPv6 address, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _public_addresses(url: httpx.URL) -> list[str]:
    """The host's addresses, refusing (URL_REFUSED) when any is not a public one."""
    host = url.host
    literal = _is_ip_literal(host)
    addresses = [host] if literal else _resolve(url)
    for address in addresses:
        problem = _address_problem(ipaddress.ip_address(address))
        if problem:
            where = host if literal else f"{host} (it resolves to {address})"
            raise ImageError(
                ErrorCode.URL_REFUSED,
                f"refused to fetch from {where}: a {problem} address; set "
                "IMGQ_ALLOW_PRIVATE_URLS=true on the workers to fetch from private networks",
            )
    return addresses


def _resolve(url: httpx.URL) -> list[str]:
    """All addresses of the URL's host (socket.getaddrinfo), in the resolver's order."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, f"could not resolve host {host}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise ImageError(ErrorCode.FETCH_FAILED, f"host {host} has no addresses")
    return addresses


def _address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be fetched from ('loopback', 'private' ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _address_problem(embedded)
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


# ---------------------------------------------------------------------------- decoding


def decode_image(data: bytes, size: tuple[int, int], *, max_pixels: int) -> npt.NDArray[np.float32]:
    """Decode image bytes to float32 RGB of shape (height, width, 3) in [0, 1]."""
    height, width = _target_size(size)
    if not data:
        raise ImageError(ErrorCode.EMPTY_FILE, "the image data is empty (0 bytes)")
    try:
        fast = _decode_jpeg_fast(data, height, width, max_pixels)
        return fast if fast is not None else _decode(data, height, width, max_pixels)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(str(exc), max_pixels) from exc
    except Exception as exc:
        raise ImageError(
            ErrorCode.DECODE_FAILED, f"could not decode the image: {_describe(exc)}"
        ) from exc


def load_image(
    ref: str, size: tuple[int, int], limits: ReadLimits, *, client: httpx.Client | None = None
) -> npt.NDArray[np.float32]:
    """Read and decode one image reference: read_source then decode_image."""
    data = read_source(ref, limits, client=client)
    return decode_image(data, size, max_pixels=limits.max_pixels)


def _target_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate (height, width); a bad size is a caller bug (ValueError), not an image error."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    return int(height), int(width)


def _decode_jpeg_fast(
    data: bytes, height: int, width: int, max_pixels: int
) -> npt.NDArray[np.float32] | None:
    """Plain JPEGs straight through libjpeg-turbo (simplejpeg): header, DCT-domain
    downscale and decode in C, with little Python per image. None when the data is
    anything else (CMYK, odd EXIF, a decoder complaint): the Pillow path then decides,
    and gives the precise error code for broken data."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    if w * h > max_pixels:
        raise _bomb((w, h), max_pixels)
    orientation = _jpeg_orientation(data)
    if orientation is None:
        return None
    stored = _stored_size(height, width, orientation)
    try:
        # Decoded at 1/2, 1/4 or 1/8 scale while staying >= the target size.
        array = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=stored[0], min_height=stored[1], strict=True
        )
    except ValueError:
        return None
    if (array.shape[1], array.shape[0]) != stored or orientation != 1:
        upright = _transposed(_resized(Image.fromarray(array), stored), orientation)
        array = np.asarray(upright)
    out = array.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of a JPEG (1 without EXIF), or None when the EXIF block
    cannot be read with certainty (the Pillow path then takes the image)."""
    pos = 2
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before it
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            return _tiff_orientation(segment[6:])
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of IFD0 of a TIFF structure (an EXIF block); 1 when absent."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _decode(data: bytes, height: int, width: int, max_pixels: int) -> npt.NDArray[np.float32]:
    """Open, check, decode, convert, resize and orient one image."""
    with _open(data) as im:  # closing the file also frees im: finish inside the block
        if im.width * im.height > max_pixels:
            raise _bomb(im.size, max_pixels)
        if im.format in _JPEG_FORMATS:  # JPEG EXIF is in the header: no decoding to read it
            _draft(im, _stored_size(height, width, _orientation(im)))
        _load(im)
        orientation = _orientation(im)  # after load: PNG may keep EXIF after the pixel data
        stored = _stored_size(height, width, orientation)
        upright = _transposed(_resized(_normalized(im), stored), orientation)
        return np.asarray(_flattened(upright), dtype=np.float32) / np.float32(255.0)


@cache
def _formats() -> tuple[str, ...]:
    """The supported formats this Pillow build can open."""
    Image.init()
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)


def _open(data: bytes) -> Image.Image:
    """Identify the image (header only); NOT_AN_IMAGE or TRUNCATED when that fails."""
    try:
        return Image.open(io.BytesIO(data), formats=_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        known = _sniff(data)
        if known or (not isinstance(exc, UnidentifiedImageError) and _is_corrupt(exc)):
            what = f"a {known} file" if known else "an image file"
            raise ImageError(
                ErrorCode.TRUNCATED,
                f"the data starts like {what} but is truncated or corrupt ({_describe(exc)}); "
                "re-export or re-download the image",
            ) from exc
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(
                ErrorCode.NOT_AN_IMAGE,
                f"not an image imgq can read (data starts with {data[:16]!r}); "
                f"supported formats: {', '.join(_formats())}",
            ) from exc
        raise


def _sniff(data: bytes) -> str | None:
    """The supported format an unambiguous signature names, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _bomb(size: tuple[int, int] | str, max_pixels: int) -> ImageError:
    """DECOMPRESSION_BOMB naming the size (or Pillow's words), the limit and its setting."""
    if isinstance(size, str):
        what = f"the image is too large to decode safely ({size})"
    else:
        what = f"the image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    return ImageError(
        ErrorCode.DECOMPRESSION_BOMB,
        f"{what}; the limit is {max_pixels:,} pixels (IMGQ_MAX_IMAGE_PIXELS, and Pillow "
        "refuses more than twice PIL.Image.MAX_IMAGE_PIXELS): raise IMGQ_MAX_IMAGE_PIXELS "
        "if such images are legitimate",
    )


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _stored_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """The (width, height) to resize the stored image to, before the EXIF transpose."""
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _draft(im: Image.Image, stored: tuple[int, int]) -> None:
    """Let libjpeg decode a big JPEG at 1/2, 1/4 or 1/8 scale, keeping >= 2x the target."""
    im.draft(None, (stored[0] * 2, stored[1] * 2))


def _load(im: Image.Image) -> None:
    """Decode the pixel data of the first frame; TRUNCATED for broken data."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        if _is_corrupt(exc):
            raise ImageError(
                ErrorCode.TRUNCATED,
                f"the {im.format or 'image'} data ends early or is corrupt ({_describe(exc)}); "
                "re-export or re-download the image",
            ) from exc
        raise


def _is_corrupt(exc: Exception) -> bool:
    """True for the errors Pillow raises on truncated or corrupt pixel data."""
    if isinstance(exc, _CORRUPT_ERRORS):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError | ValueError) and any(hint in text for hint in _CORRUPT_HINTS)


def _normalized(im: Image.Image) -> Image.Image:
    """The image as L, RGB or RGBA (8 bits per channel), keeping transparency as alpha."""
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" not in im.info:
        return im
    if mode.startswith("I"):
        return _from_array(_scale_16bit(np.asarray(im)))
    if mode == "F":
        return _from_array(_scale_float(np.asarray(im)))
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")


def _scale_16bit(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """16-bit (or int32 holding 16-bit) samples scaled 0..65535 -> 0..255 with rounding."""
    wide = np.clip(array.astype(np.float64), 0, 65535)
    return np.rint(wide * (255.0 / 65535.0)).astype(np.uint8)


def _scale_float(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Float samples to 0..255: [0, 1] data is scaled, anything else is taken as 0..255."""
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


def _from_array(array: npt.NDArray[np.uint8]) -> Image.Image:
    """An L image from a 2-D uint8 array."""
    return Image.fromarray(np.ascontiguousarray(array))


def _resized(im: Image.Image, stored: tuple[int, int]) -> Image.Image:
    """Stretch to (width, height) with bilinear resampling (no crop)."""
    if im.size == stored:
        return im
    return im.resize(stored, Image.Resampling.BILINEAR)


def _transposed(im: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation (same transposes as ImageOps.exif_transpose)."""
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def _flattened(im: Image.Image) -> Image.Image:
    """RGB: gray expanded, alpha composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def _describe(exc: BaseException) -> str:
    """A short description of an exception for messages (no object reprs)."""
    text = str(exc)
    if not text or " object at 0x" in text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"

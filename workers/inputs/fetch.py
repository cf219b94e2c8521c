"""URL fetching: http(s) within a byte cap and an overall deadline, with the
private-address guard."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TypeVar

import httpx

from shared.schemas import ErrorCode
from shared.urlguard import AddressRefused, ResolveError, public_addresses
from workers.inputs.errors import ImageError, describe, human_size, too_large
from workers.inputs.limits import ReadLimits

T = TypeVar("T")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REQUEST_HEADERS = {"Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}


def fetch_url(url: str, limits: ReadLimits, client: httpx.Client | None) -> bytes:
    """Fetch a URL within limits.fetch_timeout overall (DNS, connect, redirects, body)."""
    deadline = time.monotonic() + limits.fetch_timeout
    cancel = threading.Event()

    def fetch() -> bytes:
        if client is not None:
            return _fetch_guarded(url, limits, client, deadline, cancel)
        with httpx.Client(follow_redirects=False) as own:
            return _fetch_guarded(url, limits, own, deadline, cancel)

    return run_until(fetch, deadline, cancel, limits.fetch_timeout)


def run_until(fn: Callable[[], T], deadline: float, cancel: threading.Event, limit: float) -> T:
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
        raise fetch_timeout(limit)
    return future.result()


def fetch_timeout(limit: float) -> ImageError:
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
        raise fetch_timeout(limits.fetch_timeout) from exc
    except httpx.InvalidURL as exc:
        raise ImageError(ErrorCode.UNSUPPORTED_SOURCE, f"not a valid URL: {exc}") from exc
    except httpx.ConnectError as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, f"could not connect: {describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, f"the download failed: {describe(exc)}") from exc
    except Exception as exc:  # never let a per-image fetch problem escape as another type
        raise ImageError(ErrorCode.FETCH_FAILED, f"the download failed: {describe(exc)}") from exc


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
                ErrorCode.FETCH_FAILED, f"could not connect to {current.host}: {describe(exc)}"
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
        raise fetch_timeout(limit)
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
        raise too_large(f"the server declares {human_size(declared)}", limits.max_bytes)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limits.max_bytes:
            raise too_large(
                f"the download is over {human_size(limits.max_bytes)}", limits.max_bytes
            )
        if cancel.is_set() or time.monotonic() > deadline:
            raise fetch_timeout(limits.fetch_timeout)
    if not body:
        raise ImageError(ErrorCode.EMPTY_FILE, "the server returned an empty body")
    return bytes(body)


def _content_length(response: httpx.Response) -> int | None:
    """The declared Content-Length, or None when absent or malformed."""
    value = response.headers.get("content-length", "")
    return int(value) if value.strip().isdigit() else None


def _public_addresses(url: httpx.URL) -> list[str]:
    """The host's addresses, refusing (URL_REFUSED) when any is not a public one."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        return public_addresses(url.raw_host.decode("ascii"), port)
    except AddressRefused as exc:
        raise ImageError(
            ErrorCode.URL_REFUSED,
            f"refused to fetch from {exc}; set "
            "IMGQ_ALLOW_PRIVATE_URLS=true on the workers to fetch from private networks",
        ) from exc
    except ResolveError as exc:
        raise ImageError(ErrorCode.FETCH_FAILED, str(exc)) from exc

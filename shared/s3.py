"""Object storage (S3 and S3-compatible stores: MinIO, Ceph ...), for both sides: the
producer lists prefixes and writes exports there, workers read objects.

One library, boto3 (the ``s3`` extra; why in docs/benchmarks.md). Credentials come
from the standard AWS chain (environment, ``~/.aws`` config and credentials files,
SSO, container and instance roles) and are never read, logged or stored by imgq:
job records hold ``s3://bucket/key`` and nothing else. The endpoint is AWS's unless
``IMGQ_S3_ENDPOINT_URL`` (or AWS's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)
names another; a custom endpoint on a loopback, private or link-local address is
refused unless ``IMGQ_ALLOW_PRIVATE_URLS=true``, the guard image URLs get. boto3
follows no HTTP redirect (``Location``): a 3xx answer from a custom endpoint is an
error, never a request to another host.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shared.urlguard import AddressRefused, ResolveError, public_addresses

if TYPE_CHECKING:
    from shared.settings import Settings

SCHEME = "s3://"
INSTALL_HINT = "s3:// sources and outputs need boto3: pip install 'imgq[s3]'"


class S3Error(Exception):
    """An object storage operation failed; ``code`` is S3's error code when the server
    gave one (NoSuchKey, NoSuchBucket, AccessDenied, SlowDown ...), else a short name
    of the failure (``refused``, ``endpoint``, ``credentials``, ``connection``)."""

    def __init__(self, code: str, message: str) -> None:
        """Keep the code; str() gives the message."""
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``: a bucket and a key (or a key prefix, or a glob)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        """The URL again."""
        return f"{SCHEME}{self.bucket}/{self.key}"


def is_s3_url(text: str) -> bool:
    """True for ``s3://...`` (any case of the scheme)."""
    return text[:5].lower() == SCHEME


def parse_s3_url(text: str) -> S3Url:
    """The bucket and key of ``s3://bucket/key``; ValueError for anything else."""
    if not is_s3_url(text):
        raise ValueError(f"{text!r} is not an s3:// URL")
    rest = text[5:]
    bucket, _, key = rest.partition("/")
    if not bucket or any(c in bucket for c in "?#*[ ") or "@" in bucket:
        raise ValueError(f"{text!r}: no valid bucket name after s3://")
    return S3Url(bucket, key)


def endpoint_url(settings: Settings) -> str | None:
    """The S3 endpoint to use: IMGQ_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL, else None (AWS's own endpoints)."""
    for value in (
        settings.s3_endpoint_url,
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
    ):
        if value:
            return value.rstrip("/")
    return None


def check_endpoint(endpoint: str | None, *, allow_private: bool) -> None:
    """S3Error('refused') when a custom endpoint's host is, or resolves to, an address
    that is not public and private addresses are not allowed; S3Error('endpoint') when
    it is no http(s) URL or its host does not resolve."""
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise S3Error("endpoint", f"the S3 endpoint {endpoint!r} is not an http(s) URL")
    if allow_private:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        public_addresses(parts.hostname, port)
    except AddressRefused as exc:
        raise S3Error(
            "refused",
            f"refused to use the S3 endpoint {exc}; set IMGQ_ALLOW_PRIVATE_URLS=true to "
            "use a store on a private network",
        ) from exc
    except ResolveError as exc:
        raise S3Error("endpoint", f"the S3 endpoint: {exc}") from exc


_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client(
    settings: Settings,
    *,
    timeout: float | None = None,
    max_attempts: int | None = None,
    pool: int = 16,
) -> Any:
    """A boto3 S3 client for the configured endpoint, built once per process and
    options (boto3 clients are thread-safe). The endpoint is checked against the
    private-address guard when its client is built (a refusal builds none, so the
    next call checks again), not on every call: a worker calls this once per object,
    and the check resolves the endpoint's name. ``timeout``: connect and read timeout
    in seconds."""
    try:
        import boto3
        import botocore.config
    except ImportError:
        raise S3Error("missing", INSTALL_HINT) from None
    endpoint = endpoint_url(settings)
    # botocore's "standard" retry mode: throttling (503 SlowDown, 429), 500/502/504 and
    # connection errors are retried with exponential backoff and full jitter (a random
    # wait up to 1 s, 2 s, 4 s ... capped at 20 s), IMGQ_S3_MAX_ATTEMPTS tries in all.
    attempts = max_attempts or settings.s3_max_attempts
    key = (endpoint, settings.allow_private_urls, timeout, attempts, pool, os.getpid())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            check_endpoint(endpoint, allow_private=settings.allow_private_urls)
            config = botocore.config.Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                max_pool_connections=pool,
                connect_timeout=timeout if timeout is not None else 60,
                read_timeout=timeout if timeout is not None else 60,
                s3={"addressing_style": "path" if endpoint else "auto"},
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=config)
            if endpoint:
                client.meta.events.register_first("needs-retry.s3", _no_redirect)
            _clients[key] = client
        return client


def _no_redirect(request_dict: dict[str, Any], response: Any, **_: Any) -> None:
    """Keep botocore's region redirector from re-sending a request a custom endpoint
    answered with a 3xx (it would ask the endpoint for the bucket's region, be
    redirected again, and recurse): the answer stays an error. On AWS itself the
    redirector stays: it sends the request to the bucket region's AWS endpoint,
    never to a Location header."""
    status = getattr(response[0], "status_code", 0) if response else 0
    if 300 <= status < 400:
        request_dict.setdefault("context", {}).setdefault("s3_redirect", {})["redirected"] = True


def s3_error(exc: BaseException, what: str) -> S3Error:
    """An S3Error for what botocore raised during ``what`` (``reading s3://b/k``):
    the server's error code when it gave one, a one-line message without secrets."""
    import botocore.exceptions as bx

    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if 300 <= int(status or 0) < 400:
            return S3Error(
                "Redirect",
                f"{what}: the store answered HTTP {status}, a redirect, which imgq does not "
                "follow (check the endpoint, IMGQ_S3_ENDPOINT_URL, and the bucket's region)",
            )
        if not code or code.isdigit():
            code = _CODE_OF_STATUS.get(int(status or 0), f"HTTP{status}")
        detail = str(error.get("Message") or "").strip()
        retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        after = f" (after {retries} retries)" if retries else ""
        text = f"{what}: {code}{': ' + detail if detail else ''} (HTTP {status}){after}"
        return S3Error(code, text)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return S3Error(
            "credentials",
            f"{what}: no AWS credentials found (environment, ~/.aws files, or an "
            "instance or container role)",
        )
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectTimeoutError):
        return S3Error("timeout", f"{what}: the S3 endpoint did not answer in time")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError):
        return S3Error("connection", f"{what}: could not connect to the S3 endpoint")
    if isinstance(exc, bx.BotoCoreError):
        return S3Error("error", f"{what}: {type(exc).__name__}: {exc}")
    return S3Error("error", f"{what}: {type(exc).__name__}: {exc}")


# S3 answers HEAD requests without a body: the status is all there is.
_CODE_OF_STATUS = {403: "AccessDenied", 404: "NotFound", 503: "SlowDown"}


def botocore_errors() -> tuple[type[BaseException], ...]:
    """The exception types botocore raises (for except clauses); empty without boto3."""
    try:
        import botocore.exceptions as bx
    except ImportError:
        return ()
    return (bx.BotoCoreError, bx.ClientError)

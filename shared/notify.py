"""Completion callbacks: one signed JSON POST to a job's ``--notify`` URL when it ends.

Whichever process sees the end first (the worker that records the last task, or a
waiting producer) claims the job's ``imgq:job:<id>:notified`` key with SET NX; only
the claimant sends, from a background thread, retrying with exponential backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from shared.jobs import JobStatus, JobStore
from shared.settings import Settings, get_settings
from shared.urlguard import AddressRefused, ResolveError, public_addresses

log = logging.getLogger(__name__)

EndState = Literal["finished", "failed", "cancelled"]
END_STATES: tuple[str, ...] = ("finished", "failed", "cancelled")
SIGNATURE_HEADER = "X-Imgq-Signature"
TIMESTAMP_HEADER = "X-Imgq-Timestamp"
# The URL is kept in the job's record hash under this field.
NOTIFY_FIELD = "notify"
_SEND_TIMEOUT_S = 10.0


class NotifyError(ValueError):
    """A notify URL imgq will not POST to."""


def check_notify_url(url: str, *, allow_private: bool) -> str:
    """The URL when imgq may POST to it; a NotifyError saying why not."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise NotifyError(f"--notify {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise NotifyError(f"--notify {url!r} must be an http:// or https:// URL with a host")
    if not allow_private:
        _addresses(parsed)
    return url


def _addresses(url: httpx.URL) -> list[str]:
    """The URL host's public addresses; a NotifyError for a private one or no answer."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        return public_addresses(url.raw_host.decode("ascii"), port)
    except AddressRefused as exc:
        raise NotifyError(
            f"refused to notify {exc}; set IMGQ_ALLOW_PRIVATE_URLS=true to allow private networks"
        ) from exc
    except ResolveError as exc:
        raise NotifyError(f"--notify: {exc}") from exc


def end_state(status: JobStatus) -> EndState | None:
    """'finished' when every task ended, 'failed' if moreover no image was classified; else None."""
    if not status.finished:
        return None
    done = sum(c.done for c in status.models.values())
    return "failed" if done == 0 and status.images_total > 0 else "finished"


def payload(status: JobStatus, state: str, name: str | None) -> dict[str, Any]:
    """The JSON document a callback carries."""
    models = {m: c.as_dict() for m, c in status.models.items()}
    doc: dict[str, Any] = {
        "event": f"job.{state}",
        "job_id": status.job.job_id,
        "state": state,
        "models": models,
        "totals": {
            key: sum(c[key] for c in models.values())
            for key in ("total", "done", "failed", "pending")
        },
        "created_at": _iso(status.job.created),
        "finished_at": _iso(time.time()),
    }
    if name:
        doc["name"] = name
    return doc


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def notify_if_ended(store: JobStore, job_id: str, settings: Settings | None = None) -> bool:
    """Send the job's callback when it has a notify URL and every task ended; True if sent."""
    key = f"imgq:job:{job_id}"
    if not store.client.hexists(key, NOTIFY_FIELD):
        return False  # most jobs: one cheap read per task, nothing more
    record = store.get(job_id)
    if store.client.hlen(f"{key}:done") < record.n_chunks * len(record.models):
        return False
    state = end_state(store.status(job_id))
    if state is None:
        return False
    return notify_job_end(store, job_id, state, settings) is not None


def notify_job_end(
    store: JobStore, job_id: str, state: str, settings: Settings | None = None
) -> threading.Thread | None:
    """Post the callback of a job that ended in ``state`` (finished, failed or cancelled),
    once per job across all processes; the sending thread, or None (no URL, or claimed).
    """
    if state not in END_STATES:
        raise ValueError(f"state must be one of {', '.join(END_STATES)}, not {state!r}")
    key = f"imgq:job:{job_id}"
    raw = store.client.hmget(key, [NOTIFY_FIELD, "name"])
    url, name = (None if v is None else v.decode() for v in raw)  # type: ignore[union-attr]
    if not url:
        return None
    settings = settings or get_settings()
    try:
        # A process whose settings refuse the URL leaves the claim to one that can send.
        check_notify_url(url, allow_private=settings.allow_private_urls)
    except NotifyError as exc:
        log.error("job %s: completion callback not claimed here: %s", job_id, exc)
        return None
    # The claim expires with the job: once claimed, no other process sends.
    if not store.client.set(f"{key}:notified", state, nx=True, ex=store.ttl):
        return None
    body = json.dumps(payload(store.status(job_id), state, name)).encode()
    # Not a daemon: a process that exits normally finishes its tries first.
    thread = threading.Thread(
        target=send, args=(url, body, settings), name=f"imgq-notify-{job_id}", daemon=False
    )
    thread.start()
    return thread


def send(url: str, body: bytes, settings: Settings) -> bool:
    """POST body to url, retrying connection errors, 429 and 5xx with backoff; True on 2xx."""
    delay = settings.notify_backoff
    for attempt in range(1, settings.notify_tries + 1):
        try:
            status = _post_once(url, body, settings)
        except NotifyError as exc:
            log.error("completion callback not sent: %s", exc)
            return False
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= status < 300:
                log.info("completion callback to %s answered %d", _where(url), status)
                return True
            if status != 429 and status < 500:
                log.error("completion callback to %s refused: HTTP %d", _where(url), status)
                return False
            problem = f"HTTP {status}"
        if attempt < settings.notify_tries:
            log.warning(
                "completion callback to %s: %s; try %d of %d in %.1f s",
                _where(url),
                problem,
                attempt + 1,
                settings.notify_tries,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    log.error("completion callback to %s given up after %d tries", _where(url), attempt)
    return False


def _post_once(url: str, body: bytes, settings: Settings) -> int:
    """One POST; the HTTP status. The address is checked (and for http, pinned) each time."""
    target = httpx.URL(url)
    headers = {"Content-Type": "application/json", "User-Agent": "imgq-notify"}
    if settings.notify_secret:
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = sign(settings.notify_secret, timestamp, body)
    if not settings.allow_private_urls:
        addresses = _addresses(target)
        if target.scheme == "http":  # connect to the checked address, no second lookup
            headers["Host"] = target.netloc.decode("ascii")
            target = target.copy_with(host=addresses[0])
    with httpx.Client(timeout=_SEND_TIMEOUT_S, follow_redirects=False) as client:
        return client.post(target, content=body, headers=headers).status_code


def _where(url: str) -> str:
    """The URL without its query (which may hold a token), for logs."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.path}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

"""Completion callbacks: a signed JSON POST to a job's ``--notify`` URL when it ends,
delivered at least once.

Whichever process sees the end first (the worker that records the last task, a
waiting producer, the cancel) takes the job's lease (``keys.job_callback_lease``, SET
NX PX, ``IMGQ_HEARTBEAT_TIMEOUT`` long) and sends from a background thread, renewing
the lease every ``IMGQ_HEARTBEAT_INTERVAL`` while it retries with exponential backoff.
The first holder fixes the document and its delivery id in ``keys.job_callback``;
every try, by any process, counts there, and the outcome (``sent`` or ``failed``) is
recorded there when done. A holder that dies stops renewing; a worker that stops
gives its lease up. Either way the job stays in ``keys.CALLBACKS_DUE`` (added at
submit, removed with the outcome), which every worker scans (:func:`resume_due`), so
another process takes the send over and POSTs the same document with the same
``X-Imgq-Delivery`` header.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import redis

from shared import keys
from shared.jobs import CallbackStatus, JobError, JobRecord, JobStatus, JobStore
from shared.settings import Settings, get_settings
from shared.urlguard import AddressRefused, ResolveError, public_addresses

if TYPE_CHECKING:  # httpx is imported where a URL is read or a callback sent: not
    import httpx  # at every `imgq` command's start

log = logging.getLogger(__name__)

EndState = Literal["finished", "failed", "cancelled"]
END_STATES: tuple[str, ...] = ("finished", "failed", "cancelled")
SIGNATURE_HEADER = "X-Imgq-Signature"
TIMESTAMP_HEADER = "X-Imgq-Timestamp"
# The same on every try of a job's callback, from every process: receivers drop repeats.
DELIVERY_HEADER = "X-Imgq-Delivery"
_DELIVERY_NAMESPACE = uuid.UUID("5b0f7c52-6f0e-4d7e-9a57-1c0a3e6d2f41")
# The URL is kept in the job's record hash under this field.
NOTIFY_FIELD = "notify"
_SEND_TIMEOUT_S = 10.0
# Due jobs read per round trip of a scan.
_SCAN_PAGE = 500


class NotifyError(ValueError):
    """A notify URL imgq will not POST to."""


def check_notify_url(url: str, *, allow_private: bool) -> str:
    """The URL when imgq may POST to it; a NotifyError saying why not."""
    import httpx

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


def delivery_id(record: JobRecord, state: str) -> str:
    """The callback's delivery id: a UUID derived from the job (its id and creation
    time, so a later job under a reused id gets another) and its end state."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{record.job_id}/{record.created!r}/{state}"))


def payload(
    status: JobStatus, state: str, name: str | None, delivery: str | None = None
) -> dict[str, Any]:
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
    if delivery:
        doc["delivery_id"] = delivery
    return doc


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# The scripts below take the same KEYS: the callback hash, the lease, the due set and
# the job record; none writes anything for a job whose record is gone (deleted or
# expired), so a send in progress cannot bring its keys back.

# Takes the lease unless the outcome is recorded, and keeps the job in the due set
# until it is. ARGV: holder, lease ms, job id, now, ttl.
_TAKE = """
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
"""

# Renews the lease while it is this holder's and no outcome is recorded (1); else 0,
# letting go of a lease of this holder's once another process recorded the outcome.
# ARGV: holder, lease ms.
_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Counts a try about to be made, while the lease is this holder's: the try's number
# (all processes together), or 0 when the lease is not held. ARGV: holder, ttl.
_COUNT_TRY = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('EXISTS', KEYS[4]) == 0 then
  return 0
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return n
"""

# Keeps a failed try's error and HTTP status ('' when it got no answer), while the
# lease is this holder's. ARGV: holder, error, HTTP status or ''.
_NOTE_FAILURE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('EXISTS', KEYS[4]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'last_error', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'http_status')
else
  redis.call('HSET', KEYS[1], 'http_status', ARGV[3])
end
return 1
"""

# Fixes the document unless an earlier holder did; the state, delivery id, body and
# tries so far. ARGV: state, delivery id, body, ttl.
_FIX_DOCUMENT = """
if redis.call('EXISTS', KEYS[4]) == 0 then return {false, false, false, false} end
redis.call('HSETNX', KEYS[1], 'state', ARGV[1])
redis.call('HSETNX', KEYS[1], 'delivery', ARGV[2])
redis.call('HSETNX', KEYS[1], 'body', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return redis.call('HMGET', KEYS[1], 'state', 'delivery', 'body', 'attempts')
"""

# KEYS: the lease only; ARGV: holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Records the outcome: 'sent' always (a 2xx answer happened, whoever holds the lease),
# 'failed' only by the lease's holder and over no earlier outcome (otherwise another
# process is still trying, or has delivered). Lets go of the lease and takes the job
# out of the due set. ARGV: holder, outcome, HTTP status or '', error or '', job id,
# ttl, now.
_FINISH = """
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if ARGV[2] ~= 'sent' and (not mine or redis.call('HEXISTS', KEYS[1], 'outcome') == 1) then
  return 0
end
redis.call('HSET', KEYS[1], 'outcome', ARGV[2], 'done_at', ARGV[7])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'http_status', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[4]) end
if mine then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""

# This process's sends in progress, and whether it still takes new ones.
_senders: set[_Send] = set()
_senders_lock = threading.Lock()
_stopping = False


def track_due(store: JobStore, job_id: str) -> None:
    """Add a job with a notify URL to the due set (at submit, before its tasks are sent),
    so that its callback is found and sent even if the process that sees the end dies
    before it takes the lease."""
    pipe = store.client.pipeline(transaction=False)
    pipe.zadd(keys.CALLBACKS_DUE, {job_id: time.time()}, nx=True)
    pipe.expire(keys.CALLBACKS_DUE, store.ttl)
    pipe.execute()


def notify_if_ended(store: JobStore, job_id: str, settings: Settings | None = None) -> bool:
    """Start the job's callback when it has a notify URL and every task ended, unless
    another process holds it or it is done; True if this process started sending."""
    key = keys.job(job_id)
    if not store.client.hexists(key, NOTIFY_FIELD):
        return False  # most jobs: one cheap read per task, nothing more
    record = store.get(job_id)
    if record.listing and record.cancelled is None:
        return False  # more tasks are coming
    if store.client.hlen(keys.job_done(job_id)) < record.n_chunks * len(record.models):
        return False
    status = store.status(job_id)
    state = "cancelled" if status.cancelled else end_state(status)
    if state is None:
        return False
    return notify_job_end(store, job_id, state, settings) is not None


def notify_job_end(
    store: JobStore, job_id: str, state: str, settings: Settings | None = None
) -> threading.Thread | None:
    """Start sending the callback of a job that ended in ``state`` (finished, failed or
    cancelled) when no other process holds its lease and no outcome is recorded; the
    sending thread, or None (no URL, a URL these settings refuse, held or done).

    The first process to send fixes the document (so a later holder sends the same
    bytes, under the same state and delivery id, even if it saw another end)."""
    if state not in END_STATES:
        raise ValueError(f"state must be one of {', '.join(END_STATES)}, not {state!r}")
    raw = store.client.hmget(keys.job(job_id), [NOTIFY_FIELD, "name"])
    url, name = (None if v is None else v.decode() for v in raw)  # type: ignore[union-attr]
    if not url:
        return None
    settings = settings or get_settings()
    try:
        # A process whose settings refuse the URL leaves the send to one that can.
        check_notify_url(url, allow_private=settings.allow_private_urls)
    except NotifyError as exc:
        log.error("job %s: completion callback not taken here: %s", job_id, exc)
        return None
    with _senders_lock:
        if _stopping:
            return None
    holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    lease_ms = int(settings.heartbeat_timeout * 1000)
    taken = store.client.eval(
        _TAKE, 4, *_keys(job_id), holder, lease_ms, job_id, repr(time.time()), store.ttl
    )
    if not taken:
        return None
    try:
        state, delivery, body, attempts = _document(store, job_id, state, name)
        send = _Send(store, job_id, holder, url, body, delivery, attempts, settings)
        with _senders_lock:
            started = not _stopping
            if started:
                _senders.add(send)
        if not started:
            send.release()
            return None
    except BaseException:
        store.client.eval(_RELEASE, 1, keys.job_callback_lease(job_id), holder)
        raise
    log.info("job %s: sending its completion callback (%s, delivery %s)", job_id, state, delivery)
    send.thread.start()
    return send.thread


def _keys(job_id: str) -> tuple[str, str, str, str]:
    """The KEYS of the scripts: callback hash, lease, due set, job record."""
    return (
        keys.job_callback(job_id),
        keys.job_callback_lease(job_id),
        keys.CALLBACKS_DUE,
        keys.job(job_id),
    )


def _document(
    store: JobStore, job_id: str, state: str, name: str | None
) -> tuple[str, str, bytes, int]:
    """The callback's end state, delivery id, body and tries so far; fixed by the first
    holder (this process, when it is)."""
    key = keys.job_callback(job_id)
    fields = ["state", "delivery", "body", "attempts"]
    got: list[bytes | None] = store.client.hmget(key, fields)  # type: ignore[assignment]
    if got[2] is None:
        status = store.status(job_id)
        delivery = delivery_id(status.job, state)
        body = json.dumps(payload(status, state, name, delivery))
        got = store.client.eval(_FIX_DOCUMENT, 4, *_keys(job_id), state, delivery, body, store.ttl)
    raw_state, raw_delivery, raw_body, raw_attempts = got
    if raw_state is None or raw_delivery is None or raw_body is None:
        raise JobError(f"job {job_id}: deleted while its completion callback was being sent")
    return raw_state.decode(), raw_delivery.decode(), raw_body, int(raw_attempts or 0)


def callback_status(store: JobStore, record: JobRecord) -> CallbackStatus | None:
    """Where the job's completion callback is; None when it has no notify URL."""
    if not record.notify:
        return None
    pipe = store.client.pipeline(transaction=False)
    pipe.hmget(
        keys.job_callback(record.job_id), ["outcome", "attempts", "last_error", "http_status"]
    )
    pipe.exists(keys.job_callback_lease(record.job_id))
    (outcome, attempts, error, http_status), leased = pipe.execute()
    state = outcome.decode() if outcome is not None else ("sending" if leased else "pending")
    return CallbackStatus(
        state=state,
        attempts=int(attempts or 0),
        last_error=None if error is None else error.decode(),
        http_status=None if http_status is None else int(http_status),
    )


def resume_due(store: JobStore, settings: Settings | None = None) -> int:
    """Start the callbacks that are due and that no process sends: the job ended (or
    was cancelled), no outcome is recorded and nobody holds the lease (its holder died,
    or stopped and gave it up). Run periodically by every worker. How many this process
    started.

    No fleet-wide turn: a worker whose settings refuse a callback's URL must not keep
    the ones that can send it from scanning, and the lease already lets one process
    send each callback.

    Costs one ZRANGE when no callback is due; otherwise a pipelined round of reads per
    500 due jobs (those submitted with a URL and without an outcome)."""
    if _stopping:
        return 0
    client = store.client
    page = _due_page(store, 0)
    if not page:
        return 0
    gone: list[str] = []
    started = 0
    start = 0
    while page:
        started += _resume_page(store, page, settings, gone)
        start += len(page)
        page = _due_page(store, start)
    if gone:
        client.zrem(keys.CALLBACKS_DUE, *gone)
    return started


def _due_page(store: JobStore, start: int) -> list[str]:
    raw: list[bytes] = store.client.zrange(keys.CALLBACKS_DUE, start, start + _SCAN_PAGE - 1)  # type: ignore[assignment]
    return [r.decode() for r in raw]


def _resume_page(
    store: JobStore, due: list[str], settings: Settings | None, gone: list[str]
) -> int:
    """Start the callbacks of ``due`` that nobody sends; add those no longer due to
    ``gone``. How many were started."""
    pipe = store.client.pipeline(transaction=False)
    for job_id in due:
        pipe.hmget(keys.job(job_id), ["n_chunks", "models", "cancelled", NOTIFY_FIELD, "listing"])
        pipe.hlen(keys.job_done(job_id))
        pipe.hexists(keys.job_callback(job_id), "outcome")
        pipe.exists(keys.job_callback_lease(job_id))
    replies = pipe.execute()
    started = 0
    for i, job_id in enumerate(due):
        fields, n_done, done, leased = replies[4 * i : 4 * i + 4]
        n_chunks, models, cancelled, url, listing = fields
        if n_chunks is None or url is None or done:
            gone.append(job_id)  # deleted, expired, no URL, or its outcome is in
            continue
        if leased:
            continue
        try:
            if cancelled is not None:
                state: str | None = "cancelled"
            elif listing is not None:
                continue  # its sources are still being listed: more tasks are coming
            elif int(n_done) >= int(n_chunks) * len(json.loads(models)):
                state = end_state(store.status(job_id))
            else:
                continue  # still running
            if state is not None and notify_job_end(store, job_id, state, settings) is not None:
                log.info("job %s: completion callback held by no process: taken over", job_id)
                started += 1
        except JobError:
            gone.append(job_id)  # deleted or expired just now
    return started


def stop_sending() -> int:
    """For a process that stops (a worker's shutdown): start no more callbacks, and give
    up the leases of those in progress, so that another process takes them over at its
    next scan instead of this one holding up its exit for the remaining tries. A POST
    already under way finishes (a 2xx answer is recorded); then the threads end. How
    many sends were given up."""
    global _stopping
    with _senders_lock:
        _stopping = True
        sends = list(_senders)
    for send in sends:
        send.give_up()
    return len(sends)


class _Send:
    """This process's turn at sending one job's callback, while it holds the lease."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        holder: str,
        url: str,
        body: bytes,
        delivery: str,
        attempts: int,
        settings: Settings,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.holder = holder
        self.url = url
        self.body = body
        self.delivery = delivery
        self.attempts = attempts
        self.settings = settings
        # Set when this process must stop trying: the lease was lost or given up, or
        # the send is over (which also stops the renewals).
        self.halt = threading.Event()
        self.given_up = False
        # Not a daemon: a process that exits normally finishes its tries first.
        self.thread = threading.Thread(target=self._run, name=f"imgq-notify-{job_id}", daemon=False)

    def release(self) -> None:
        """Let go of the lease, if still this holder's."""
        self.store.client.eval(_RELEASE, 1, keys.job_callback_lease(self.job_id), self.holder)

    def give_up(self) -> None:
        """Stop trying and let go of the lease now (another process takes over)."""
        self.given_up = True
        self.halt.set()
        try:
            self.release()
        except redis.RedisError as exc:
            log.warning("job %s: could not give up the callback's lease: %s", self.job_id, exc)
        log.info("job %s: completion callback left to another process", self.job_id)

    def _run(self) -> None:
        renewer = threading.Thread(
            target=self._renew, name=f"imgq-notify-lease-{self.job_id}", daemon=True
        )
        renewer.start()
        try:
            self._try_all()
        except Exception:
            log.exception("job %s: completion callback stopped by an error", self.job_id)
        finally:
            self.halt.set()
            with _senders_lock:
                _senders.discard(self)

    def _renew(self) -> None:
        lease_ms = int(self.settings.heartbeat_timeout * 1000)
        while not self.halt.wait(self.settings.heartbeat_interval):
            try:
                held = self.store.client.eval(_RENEW, 4, *_keys(self.job_id), self.holder, lease_ms)
            except redis.RedisError as exc:
                log.warning("job %s: callback lease not renewed: %s", self.job_id, exc)
                continue
            if not held and not self.halt.is_set():
                log.warning(
                    "job %s: completion callback's lease lost (this process was stalled, or "
                    "another recorded the outcome); this process stops trying",
                    self.job_id,
                )
                self.halt.set()

    def _try_all(self) -> None:
        import httpx

        tries = self.settings.notify_tries
        where = _where(self.url)
        if self.attempts >= tries:
            # Earlier holders spent every try and died before recording it.
            self._finish("failed", None, None)
            return
        while not self.halt.is_set():
            attempt = self._count_try()
            if not attempt:
                if not self.given_up:
                    log.warning(
                        "job %s: completion callback's lease lost (this process was stalled, "
                        "or the job deleted); this process stops trying",
                        self.job_id,
                    )
                return
            status: int | None = None
            try:
                status = _post_once(self.url, self.body, self.settings, self.delivery)
            except NotifyError as exc:
                log.error("job %s: completion callback not sent: %s", self.job_id, exc)
                self._finish("failed", None, str(exc))
                return
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    log.info(
                        "job %s: completion callback to %s answered %d (try %d)",
                        self.job_id,
                        where,
                        status,
                        attempt,
                    )
                    self._finish("sent", status, None)
                    return
                problem = f"HTTP {status}"
                if status != 429 and status < 500:
                    log.error(
                        "job %s: completion callback to %s refused: %s", self.job_id, where, problem
                    )
                    self._finish("failed", status, problem)
                    return
            self._note_failure(problem, status)
            if attempt >= tries:
                log.error(
                    "job %s: completion callback to %s given up after %d tries: %s",
                    self.job_id,
                    where,
                    attempt,
                    problem,
                )
                self._finish("failed", status, problem)
                return
            delay = self.settings.notify_backoff * 2 ** (attempt - 1)
            log.warning(
                "job %s: completion callback to %s: %s; try %d of %d in %.1f s",
                self.job_id,
                where,
                problem,
                attempt + 1,
                tries,
                delay,
            )
            self.halt.wait(delay)

    def _count_try(self) -> int:
        """Count one more try (all processes together): its number; 0 when this process
        no longer holds the lease."""
        return int(
            self.store.client.eval(_COUNT_TRY, 4, *_keys(self.job_id), self.holder, self.store.ttl)
        )

    def _note_failure(self, problem: str, status: int | None) -> None:
        """Keep the latest failed try's error and answer (none: no HTTP status)."""
        self.store.client.eval(
            _NOTE_FAILURE,
            4,
            *_keys(self.job_id),
            self.holder,
            problem,
            "" if status is None else status,
        )

    def _finish(self, outcome: str, status: int | None, error: str | None) -> None:
        recorded = self.store.client.eval(
            _FINISH,
            4,
            *_keys(self.job_id),
            self.holder,
            outcome,
            "" if status is None else status,
            error or "",
            self.job_id,
            self.store.ttl,
            repr(time.time()),
        )
        if not recorded:
            log.info(
                "job %s: completion callback %s here, but another process holds it now",
                self.job_id,
                outcome,
            )


def _post_once(url: str, body: bytes, settings: Settings, delivery: str) -> int:
    """One POST; the HTTP status. The address is checked (and for http, pinned) each time."""
    import httpx

    target = httpx.URL(url)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "imgq-notify",
        DELIVERY_HEADER: delivery,
    }
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
    import httpx

    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.path}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

"""A worker's heartbeat, its claims on the deliveries it holds, and the recovery it runs.

Every ``IMGQ_HEARTBEAT_INTERVAL`` seconds a background thread renews the worker's
heartbeat (it expires after ``IMGQ_HEARTBEAT_TIMEOUT``), renews its claims on the
deliveries it holds (see :mod:`shared.liveness`), puts back on their queues the
tasks held by workers whose heartbeat expired, and now and then sweeps unfinished
jobs for tasks lost on the way (:mod:`workers.sweep`). Receiving a task costs a set
insertion in memory; the same thread claims new deliveries in Redis, in batches,
within moments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.signals import task_received

from shared.celery_app import job_store_for
from shared.liveness import (
    BROKER_ERRORS,
    BrokerRedis,
    Liveness,
    Reclaimer,
    alive_key,
    host_info,
    new_worker_id,
)
from shared.notify import resume_due
from shared.settings import Settings
from workers.store_health import store_gate, unavailable

log = logging.getLogger(__name__)

# Seconds between two sweeps for lost tasks (one sweeper at a time, fleet-wide).
SWEEP_EVERY_S = 5.0
# Every this many beats, claims the worker no longer backs are dropped.
AUDIT_EVERY = 5
# New deliveries are claimed in Redis in batches at most this far apart.
CLAIM_BATCH_S = 0.05


class Heartbeat:
    """The background thread that keeps a worker listed as alive and recovers others' work."""

    def __init__(self, app: Any, name: str, info: dict[str, Any], settings: Settings) -> None:
        self.app = app
        self.worker_id = new_worker_id(name)
        self.info = info
        self.settings = settings
        self.broker = BrokerRedis(app)
        self.reclaimer = Reclaimer(
            self.broker, timeout=settings.heartbeat_timeout, by=self.worker_id
        )
        self._held: set[str] = set()
        self._new: list[str] = []
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgq-heartbeat", daemon=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="imgq-sweep", daemon=True)
        self._beats = 0
        self._failing = False

    def start(self) -> Heartbeat:
        """Beat once (so the worker is alive before it takes anything), then keep beating."""
        try:
            self.beat()
        except BROKER_ERRORS as exc:
            # The broker is not up yet: the consumer waits for it, and so do the beats.
            log.warning("heartbeat: Redis unreachable (%s); retrying", exc)
            self._failing = True
            self.broker.close()
        self._thread.start()
        self._sweeper.start()
        log.info(
            "heartbeat %s every %g s (dead after %g s without one)",
            self.worker_id,
            self.settings.heartbeat_interval,
            self.settings.heartbeat_timeout,
        )
        return self

    def received(self, tag: str) -> None:
        """Note a delivery this worker now holds; the heartbeat thread claims it in Redis
        within moments (the consumer does not wait for Redis)."""
        with self._lock:
            self._held.add(tag)
            self._new.append(tag)
        self._wake.set()

    def reconnected(self) -> None:
        """The consumer (re)started on a new broker connection: deliveries received on the
        old one are no longer this worker's to acknowledge, so drop their claims."""
        with self._lock:
            tags, self._held, self._new = list(self._held), set(), []
        if not tags:
            return
        try:
            Liveness(self.broker.client, timeout=self.settings.heartbeat_timeout).release(
                self.worker_id, tags
            )
            log.info("broker connection renewed: %d earlier delivery(ies) released", len(tags))
        except BROKER_ERRORS as exc:
            log.warning("heartbeat: could not release earlier deliveries: %s", exc)

    def audit(self) -> None:
        """Drop claims Redis holds for this worker on deliveries it no longer has (a
        failover can bring back a delivery this worker acknowledged on the old master)."""
        liveness = Liveness(self.broker.client, timeout=self.settings.heartbeat_timeout)
        claimed = liveness.claimed_by(self.worker_id)
        with self._lock:
            stale = claimed - self._held
        if stale:
            liveness.release(self.worker_id, stale)

    def beat(self, tags: list[str] | None = None) -> bool:
        """Renew the heartbeat and the claims (all held, or just ``tags``); forget
        deliveries no longer held. False when Redis refused the writes (full): only
        the heartbeat's expiry was renewed, and the worker is paused."""
        with self._lock:
            if tags is None:
                tags = list(self._held)
            self._new.clear()
        info = {**self.info, "store_unavailable": store_gate().describe()}
        try:
            gone = Liveness(self.broker.client, timeout=self.settings.heartbeat_timeout).beat(
                self.worker_id, info, tags
            )
        except BROKER_ERRORS as exc:
            refused = unavailable(exc)
            if refused is None or refused[1].startswith("Redis unreachable"):
                raise
            # Redis refuses writes (full): pause consuming, since every message
            # taken now would be lost between the queue and the unacknowledged
            # set. The worker stays alive meanwhile: renewing the expiry of the
            # heartbeat key takes no memory, so Redis allows it, and the tasks
            # the worker holds are not handed to another worker to compute again.
            store_gate().down("redis", "heartbeat", refused[1])
            self.broker.client.pexpire(
                alive_key(self.worker_id), int(self.settings.heartbeat_timeout * 1000)
            )
            return False
        store_gate().up("redis", "heartbeat")
        if gone:
            with self._lock:
                self._held.difference_update(gone)
        return True

    def _run(self) -> None:
        interval = self.settings.heartbeat_interval
        next_beat = time.monotonic() + interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            if self._stop.is_set():
                return
            try:
                if self._wake.is_set() and time.monotonic() < next_beat:
                    # New deliveries: claim them now, so that a worker killed a
                    # moment later is named when its tasks are recovered. Claims
                    # are batched over CLAIM_BATCH_S.
                    self._wake.clear()
                    with self._lock:
                        fresh = list(self._new)
                    self.beat(fresh)
                    time.sleep(CLAIM_BATCH_S)
                    continue
                next_beat = time.monotonic() + interval
                if not self.beat():
                    continue  # Redis refuses writes: nothing else to do until it takes them
                self._beats += 1
                if self._beats % AUDIT_EVERY == 0:
                    self.audit()
                self.reclaimer.run(lock_s=interval)
                if self._failing:
                    log.info("heartbeat: Redis reachable again")
                self._failing = False
            except BROKER_ERRORS as exc:
                if not self._failing:
                    log.warning("heartbeat: Redis unreachable (%s); retrying", exc)
                self._failing = True
                self.broker.close()
            except Exception:
                log.exception("heartbeat: unexpected error; carrying on")

    def _sweep_loop(self) -> None:
        # A thread of its own: scanning a long queue must never delay a heartbeat.
        from workers.sweep import sweep

        broker = BrokerRedis(self.app)
        failing = {"sweep": False, "callbacks": False}

        def attempt(what: str, step: Callable[[], object]) -> None:
            # Each step on its own: a sweep that fails must not hold up the callbacks.
            try:
                step()
                failing[what] = False
            except BROKER_ERRORS as exc:
                if not failing[what]:
                    log.warning("%s: Redis unreachable (%s); retrying", what, exc)
                failing[what] = True
                broker.close()
            except Exception:
                log.exception("%s: unexpected error; carrying on", what)

        while not self._stop.wait(SWEEP_EVERY_S):
            attempt("sweep", lambda: sweep(self.app, broker, self.settings, by=self.worker_id))
            # Completion callbacks that nobody is sending (their sender died or stopped).
            attempt("callbacks", lambda: resume_due(job_store_for(self.app), self.settings))
        broker.close()

    def stop(self) -> None:
        """Stop beating and leave the listing (a clean stop: the held tasks went back)."""
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._sweeper):
            if thread.is_alive():
                thread.join(10)
        try:
            Liveness(self.broker.client, timeout=self.settings.heartbeat_timeout).leave(
                self.worker_id
            )
        except BROKER_ERRORS as exc:
            log.warning("heartbeat: could not leave the worker listing: %s", exc)
        self.broker.close()


_heartbeat: Heartbeat | None = None


def current_worker_id() -> str | None:
    """This process's worker id (None before its heartbeat starts)."""
    hb = _heartbeat
    return hb.worker_id if hb is not None else None


def is_alive(worker_id: str) -> bool | None:
    """Whether a worker's heartbeat is current; None when Redis cannot say."""
    hb = _heartbeat
    if hb is None:
        return None
    try:
        return bool(hb.broker.client.exists(alive_key(worker_id)))
    except BROKER_ERRORS:
        return None


def start_heartbeat(
    app: Any, name: str, models: list[str], queues: list[str], settings: Settings
) -> Heartbeat:
    """Start this process's heartbeat (once the models are loaded, before consuming)."""
    global _heartbeat
    _heartbeat = Heartbeat(app, name, host_info(name, models, queues), settings).start()
    return _heartbeat


def stop_heartbeat() -> None:
    """Stop this process's heartbeat, if it runs."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


@task_received.connect
def _note_delivery(request: Any = None, **_: Any) -> None:
    """Every task received (running, prefetched or waiting for its retry time) is held."""
    hb = _heartbeat
    if hb is None or request is None:
        return
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if tag:
        hb.received(str(tag))


class ReleaseOnReconnect(bootsteps.StartStopStep):
    """A consumer step: each time the consumer starts (first, and after a lost broker
    connection), deliveries from before are released (see :meth:`Heartbeat.reconnected`)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Release the claims of the previous connection, if any."""
        if _heartbeat is not None:
            _heartbeat.reconnected()

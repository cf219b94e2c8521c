"""Worker liveness in Redis, and putting a dead worker's tasks back on their queues.

kombu's Redis transport keeps every delivered, unacknowledged message in the
``unacked`` hash (delivery tag -> message, exchange, routing key) and the
``unacked_index`` sorted set (delivery tag -> time delivered); it puts a message back
on its queue only after the visibility timeout (an hour by default), because it
cannot tell a dead worker from a slow one. imgq tells them apart:

- ``imgq:worker:<id>:alive``  string with a TTL of ``IMGQ_HEARTBEAT_TIMEOUT``,
  renewed every ``IMGQ_HEARTBEAT_INTERVAL`` by a live worker
- ``imgq:workers``            hash: worker id -> JSON (name, host, pid, models, started, ...)
- ``imgq:held``               hash: delivery tag -> id of the worker that received it

A delivery whose worker has no heartbeat any more (or one that nobody recorded, a
grace period after it was delivered: the worker died between taking it and saying
so) is put back on its queue at once, by the same steps kombu's own restore takes,
with a compare-and-swap (``shared.kombu_redis.restore_delivery``): it moves only if
its ``unacked`` entry is still the one read, so a worker that acknowledges it at the
same moment, kombu's restore or another reclaimer leaves nothing to move, and no
other delivery or ack in the fleet gets in the way. A worker that was only frozen
and comes back runs nothing twice into the results: task ids are fixed, so a rerun
overwrites its own result and its own progress field.

Each heartbeat also moves the delivery time of the deliveries its worker holds to
now in ``unacked_index``, so kombu's visibility-timeout restore, which reads that
time, never hands a task of a live worker to another however long it runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError

from shared import keys
from shared.kombu_redis import (
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    restore_delivery,
    task_id_of_unacked,
)

log = logging.getLogger(__name__)

# What reaching the broker's Redis can raise (kombu wraps connection errors).
BROKER_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    OSError,
    OperationalError,
)

WORKERS_KEY = keys.WORKERS
HELD_KEY = keys.HELD
RECOVERED_KEY = keys.TASKS_RECOVERED
RESENT_KEY = keys.TASKS_RESENT  # by the sweep for lost tasks (workers.sweep)
RECOVERIES_KEY = keys.RECOVERIES
RECLAIM_LOCK_KEY = keys.RECLAIM_LOCK
KEEP_RECOVERIES = 100
# How long a dead worker stays in the listing after its tasks were recovered.
KEEP_DEAD_S = 24 * 3600

alive_key = keys.worker_alive


def new_worker_id(name: str) -> str:
    """A worker id unique across restarts: the node name, the pid and random hex."""
    return f"{name}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


# Renew the heartbeat, and claim each delivery this worker holds that is still
# unacknowledged and claimed by nobody, keeping its delivery time in
# ``unacked_index`` at now (ZADD XX: never re-adding an acknowledged one), so
# kombu's visibility-timeout restore leaves it alone; return the tags that are no
# longer unacknowledged (acknowledged, or put back), so the worker can forget them.
# KEYS: alive, held, unacked, workers, unacked_index. ARGV: worker id, timeout in
# ms, listing payload, now (seconds), the alive-key prefix and suffix, tags.
_BEAT = """
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
local gone = {}
for i = 7, #ARGV do
  local tag = ARGV[i]
  if redis.call('HEXISTS', KEYS[3], tag) == 1 then
    -- A claim by another live worker stands (it got the delivery again after
    -- this one was frozen); a claim by a dead one is stale.
    local owner = redis.call('HGET', KEYS[2], tag)
    if (not owner) or (owner ~= ARGV[1] and
        redis.call('EXISTS', ARGV[5] .. owner .. ARGV[6]) == 0) then
      redis.call('HSET', KEYS[2], tag, ARGV[1])
      owner = ARGV[1]
    end
    if owner == ARGV[1] then
      redis.call('ZADD', KEYS[5], 'XX', ARGV[4], tag)
    end
  else
    if redis.call('HGET', KEYS[2], tag) == ARGV[1] then
      redis.call('HDEL', KEYS[2], tag)
    end
    gone[#gone + 1] = tag
  end
end
return gone
"""

# Forget claims on deliveries that are no longer unacknowledged.
_PRUNE = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


# Drop this worker's claims on the given deliveries.
_RELEASE = """
local n = 0
for i = 1, #ARGV - 1 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[#ARGV] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


@dataclass
class WorkerInfo:
    """One worker as the listing shows it."""

    worker_id: str
    name: str
    alive: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The models the worker serves."""
        return list(self.info.get("models", []))


@dataclass
class Recovery:
    """Deliveries put back on their queues because their worker was dead (or never said)."""

    worker_id: str | None
    task_ids: list[str]
    at: float

    def as_dict(self) -> dict[str, Any]:
        """The recovery as plain JSON-ready data."""
        return {"worker": self.worker_id, "tasks": len(self.task_ids), "at": self.at}


class Liveness:
    """Heartbeats, held deliveries and the worker listing in Redis."""

    def __init__(self, client: redis.Redis, *, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._beat = client.register_script(_BEAT)
        self._prune = client.register_script(_PRUNE)
        self._release = client.register_script(_RELEASE)

    def beat(self, worker_id: str, info: dict[str, Any], tags: Iterable[str]) -> list[str]:
        """Renew a worker's heartbeat and claims; the tags no longer unacknowledged."""
        payload = json.dumps({**info, "seen": time.time()})
        gone = self._beat(
            keys=[alive_key(worker_id), HELD_KEY, UNACKED_KEY, WORKERS_KEY, UNACKED_INDEX_KEY],
            args=[
                worker_id,
                int(self.timeout * 1000),
                payload,
                repr(time.time()),  # kombu compares index times with its own time()
                keys.WORKER_ALIVE_PREFIX,
                keys.WORKER_ALIVE_SUFFIX,
                *tags,
            ],
        )
        return [t.decode() if isinstance(t, bytes) else str(t) for t in gone]

    def release(self, worker_id: str, tags: Iterable[str]) -> None:
        """Drop a worker's claims: deliveries it can no longer acknowledge (its broker
        connection was lost) are recovered like unclaimed ones, after the grace period."""
        tags = list(tags)
        if tags:
            self._release(keys=[HELD_KEY], args=[*tags, worker_id])

    def claimed_by(self, worker_id: str) -> set[str]:
        """The deliveries Redis says a worker holds."""
        raw: dict[bytes, bytes] = self.client.hgetall(HELD_KEY)  # type: ignore[assignment]
        me = worker_id.encode()
        return {k.decode() for k, v in raw.items() if v == me}

    def leave(self, worker_id: str) -> None:
        """A worker stopping cleanly: it is no longer listed (its held tasks went back)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(alive_key(worker_id))
        pipe.hdel(WORKERS_KEY, worker_id)
        pipe.execute()

    def workers(self) -> list[WorkerInfo]:
        """Every listed worker, alive or dead, by name."""
        raw: dict[bytes, bytes] = self.client.hgetall(WORKERS_KEY)  # type: ignore[assignment]
        ids = sorted(k.decode() for k in raw)
        pipe = self.client.pipeline(transaction=False)
        for wid in ids:
            pipe.exists(alive_key(wid))
        alive = pipe.execute()
        out = []
        for wid, up in zip(ids, alive, strict=True):
            info = json.loads(raw[wid.encode()])
            out.append(WorkerInfo(wid, str(info.get("name", wid)), bool(up), info))
        return sorted(out, key=lambda w: (not w.alive, w.name))

    def recovered_total(self) -> int:
        """Tasks put back on their queues since Redis was set up."""
        return int(self.client.get(RECOVERED_KEY) or 0)

    def recoveries(self) -> list[dict[str, Any]]:
        """The latest recoveries, newest first."""
        raw: list[bytes] = self.client.lrange(RECOVERIES_KEY, 0, -1)  # type: ignore[assignment]
        return [json.loads(r) for r in raw]

    def abandoned(self, *, grace: float) -> dict[str | None, list[str]]:
        """Unacknowledged deliveries whose worker is dead, by worker id; ``None``: held by
        nobody ``grace`` seconds after delivery."""
        # The index first: a delivery is claimed only after it is indexed, so one
        # indexed after this read cannot look unclaimed.
        index: list[tuple[bytes, float]] = self.client.zrange(  # type: ignore[assignment]
            UNACKED_INDEX_KEY, 0, -1, withscores=True
        )
        held_raw: dict[bytes, bytes] = self.client.hgetall(HELD_KEY)  # type: ignore[assignment]
        held = {k.decode(): v.decode() for k, v in held_raw.items()}
        owners = sorted(set(held.values()))
        pipe = self.client.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(alive_key(owner))
        alive = dict(zip(owners, pipe.execute(), strict=True))
        now = _redis_time(self.client)
        out: dict[str | None, list[str]] = {}
        tags = set()
        for raw_tag, delivered in index:
            tag = raw_tag.decode()
            tags.add(tag)
            holder = held.get(tag)
            if holder is not None:
                if not alive[holder]:
                    out.setdefault(holder, []).append(tag)
            elif delivered < now - grace:
                out.setdefault(None, []).append(tag)
        stale = [t for t in held if t not in tags]
        if stale:
            self._prune(keys=[HELD_KEY, UNACKED_KEY], args=stale)
        return out

    def forget_dead(self, older_than: float = KEEP_DEAD_S) -> None:
        """Drop dead workers last seen more than ``older_than`` seconds ago from the listing."""
        now = time.time()
        for w in self.workers():
            if not w.alive and now - float(w.info.get("seen", now)) > older_than:
                self.client.hdel(WORKERS_KEY, w.worker_id)


def _redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def restore(channel: Any, client: redis.Redis, tag: str) -> str | None:
    """Put one unacknowledged delivery back on its queue, as kombu does after the
    visibility timeout, with its claim; its task id (``"?"`` when it has none), or
    None when it was no longer unacknowledged.

    A compare-and-swap on its ``unacked`` entry (``shared.kombu_redis``): an ack,
    kombu's own restore or another reclaimer in between leaves nothing to move, so
    a delivery is put back at most once.
    """
    moved = restore_delivery(channel, client, tag, forget=[HELD_KEY])
    if moved is None:
        return None
    return task_id_of_unacked(moved) or "?"


class BrokerRedis:
    """A broker connection of this process's own, and a Redis client on it.

    kombu's channel is what knows the queues' bindings and priorities (needed to
    put a message back where it came from), and its client reaches the Redis that
    holds ``unacked`` (``sentinel://`` URLs included: the current master).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._conn: Any = None
        self._client: redis.Redis | None = None

    @property
    def channel(self) -> Any:
        """kombu's Redis channel (connected on first use)."""
        if self._conn is None:
            self._conn = self.app.connection_for_write()
        return self._conn.default_channel

    @property
    def client(self) -> redis.Redis:
        """A Redis client on the broker (the current master)."""
        if self._client is None:
            with self.channel.conn_or_acquire() as client:
                self._client = client
        return self._client

    def close(self) -> None:
        """Release the connection (the next use opens a new one)."""
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # closing a connection that is already gone
                log.debug("closing a broker connection failed", exc_info=True)


class Reclaimer:
    """Puts the deliveries of dead workers back on their queues; any process can run one.

    One pass at a time across all processes (a lock that expires by itself).
    """

    def __init__(self, broker: BrokerRedis, *, timeout: float, by: str) -> None:
        self.broker = broker
        self.timeout = timeout
        self.by = by
        self._last_forget = 0.0

    @property
    def liveness(self) -> Liveness:
        """The liveness records on the broker's Redis."""
        return Liveness(self.broker.client, timeout=self.timeout)

    def run(self, *, lock_s: float = 1.0) -> list[Recovery]:
        """One pass (skipped when another process ran one in the last ``lock_s`` seconds)."""
        client = self.broker.client
        if not client.set(RECLAIM_LOCK_KEY, self.by, nx=True, px=max(1, int(lock_s * 1000))):
            return []
        abandoned = self.liveness.abandoned(grace=self.timeout)
        if time.monotonic() - self._last_forget > 60:
            self._last_forget = time.monotonic()
            self.liveness.forget_dead()
        out = []
        for owner, tags in abandoned.items():
            tids = [
                tid
                for tag in tags
                if (tid := restore(self.broker.channel, client, tag)) is not None
            ]
            if not tids:
                continue
            rec = Recovery(owner, tids, time.time())
            out.append(rec)
            event = json.dumps({**rec.as_dict(), "by": self.by, "task_ids": tids[:20]})
            pipe = client.pipeline(transaction=False)
            pipe.incrby(RECOVERED_KEY, len(tids))
            pipe.lpush(RECOVERIES_KEY, event)
            pipe.ltrim(RECOVERIES_KEY, 0, KEEP_RECOVERIES - 1)
            pipe.execute()
            if owner is None:
                log.warning(
                    "%d task(s) taken by a worker that died before recording them put back "
                    "on their queues: %s",
                    len(tids),
                    ", ".join(tids[:5]),
                )
            else:
                log.warning(
                    "worker %s is dead (no heartbeat for %g s): %d task(s) it held put back "
                    "on their queues: %s",
                    owner,
                    self.timeout,
                    len(tids),
                    ", ".join(tids[:5]),
                )
        return out


def host_info(name: str, models: Iterable[str], queues: Iterable[str]) -> dict[str, Any]:
    """What a worker says about itself in the listing."""
    return {
        "name": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "models": list(models),
        "queues": list(queues),
        "started": time.time(),
        # Why the worker takes no task now (a store refuses its writes), or None.
        "store_unavailable": None,
    }

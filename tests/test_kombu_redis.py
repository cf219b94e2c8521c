"""What ``shared.kombu_redis`` assumes of kombu's Redis transport, pinned against the
installed kombu on a real Redis: the names of its keys and priority lists, the stored
form of a message and of a delivery, and the steps of a restore. A kombu upgrade that
changes any of them fails here, in one file, before it reaches a fleet."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from kombu import Connection, Exchange, Queue

from shared.celery_app import CLASSIFY_TASK, create_app
from shared.kombu_redis import (
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    priority_lists,
    priority_queues_pattern,
    purge_task_prefix,
    queued_task_ids,
    restore_delivery,
    task_id_of_message,
    task_id_of_unacked,
    unacked_task_ids,
)
from shared.liveness import BrokerRedis
from shared.priority import PRIORITY_STEPS, queue_lists, transport_priority
from shared.settings import Settings


@pytest.fixture
def broker(redis_url: str) -> Iterator[BrokerRedis]:
    """kombu's channel and a client on a database of its own: nothing else consumes or
    restores there."""
    url = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    b = BrokerRedis(create_app(Settings(broker_url=url)))
    try:
        yield b
    finally:
        b.client.flushdb()
        b.close()


def send(broker: BrokerRedis, queue: str, tid: str, priority: int | None = None) -> None:
    broker.app.send_task(
        CLASSIFY_TASK, args=["j", "m", 0, 1], task_id=tid, queue=queue, priority=priority
    )


def deliver(broker: BrokerRedis, queue: str) -> Any:
    """Take one message the way a consumer does (not acknowledged)."""
    message = broker.channel.basic_get(queue, no_ack=False)
    assert message is not None
    return message


def test_key_names_and_delivery_entries(broker: BrokerRedis) -> None:
    r = broker.client
    queue = f"imgq.k{uuid.uuid4().hex[:6]}"
    send(broker, queue, "job-a.m.000001")
    raw = r.lrange(queue, 0, -1)
    assert len(raw) == 1 and task_id_of_message(raw[0]) == "job-a.m.000001"
    assert queued_task_ids(r, [queue]) == {"job-a.m.000001"}
    message = deliver(broker, queue)
    tag = message.delivery_tag
    # Taken, not acknowledged: in kombu's two structures, under the names imgq reads.
    entry = r.hget(UNACKED_KEY, tag)
    assert entry is not None and r.zscore(UNACKED_INDEX_KEY, tag) is not None
    payload, _, routing_key = json.loads(entry)
    assert payload["headers"]["id"] == "job-a.m.000001"
    assert routing_key == queue
    assert task_id_of_unacked(entry) == "job-a.m.000001"
    assert unacked_task_ids(r) == {"job-a.m.000001"}
    message.ack()
    assert not r.hexists(UNACKED_KEY, tag) and r.zscore(UNACKED_INDEX_KEY, tag) is None
    # Not messages: no id, and no exception.
    assert task_id_of_message(b"not json") is None and task_id_of_unacked(b"{}") is None


def test_priority_lists_are_the_ones_kombu_uses(broker: BrokerRedis) -> None:
    r = broker.client
    channel = broker.channel
    queue = f"imgq.p{uuid.uuid4().hex[:6]}"
    assert list(channel.priority_steps) == PRIORITY_STEPS
    assert queue_lists(queue) == [channel._q_for_pri(queue, p) for p in PRIORITY_STEPS]
    assert priority_lists(queue, PRIORITY_STEPS) == queue_lists(queue)
    # kombu's default four steps share lists between levels.
    assert priority_lists("q", [0, 3, 6, 9]) == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
    # Each imgq priority lands in its own list: 9 - priority counted from the most urgent.
    for level in range(10):
        send(broker, queue, f"job-p.m.{level:06d}", priority=transport_priority(level))
    lists = queue_lists(queue)
    for level in range(10):
        waiting = r.lrange(lists[9 - level], 0, -1)
        assert [task_id_of_message(m) for m in waiting] == [f"job-p.m.{level:06d}"]
    found = {k.decode() for k in r.scan_iter(match=priority_queues_pattern(queue))}
    assert found == set(lists[1:])
    # A consumer takes the most urgent first.
    assert deliver(broker, queue).headers["id"] == "job-p.m.000009"


def test_restore_does_what_kombus_restore_does(broker: BrokerRedis) -> None:
    r = broker.client
    channel = broker.channel
    queue = f"imgq.r{uuid.uuid4().hex[:6]}"
    lists = queue_lists(queue)
    # The same task twice, at priority 7: one put back by kombu, one by imgq.
    for _ in range(2):
        send(broker, queue, "job-r.m.000000", priority=transport_priority(7))
    ours, theirs = deliver(broker, queue).delivery_tag, deliver(broker, queue).delivery_tag
    assert not any(r.llen(name) for name in lists)
    channel.qos.restore_by_tag(theirs, r)
    by_kombu = r.lpop(lists[2])
    assert by_kombu is not None and not r.llen(lists[2])
    r.hset("imgq:test:held", ours, "w1")
    moved = restore_delivery(channel, r, ours, forget=["imgq:test:held"])
    assert task_id_of_unacked(moved or b"") == "job-r.m.000000"
    by_imgq = r.lpop(lists[2])
    assert by_imgq is not None

    def comparable(raw: bytes) -> dict[str, Any]:
        payload = json.loads(raw)
        payload["properties"].pop("delivery_tag")
        return dict(payload)

    assert comparable(by_imgq) == comparable(by_kombu)
    restored = json.loads(by_imgq)
    assert restored["headers"]["redelivered"] is True
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    # Gone from kombu's bookkeeping and from the hashes named, pushed once.
    for tag in (ours, theirs):
        assert not r.hexists(UNACKED_KEY, tag) and r.zscore(UNACKED_INDEX_KEY, tag) is None
    assert not r.hexists("imgq:test:held", ours)
    assert restore_delivery(channel, r, ours) is None
    assert not any(r.llen(name) for name in lists)
    # Pushed to the consuming end: it is the next one taken.
    send(broker, queue, "job-r.m.000001", priority=transport_priority(7))
    send(broker, queue, "job-r.m.000002", priority=transport_priority(7))
    first = deliver(broker, queue)
    restore_delivery(channel, r, first.delivery_tag)
    assert deliver(broker, queue).headers["id"] == "job-r.m.000001"


class _BusyFleet:
    """A client on which, between the restore's read of its entry and its move, the
    rest of the fleet works: ``between`` runs right after that read."""

    def __init__(self, client: redis.Redis, between: Any) -> None:
        self._client = client
        self._between = between

    def as_client(self) -> redis.Redis:
        return cast(redis.Redis, self)

    def hget(self, name: str, key: str) -> Any:
        value = self._client.hget(name, key)
        if name == UNACKED_KEY:
            self._between()
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_other_deliveries_and_acks_do_not_abort_a_restore(broker: BrokerRedis) -> None:
    """The restore is a compare-and-swap of its own entry: a fleet that takes and
    acknowledges other tasks meanwhile (every few milliseconds on a busy queue) does
    not make it fail, where a WATCH on the whole unacked hash would."""
    r = broker.client
    queue = f"imgq.w{uuid.uuid4().hex[:6]}"
    for i in range(4):
        send(broker, queue, f"job-w.m.{i:06d}")
    lost = deliver(broker, queue)
    other = deliver(broker, queue)

    def fleet_at_work() -> None:
        other.ack()  # an acknowledgement
        deliver(broker, queue)  # a delivery

    moved = restore_delivery(
        broker.channel, _BusyFleet(r, fleet_at_work).as_client(), lost.delivery_tag
    )
    assert task_id_of_unacked(moved or b"") == "job-w.m.000000"
    assert not r.hexists(UNACKED_KEY, lost.delivery_tag)
    assert queued_task_ids(r, queue_lists(queue)) == {"job-w.m.000000", "job-w.m.000003"}


def test_a_delivery_acknowledged_during_its_restore_is_not_pushed(broker: BrokerRedis) -> None:
    """Its own entry changed between the read and the move (the worker finished it):
    nothing goes back on the queue, so the task does not run twice."""
    r = broker.client
    queue = f"imgq.a{uuid.uuid4().hex[:6]}"
    send(broker, queue, "job-a.m.000000")
    finished = deliver(broker, queue)
    moved = restore_delivery(
        broker.channel, _BusyFleet(r, finished.ack).as_client(), finished.delivery_tag
    )
    assert moved is None
    assert not queued_task_ids(r, queue_lists(queue))


def test_purge_takes_one_jobs_messages_and_keeps_the_order(broker: BrokerRedis) -> None:
    r = broker.client
    queue = f"imgq.c{uuid.uuid4().hex[:6]}"
    order = [f"{'gone' if i % 3 == 0 else 'gone2'}.m.{i:06d}" for i in range(25)]
    for tid in order:
        send(broker, queue, tid)
    r.lpush(queue, b"not a message")
    assert purge_task_prefix(r, queue_lists(queue), "gone.", slice_=4) == 9
    left = [task_id_of_message(m) for m in reversed(r.lrange(queue, 0, -1))]
    assert left == [t for t in order if not t.startswith("gone.")] + [None]


def test_kombu_writes_the_keys_a_plain_kombu_producer_writes(redis_url: str) -> None:
    """The resume purge (``imgq run``) clears priority lists found by pattern."""
    name = f"imgq.keys-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    queue = Queue(name, Exchange(name), routing_key=name, max_priority=9)
    with Connection(redis_url) as conn:
        producer = conn.Producer()
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
        producer.publish({"n": 2}, exchange=queue.exchange, routing_key=name, priority=9)
        assert [k.decode() for k in client.scan_iter(match=priority_queues_pattern(name))]
    client.delete(name, *client.scan_iter(match=priority_queues_pattern(name)))


def test_a_batched_producer_writes_what_send_task_writes_in_one_pipeline(
    broker: BrokerRedis,
) -> None:
    """Messages sent through ``batched_producer`` land in the same lists, in the same
    form (and with their task-sent events), as one ``send_task`` at a time; nothing is
    written before the block ends when it holds fewer than ``max_size`` commands."""
    from shared.kombu_redis import batched_producer

    r = broker.client
    queue = f"imgq.b{uuid.uuid4().hex[:6]}"
    send(broker, queue, "job-p.m.000000", priority=3)
    events = r.pubsub()
    events.psubscribe("*celeryev*")
    events.get_message(timeout=1)
    calls = int(r.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))  # type: ignore[union-attr]
    with batched_producer(broker.app, max_size=100) as producer:
        for i in range(1, 4):
            broker.app.send_task(
                CLASSIFY_TASK,
                args=["j", "m", i, 1],
                task_id=f"job-p.m.{i:06d}",
                queue=queue,
                priority=3,
                producer=producer,
            )
        assert queued_task_ids(r, queue_lists(queue)) == {"job-p.m.000000"}  # buffered
    stats = r.info("commandstats")
    assert int(stats["cmdstat_lpush"]["calls"]) == calls + 3  # type: ignore[index]
    lists = [k for k in queue_lists(queue) if r.llen(k)]
    assert len(lists) == 1  # the same priority list as send_task's
    raw = [json.loads(m) for m in r.lrange(lists[0], 0, -1)]
    assert [m["headers"]["id"] for m in raw] == [f"job-p.m.{i:06d}" for i in (3, 2, 1, 0)]
    plain, batched = raw[-1], raw[0]
    assert set(plain) == set(batched) and set(plain["headers"]) == set(batched["headers"])
    assert plain["properties"]["priority"] == batched["properties"]["priority"]
    sent = set()
    while (message := events.get_message(timeout=1)) is not None:
        event = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
        if event.get("type") == "task-sent":  # other processes' events pass by too
            sent.add(event["uuid"])
    assert sent >= {f"job-p.m.{i:06d}" for i in range(1, 4)}  # a task-sent event each
    events.close()

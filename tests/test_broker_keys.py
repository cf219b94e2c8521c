"""The kombu Redis keys imgq reads (metrics) and clears (``imgq run`` resume) are the
ones kombu writes, checked against a real Redis through kombu itself."""

from __future__ import annotations

import uuid

import redis
from kombu import Connection, Exchange, Queue

from shared.broker_keys import UNACKED_INDEX_KEY, UNACKED_KEY, priority_queues_pattern


def test_kombu_writes_the_keys_imgq_reads(redis_url: str) -> None:
    name = f"imgq.keys-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    queue = Queue(name, Exchange(name), routing_key=name, max_priority=9)
    with Connection(redis_url) as conn:
        producer = conn.Producer()
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
        producer.publish({"n": 2}, exchange=queue.exchange, routing_key=name, priority=9)
        # A prioritised message waits in a list next to the queue's own.
        assert [k.decode() for k in client.scan_iter(match=priority_queues_pattern(name))]
        simple = conn.SimpleQueue(queue)
        message = simple.get(timeout=10)
        tag = message.delivery_tag
        # Taken, not acknowledged: where the metrics and the resume purge look.
        assert client.hexists(UNACKED_KEY, tag)
        assert client.zscore(UNACKED_INDEX_KEY, tag) is not None
        message.ack()
        assert not client.hexists(UNACKED_KEY, tag)
        simple.get(timeout=10).ack()
        simple.close()
    client.delete(name)

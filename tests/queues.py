"""What waits in a model's queue: the sum of its priority lists in Redis."""

from __future__ import annotations

import redis

from shared.priority import queue_lists


def waiting(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue, over all its priority levels."""
    return sum(int(client.llen(key)) for key in queue_lists(queue))  # type: ignore[arg-type]

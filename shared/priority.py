"""Job priorities: 0 to 9, higher runs first, carried by the Redis transport's priority steps.

imgq counts like RabbitMQ and most job systems (9 is the most urgent). Celery's
Redis transport counts the other way round: it keeps one Redis list per priority
step of a queue (their names: ``shared.kombu_redis``) and a worker's BRPOP names
them lowest number first, so the lowest number is served first. imgq sends
``9 - priority``; with ten steps every level has its own list.
Why this and not a queue per level: docs/benchmarks.md (job control).
"""

from __future__ import annotations

from shared.kombu_redis import priority_lists

MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
# One Redis list per level: BRPOP takes the most urgent list that has a message.
PRIORITY_STEPS = list(range(MAX_PRIORITY + 1))


class PriorityError(ValueError):
    """A priority outside 0-9."""


def check_priority(priority: int) -> int:
    """The priority, or a PriorityError when it is not an integer from 0 to 9."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise PriorityError(f"priority must be an integer from 0 to 9, not {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise PriorityError(f"priority must be from 0 to 9 (9 runs first), not {priority}")
    return priority


def transport_priority(priority: int) -> int:
    """The message priority Celery's Redis transport needs for an imgq priority."""
    return MAX_PRIORITY - check_priority(priority)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, most urgent first."""
    return priority_lists(queue, PRIORITY_STEPS)

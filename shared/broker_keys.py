"""The Redis keys kombu's Redis transport keeps besides the queues themselves, taken
from kombu so that imgq reads and clears the same ones kombu writes.

imgq leaves kombu's transport options for these names at their defaults
(``shared.celery_app`` sets none of them), so the class attributes are the keys.
"""

from __future__ import annotations

from kombu.transport.redis import Channel

# Messages delivered to a consumer and not yet acknowledged: delivery tag -> message.
UNACKED_KEY: str = Channel.unacked_key
# The same messages by delivery time (what the visibility timeout restores from).
UNACKED_INDEX_KEY: str = Channel.unacked_index_key
# Between a queue's name and its priority in the names of its priority lists.
PRIORITY_SEPARATOR: str = Channel.sep


def priority_queues_pattern(queue: str) -> str:
    """A SCAN pattern for the priority lists kombu keeps next to ``queue``."""
    return f"{queue}{PRIORITY_SEPARATOR}*"

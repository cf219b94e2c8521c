"""Everything imgq knows about kombu's Redis transport, in one module.

kombu keeps a queue's waiting messages in Redis lists, one per priority step, and
every delivered, unacknowledged message in two structures of its own; imgq reads
them (metrics, the sweep for lost tasks, cancel) and moves messages between them
(putting a dead worker's deliveries back on their queues). The names, the stored
form of a message and the steps of a restore are kombu's; this module is the only
place that knows them, and ``tests/test_kombu_redis.py`` pins each against the
installed kombu, so that a kombu upgrade that changes one breaks that test file,
not a fleet.

What kombu stores (kombu 5.x, ``kombu.transport.redis``):

- a queue ``q`` waits in the list ``q`` (priority step 0) and ``q\\x06\\x16<n>`` (step
  n); producers LPUSH, consumers BRPOP the steps lowest number first;
- a message is the JSON of kombu's payload: ``{"body", "headers", "properties",
  ...}``; Celery's task id is ``headers.id`` (protocol 2; ``properties.correlation_id``
  carries it too);
- ``unacked``: a hash, delivery tag -> JSON ``[payload, exchange, routing_key]``;
  ``unacked_index``: a sorted set, delivery tag -> delivery time (``time.time()``),
  which kombu's visibility-timeout restore reads;
- a restore marks the payload redelivered (``headers.redelivered`` and
  ``properties.delivery_info.redelivered``), pushes it to the consuming end (RPUSH)
  of the list of its priority in every queue its exchange and routing key lead to,
  and removes the delivery from both structures.

imgq leaves kombu's transport options for these names at their defaults
(``shared.celery_app`` sets none of them), so kombu's class attributes are the keys.
"""

from __future__ import annotations

import json
import logging
from bisect import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport.redis import Channel
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

log = logging.getLogger(__name__)

# Messages delivered to a consumer and not yet acknowledged: delivery tag -> message.
UNACKED_KEY: str = Channel.unacked_key
# The same deliveries by delivery time (what the visibility timeout restores from).
UNACKED_INDEX_KEY: str = Channel.unacked_index_key
# Between a queue's name and its priority step in the names of its priority lists.
PRIORITY_SEPARATOR: str = Channel.sep


def priority_lists(queue: str, steps: Sequence[int]) -> list[str]:
    """The Redis lists of ``queue``, one per priority step, in the order a consumer
    takes them (kombu's ``Channel._q_for_pri`` for each step)."""
    ordered = sorted(steps)
    names: dict[str, None] = {}
    for n in ordered:
        pri = ordered[bisect(ordered, n) - 1]
        names[queue if not pri else f"{queue}{PRIORITY_SEPARATOR}{pri}"] = None
    return list(names)


def priority_queues_pattern(queue: str) -> str:
    """A SCAN pattern for the priority lists kombu keeps next to ``queue``."""
    return f"{queue}{PRIORITY_SEPARATOR}*"


# ---- sending messages in bulk ---------------------------------------------------------


@contextmanager
def batched_producer(app: Any, max_size: int = 1000) -> Iterator[Any]:
    """A producer of ``app`` whose publishes (task messages and their ``task-sent``
    events) are buffered and written to Redis in pipelines of up to ``max_size``
    commands, the rest when the block ends (kombu's ``Producer.batch``, kombu 5.7 and
    later; an older kombu's producer publishes each message at once). Pass it to
    ``send_task(producer=...)``. An exception inside the block discards what was not
    yet written."""
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)
        if batch is None:
            yield producer
            return
        with batch(max_size=max_size):
            yield producer


# ---- reading messages ---------------------------------------------------------------


def _task_id_of_payload(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    headers = payload.get("headers")
    if isinstance(headers, dict) and isinstance(headers.get("id"), str):
        return str(headers["id"])
    properties = payload.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get("correlation_id"), str):
        return str(properties["correlation_id"])
    return None


def task_id_of_message(raw: bytes | str) -> str | None:
    """The Celery task id of a message as it waits in a queue's list; None when the
    message is not one (not JSON, or no id)."""
    try:
        return _task_id_of_payload(json.loads(raw))
    except ValueError:
        return None


def task_id_of_unacked(raw: bytes | str) -> str | None:
    """The Celery task id of an ``unacked`` entry (``[payload, exchange, routing_key]``)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, list) or not entry:
        return None
    return _task_id_of_payload(entry[0])


def queued_task_ids(
    client: redis.Redis,
    lists: Iterable[str],
    *,
    page: int = 1000,
    each_page: Callable[[], object] | None = None,
) -> set[str]:
    """Task ids waiting in ``lists``, read a page at a time (a message taken by a
    consumer meanwhile may be missed; one pushed back may be seen twice);
    ``each_page`` is called after every page."""
    found: set[str] = set()
    for name in lists:
        start = 0
        while True:
            chunk: list[bytes] = client.lrange(name, start, start + page - 1)  # type: ignore[assignment]
            for raw in chunk:
                if (tid := task_id_of_message(raw)) is not None:
                    found.add(tid)
            if each_page is not None:
                each_page()
            if len(chunk) < page:
                break
            start += page
    return found


def unacked_task_ids(client: redis.Redis) -> set[str]:
    """Task ids of every delivered, unacknowledged message."""
    values: list[bytes] = client.hvals(UNACKED_KEY)  # type: ignore[assignment]
    return {tid for raw in values if (tid := task_id_of_unacked(raw)) is not None}


# ---- taking a job's messages off a list -------------------------------------------------

# Takes the messages whose task id starts with ARGV[2] out of the oldest ARGV[1]
# messages of a list (one priority list of a queue) and puts the others back at the
# other end, in their order. Called once per slice until the whole list has gone
# round, so Redis is never busy for long and the list is in its original order
# again at the end; meanwhile, tasks behind the slices already moved can be taken
# first. A message whose text contains the prefix at all is parsed (cjson) and its
# id read from its headers: nothing depends on how the JSON was spaced, and the
# other jobs' messages cost a substring search, not a parse (a parse of a message
# of 4 KB takes about 70 us of Redis's time). A message that does not parse stays.
_PURGE_SLICE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #items == 0 then return 0 end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
local prefix = ARGV[2]
local keep = {}
local n = 0
for i = #items, 1, -1 do
  local id = nil
  if string.find(items[i], prefix, 1, true) then
    local ok, msg = pcall(cjson.decode, items[i])
    if ok and type(msg) == 'table' and type(msg.headers) == 'table' then id = msg.headers.id end
  end
  if type(id) == 'string' and string.sub(id, 1, #prefix) == prefix then
    n = n + 1
  else
    keep[#keep + 1] = items[i]
  end
end
for i = 1, #keep, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep)))
end
return n
"""


def purge_task_prefix(
    client: redis.Redis, lists: Iterable[str], prefix: str, *, slice_: int
) -> int:
    """Remove from ``lists`` every waiting message whose task id starts with ``prefix``,
    ``slice_`` messages per script call; how many were removed."""
    names = list(lists)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    lengths = pipe.execute()
    script = client.register_script(_PURGE_SLICE)
    removed = 0
    for name, length in zip(names, lengths, strict=True):
        left = int(length)
        while left > 0:  # every message once round, and no further
            step = min(slice_, left)
            removed += int(script(keys=[name], args=[step, prefix]))
            left -= step
    return removed


# ---- putting a delivery back on its queue -----------------------------------------------

# Moves one delivery back to its queue if, and only if, its ``unacked`` entry is
# still the one read (compare-and-swap): an ack, kombu's own restore or another
# restorer in between leaves nothing to move, so a delivery goes back at most once.
# KEYS: unacked, unacked_index, then the hashes whose entry for the tag goes with it,
# then the lists to push to. ARGV: tag, the entry as read, the number of hashes,
# the payload to push.
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local hashes = tonumber(ARGV[3])
for i = 3, 2 + hashes do redis.call('HDEL', KEYS[i], ARGV[1]) end
for i = 3 + hashes, #KEYS do redis.call('RPUSH', KEYS[i], ARGV[4]) end
return 1
"""


def restore_target(channel: Any, entry: bytes | str) -> tuple[list[str], str] | None:
    """Where kombu's restore would push an ``unacked`` entry, and what: the lists
    (one per queue its exchange and routing key lead to, at the message's priority)
    and the payload marked redelivered. None when the entry cannot be restored (kombu
    logs and drops such a message too)."""
    try:
        payload, exchange, routing_key = kombu_loads(entry)
        # kombu's _do_restore_message: the redelivered flags, then every bound queue.
        try:
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        except KeyError:
            pass
        pri = channel._get_message_priority(payload, reverse=False)
        lists = [channel._q_for_pri(queue, pri) for queue in channel._lookup(exchange, routing_key)]
        return lists, kombu_dumps(payload)
    except channel.connection_errors:
        raise
    except Exception:
        log.critical("could not restore message: %r", entry, exc_info=True)
        return None


def restore_delivery(
    channel: Any, client: redis.Redis, tag: str, *, forget: Sequence[str] = ()
) -> bytes | None:
    """Put one unacknowledged delivery back on its queue the way kombu's restore does,
    if it is still unacknowledged; the ``unacked`` entry that was moved, or None.

    ``forget``: hashes (keyed by delivery tag) whose entry for ``tag`` is removed in
    the same step. An entry kombu could not restore is removed without a push, as
    kombu's own restore does.
    """
    raw: bytes | None = client.hget(UNACKED_KEY, tag)  # type: ignore[assignment]
    if raw is None:
        return None
    target = restore_target(channel, raw)
    lists, payload = target if target is not None else ([], "")
    moved = client.register_script(_RESTORE)(
        keys=[UNACKED_KEY, UNACKED_INDEX_KEY, *forget, *lists],
        args=[tag, raw, len(forget), payload],
    )
    return raw if int(moved) else None

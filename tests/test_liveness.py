"""Dead and frozen workers under default settings: heartbeats, recovery of held tasks,
the sweep for tasks lost on the way. Real Redis, real worker processes, real signals."""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.api import Client
from producer.metrics import LivenessCollector
from shared.liveness import RECOVERED_KEY, RESENT_KEY, BrokerRedis, Liveness
from shared.priority import queue_lists
from tests.conftest import WorkerProcess, run_cli
from tests.test_faults import assert_exactly_once, make_images, succeeded, wait_for

pytestmark = pytest.mark.slow

# Each batch waits for images that never come: a job lasts long enough to be
# interrupted, without burning the CPU. Everything else: the shipped defaults
# (a one-hour visibility timeout, a 10 s heartbeat timeout).
SLOW = {"IMGQ_MAX_BATCH_DELAY_MS": "150"}


def recovered(client: Client) -> int:
    raw = client.store.client.get(RECOVERED_KEY)
    return int(raw or 0)


def recovered_from(client: Client) -> set[str]:
    """Node names (before the @) of the workers whose tasks were recovered."""
    events = Liveness(client.store.client, timeout=10).recoveries()
    return {str(e["worker"]).split("@")[0] for e in events if e.get("worker")}


def wait_finished(client: Client, job_id: str, timeout: float) -> float:
    """Poll (no waiting producer: it would recover tasks too) until the job finished;
    the time it finished."""
    wait_for(lambda: client.job(job_id).status().finished, timeout, f"job {job_id} to finish")
    return time.monotonic()


def test_two_of_three_workers_killed_their_tasks_come_back_in_seconds(
    start_worker: Callable[..., WorkerProcess],
    client: Client,
    imgq_env: dict[str, str],
    tmp_path: Path,
) -> None:
    assert client.settings.visibility_timeout == 3600  # the shipped default
    images = make_images(tmp_path / "imgs", 300, size=(64, 48))
    args = ("--concurrency", "2")
    a = start_worker("tfault", name="live-a", env=SLOW, args=args)
    b = start_worker("tfault", name="live-b", env=SLOW, args=args)
    c = start_worker("tfault", name="live-c", env=SLOW, args=args)
    before = recovered(client)
    job = client.submit(images, models=["tfault"], chunk_size=2)
    wait_for(lambda: succeeded(a) >= 2, 120, "worker A to get going")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(30)
    wait_for(lambda: succeeded(b) >= succeeded(a) + 4, 120, "worker B to carry on")
    assert not job.status().finished, "the job must outlast the kills"
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(30)
    last_kill = time.time()
    # What "back in seconds" means: the dead worker's deliveries are put back on their
    # queues within seconds of the kill. How long the rest of the job then takes is
    # the survivor's throughput, which a busy machine slows down.
    wait_for(lambda: "live-b" in recovered_from(client), 60, "worker B's tasks to be recovered")
    back = min(
        float(e["at"])
        for e in Liveness(client.store.client, timeout=10).recoveries()
        if str(e.get("worker", "")).startswith("live-b@")
    )
    assert back - last_kill < 30
    wait_finished(client, job.job_id, 300)
    assert job.status().models["tfault"].as_dict() == {
        "total": 300,
        "done": 300,
        "failed": 0,
        "pending": 0,
    }
    records = job.results()
    assert_exactly_once(records, images, ["tfault"])
    assert all(r.error is None for r in records)
    # Both deaths were noticed and recorded (by C, or by any other live worker on
    # this Redis), and said so in a log line; the counter moved.
    assert {"live-a", "live-b"} <= recovered_from(client)
    assert any(
        "live-a@" in text and "put back on their queues" in text
        for text in (p.read_text(errors="replace") for p in c.log.parent.glob("*.log"))
    )
    assert recovered(client) > before
    # Dead workers are listed as such; the counter is exported.
    listing = run_cli(["workers", "--json"], imgq_env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    state = {w["name"].split("@")[0]: w["alive"] for w in json.loads(listing.stdout)["workers"]}
    assert state["live-a"] is False and state["live-b"] is False and state["live-c"] is True
    metrics = {
        m.name: m.samples[0].value
        for m in LivenessCollector(BrokerRedis(client.app)).collect()
        if m.name.startswith("imgq_tasks")
    }
    assert metrics["imgq_tasks_recovered"] == recovered(client) > before
    c.stop()


def test_frozen_worker_comes_back_without_doubling_anything(
    start_worker: Callable[..., WorkerProcess], client: Client, tmp_path: Path
) -> None:
    images = make_images(tmp_path / "imgs", 120, size=(64, 48))
    args = ("--concurrency", "2")
    a = start_worker("tfault", name="frozen-a", env=SLOW, args=args)
    b = start_worker("tfault", name="frozen-b", env=SLOW, args=args)
    job = client.submit(images, models=["tfault"], chunk_size=2)
    wait_for(lambda: succeeded(a) >= 2, 120, "worker A to get going")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        # Longer than the heartbeat timeout: A counts as dead, B takes its tasks.
        wait_for(lambda: "frozen-a" in recovered_from(client), 40, "A's tasks to be recovered")
        time.sleep(2)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_finished(client, job.job_id, 120)
    status = job.status().models["tfault"]
    assert status.as_dict() == {"total": 120, "done": 120, "failed": 0, "pending": 0}
    assert status.tasks_finished == status.tasks_total == 60
    records = job.results()
    assert_exactly_once(records, images, ["tfault"])
    assert all(r.error is None for r in records)
    # A carries on: alive again, and it alone finishes the next job.
    b.stop()
    wait_for(
        lambda: any(
            w.alive and w.name.startswith("frozen-a@")
            for w in Liveness(client.store.client, timeout=10).workers()
        ),
        30,
        "A to be alive again",
    )
    more = make_images(tmp_path / "more", 8, size=(64, 48))
    job2 = client.submit(more, models=["tfault"], chunk_size=2)
    job2.wait(progress=False, timeout=120)
    assert_exactly_once(job2.results(), more, ["tfault"])
    assert a.proc.poll() is None
    a.stop()


def test_a_lost_message_of_a_job_nobody_waits_for_is_sent_again(
    start_worker: Callable[..., WorkerProcess], client: Client, tmp_path: Path
) -> None:
    # A database of its own: one sweep runs at a time per Redis, and the workers of
    # other tests sweep with the default grace (60 s), not this test's.
    url = client.settings.broker_url.rsplit("/", 1)[0] + "/8"
    client = Client(client.settings.model_copy(update={"broker_url": url}))
    # A worker killed between taking a message off the queue and recording it as
    # taken loses it: simulated by deleting the queue before any worker runs.
    images = make_images(tmp_path / "imgs", 4, size=(64, 48))
    job = client.submit(images, models=["tsolo"], chunk_size=2)
    assert client.store.client.delete(*queue_lists("imgq.tsolo")) == 1
    resent = int(client.store.client.get(RESENT_KEY) or 0)
    worker = start_worker(
        "tsolo", name="sweeper", env={"IMGQ_SWEEP_GRACE": "3", "IMGQ_BROKER_URL": url}
    )
    try:
        wait_finished(client, job.job_id, 90)  # no producer waits
        assert_exactly_once(job.results(), images, ["tsolo"])
        # Sent again by this worker's sweep, the only one on this database.
        assert int(client.store.client.get(RESENT_KEY) or 0) >= resent + 2
    finally:
        worker.stop()


def test_kill_loop_loses_and_doubles_nothing(
    start_worker: Callable[..., WorkerProcess], client: Client, tmp_path: Path
) -> None:
    # 600 tasks of about 150 ms on 3 workers: over 30 s, for kills about 1 s apart (a
    # worker on the numpy runtime is back in about a second).
    images = make_images(tmp_path / "imgs", 1200, size=(32, 24))
    rng = random.Random(12)
    # Each task waits for company it never gets (one task at a time, batches of 8),
    # so a worker spends most of its time mid-task, where the kills land.
    # A kill between a message's BRPOP and its record as taken loses the message: the
    # sweep sends it again once the job stalls for IMGQ_SWEEP_GRACE (60 s by default).
    env = {"IMGQ_MAX_BATCH_DELAY_MS": "150", "IMGQ_SWEEP_GRACE": "5"}
    args = ("--concurrency", "1")
    slots = [
        start_worker("tfault", name=f"loop{i}", env=env, args=args, wait=False) for i in range(3)
    ]
    job = client.submit(images, models=["tfault"], chunk_size=2)
    kills = 0
    while kills < 10:
        # A random moment in the work of a random busy worker (a kill during
        # start-up would only test start-up).
        wait_for(lambda: any(succeeded(w) > 0 for w in slots), 180, "a worker to get going")
        i = rng.choice([i for i, w in enumerate(slots) if succeeded(w) > 0])
        time.sleep(rng.uniform(0, 2))
        assert not job.status().finished, f"the job must outlast ten kills ({kills} so far)"
        slots[i].proc.send_signal(signal.SIGKILL)
        slots[i].proc.wait(30)
        kills += 1
        # Restarted at once, as a supervisor would.
        slots[i] = start_worker("tfault", name=f"loop{i}-{kills}", env=env, args=args, wait=False)
    wait_finished(client, job.job_id, 300)
    status = job.status().models["tfault"]
    assert status.as_dict() == {"total": 1200, "done": 1200, "failed": 0, "pending": 0}
    records = job.results()
    assert_exactly_once(records, images, ["tfault"])
    assert all(r.error is None for r in records)
    for w in slots:
        w.stop()


def test_reclaim_puts_back_only_abandoned_deliveries(client: Client) -> None:
    """Against kombu's own bookkeeping, without workers: deliveries claimed by a live
    worker, or too fresh to be claimed yet, stay; one claimed by a dead worker and one
    nobody claimed for 10 s go back on their queue, once, though two processes reclaim."""
    from shared.kombu_redis import UNACKED_INDEX_KEY, UNACKED_KEY
    from shared.liveness import HELD_KEY, Reclaimer, alive_key

    # A database of its own: the live workers of other tests recover abandoned
    # deliveries too, and would race the two reclaimers here.
    url = client.settings.broker_url.rsplit("/", 1)[0] + "/7"
    client = Client(client.settings.model_copy(update={"broker_url": url}))
    broker = BrokerRedis(client.app)
    r = broker.client
    queue = "imgq.tnobody"
    now = time.time()
    cases = {  # tag -> (claimed by, delivered at)
        "tag-live": ("w-live", now - 30),
        "tag-dead": ("w-dead", now - 30),
        "tag-orphan": (None, now - 30),
        "tag-fresh": (None, now - 1),
    }
    for n, (tag, (owner, at)) in enumerate(cases.items()):
        # A real message sent to a real queue, then taken the way kombu's QoS takes it.
        client.app.send_task(
            "imgq.classify", args=["j", "tnobody", n, []], task_id=tag, queue=queue
        )
        raw = r.rpop(queue)
        assert raw is not None
        r.hset(UNACKED_KEY, tag, f'[{raw.decode()}, "{queue}", "{queue}"]')
        r.zadd(UNACKED_INDEX_KEY, {tag: at})
        if owner:
            r.hset(HELD_KEY, tag, owner)
    r.set(alive_key("w-live"), "{}", px=10_000)
    one = Reclaimer(broker, timeout=10, by="one")
    two = Reclaimer(BrokerRedis(client.app), timeout=10, by="two")
    try:
        first = one.run(lock_s=0.001)
        time.sleep(0.01)
        second = two.run(lock_s=0.001)
        assert sorted((x.worker_id or "", x.task_ids) for x in first) == [
            ("", ["tag-orphan"]),
            ("w-dead", ["tag-dead"]),
        ]
        assert second == []
        assert {t for t in cases if r.hexists(UNACKED_KEY, t)} == {"tag-live", "tag-fresh"}
        assert not r.hexists(HELD_KEY, "tag-dead")
        back = [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]
        assert sorted(back) == ["tag-dead", "tag-orphan"]  # back on the queue, once each
    finally:
        r.delete(queue)
        for tag in cases:
            r.hdel(UNACKED_KEY, tag)
            r.zrem(UNACKED_INDEX_KEY, tag)
            r.hdel(HELD_KEY, tag)
        broker.close()
        two.broker.close()

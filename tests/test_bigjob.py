"""Streaming submit on a real Redis: a job recorded and queued while its sources are
listed, totals known at the end, a listing that fails part-way, work that starts
before the listing ends (on a real worker)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import listing
from producer.api import Client, JobCancelledError
from producer.sources import SourceError
from shared import keys
from shared.jobctl import JobState, cancel_job, state_of
from shared.jobs import ListingCancelled, task_id
from shared.kombu_redis import queued_task_ids
from shared.priority import queue_lists
from shared.registry import queue_for
from shared.schemas import ImageRef
from shared.settings import Settings
from tests.conftest import RedisServer, run_cli

MODEL = "tbig"  # no worker serves it: its tasks stay queued


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Redis of this module's own and a model nobody serves."""
    server = RedisServer(tmp_path_factory.mktemp("bigjob-redis")).start()
    folder = tmp_path_factory.mktemp("bigjob")
    models = folder / "models.toml"
    models.write_text(
        f'[models.{MODEL}]\nhandle = "/nowhere"\nlabels = "imagenet1k"\n', encoding="utf-8"
    )
    out = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    out.update(IMGQ_BROKER_URL=server.url, IMGQ_MODELS_FILE=str(models), IMGQ_CHUNK_SIZE="4")
    try:
        yield out
    finally:
        server.stop()


@pytest.fixture
def client(env: dict[str, str]) -> Client:
    return Client(
        Settings(
            broker_url=env["IMGQ_BROKER_URL"], models_file=env["IMGQ_MODELS_FILE"], chunk_size=4
        )
    )


def queued(client: Client, job_id: str) -> set[str]:
    ids = queued_task_ids(client.broker.client, queue_lists(queue_for(MODEL)))
    return {t for t in ids if t.startswith(f"{job_id}.")}


def refs(n: int, start: int = 0) -> Iterator[ImageRef]:
    for i in range(start, start + n):
        yield ImageRef(src=f"/data/roll-{i // 100:03d}/IMG_{i:06d}.jpg", ref=f"/data/{i}.jpg")


def test_a_generator_is_recorded_and_queued_while_it_is_listed(client: Client) -> None:
    """Tasks are queued as chunks are listed; the job says "listing" and is not finished
    (even with every task sent so far done) until its totals are known."""
    job_id = "big-gen"
    seen: dict[str, object] = {}

    def sources() -> Iterator[ImageRef]:
        yield from refs(12)  # three chunks: batches of one, then two, went out
        status = client.job(job_id).status()
        for model in status.job.models:  # every task sent so far finished
            for index in range(status.job.n_chunks):
                client.store.mark_finished(task_id(job_id, model, index), ok=4, failed=0)
        status = client.job(job_id).status()
        seen.update(
            state=state_of(status),
            finished=status.finished,
            n_chunks=status.job.n_chunks,
            total=status.job.total_images,
            queued=len(queued(client, job_id)),
        )
        yield from refs(30, 12)

    job = client.submit(sources(), models=[MODEL], job_id=job_id)
    assert seen["state"] is JobState.LISTING and seen["finished"] is False
    assert seen["n_chunks"] == 3 and seen["total"] == 12 and seen["queued"] == 3
    record = client.store.get(job_id)
    assert not record.listing and not record.listing_error
    assert (record.total_images, record.n_chunks) == (42, 11)
    assert job.record == record
    assert record.chunk_len(10) == 2
    assert client.store.chunk(job_id, 10) == list(refs(2, 40))
    assert len(queued(client, job_id)) == 11
    assert state_of(job.status()) is JobState.RUNNING
    assert client.store.client.exists(keys.job_listing(job_id)) == 0  # the lease is gone
    client.delete(job_id)


def test_a_listing_that_fails_part_way_leaves_a_job_that_says_so(
    client: Client, env: dict[str, str], tmp_path: Path
) -> None:
    """A bad manifest line after some chunks went out: the submit fails with it, and
    the job is cancelled with the error in its record, its queued tasks gone."""
    manifest = tmp_path / "list.jsonl"
    lines = [f'"/data/{i}.jpg"' for i in range(30)] + ["{not json"]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"list.jsonl:31: not JSON"):
        client.submit([f"@{manifest}"], models=[MODEL], job_id="big-fail")
    record = client.store.get("big-fail")
    assert record.cancelled is not None and not record.listing
    assert "the listing failed after" in record.listing_error
    assert "list.jsonl:31: not JSON" in record.listing_error
    assert record.n_chunks >= 1  # chunks had been recorded, and their tasks sent
    assert queued(client, "big-fail") == set()
    with pytest.raises(JobCancelledError, match=r"was cancelled .*list.jsonl:31"):
        client.job("big-fail").wait(progress=False, timeout=5)
    out = run_cli(["status", "big-fail"], env)
    assert out.returncode == 0, out.stderr
    assert "cancelled" in out.stdout and "list.jsonl:31: not JSON" in out.stdout
    client.delete("big-fail")


def test_a_source_that_fails_before_the_first_chunk_records_no_job(
    client: Client, tmp_path: Path
) -> None:
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('"/a.jpg"\n[1]\n', encoding="utf-8")
    with pytest.raises(SourceError, match="expected a string"):
        client.submit([f"@{manifest}"], models=[MODEL], job_id="big-none")
    assert not client.store.client.exists(keys.job("big-none"))
    with pytest.raises(ValueError, match="no images"):
        client.submit(iter(()), models=[MODEL], job_id="big-none")


def test_a_job_cancelled_while_it_is_listed_stops_its_listing(client: Client) -> None:
    job_id = "big-cancel"

    def sources() -> Iterator[ImageRef]:
        yield from refs(8)
        while not client.store.client.exists(keys.job(job_id)):
            time.sleep(0.01)
        time.sleep(listing.MAX_DELAY_S)
        yield from refs(4, 8)  # the batch goes out
        cancel_job(client.store, client.broker.client, job_id)
        yield from refs(400, 12)  # never recorded

    with pytest.raises(ListingCancelled, match="cancelled while its sources were listed"):
        client.submit(sources(), models=[MODEL], job_id=job_id)
    record = client.store.get(job_id)
    assert record.cancelled is not None and record.n_chunks <= 3
    assert queued(client, job_id) == set()
    client.delete(job_id)


@pytest.mark.slow
def test_workers_start_before_the_listing_ends(
    imgq_env: dict[str, str], shared_worker: object, tmp_path: Path
) -> None:
    """The first chunks run while the generator still holds the rest back."""
    real = Client(  # the tests' broker, served by the shared worker
        Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=imgq_env["IMGQ_MODELS_FILE"])
    )
    job_id = f"big-start-{os.getpid()}"
    missing = [str(tmp_path / f"missing{i}.jpg") for i in range(8)]
    started: list[bool] = []

    def sources() -> Iterator[str]:
        yield from missing[:4]
        deadline = time.monotonic() + 60
        while not real.store.client.hlen(keys.job_done(job_id)):
            assert time.monotonic() < deadline, "no task ran while the listing went on"
            time.sleep(0.02)
        started.append(True)
        yield from missing[4:]

    job = real.submit(sources(), models=["t1001"], job_id=job_id, chunk_size=4)
    assert started
    status = job.wait(progress=False, timeout=60)
    assert status.finished and status.images_total == 8
    assert {r.error.code.value for r in job.results() if r.error} == {"not_found"}
    real.delete(job_id)


def test_queued_tasks_are_compressed_in_redis_and_still_cancelled_in_order(
    client: Client,
) -> None:
    """The Redis that imgq starts compresses the inner nodes of its lists: 1,000
    queued task messages take a fraction of their bytes, and the queue is read,
    cancelled and emptied across compressed nodes like any other."""
    r = client.broker.client
    assert r.config_get("list-compress-depth")["list-compress-depth"] == "1"
    job = client.submit(refs(4000), models=[MODEL], job_id="big-packed")
    lists = [q for q in queue_lists(queue_for(MODEL)) if r.llen(q)]
    raw = sum(len(m) for q in lists for m in r.lrange(q, 0, -1))
    stored = sum(int(r.memory_usage(q, samples=0) or 0) for q in lists)
    assert len(queued(client, job.job_id)) == 1000
    assert stored < raw / 3, (stored, raw)
    job.cancel()
    assert queued(client, job.job_id) == set()
    client.delete(job.job_id)

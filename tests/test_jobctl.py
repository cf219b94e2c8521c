"""Job control on a real Redis, without workers: names, priorities on the queues,
listing with states and counts, cancel (flag and queue removal), and the command
line's one-line errors and exit codes. End-to-end runs on real workers are in
tests/test_jobctl_workers.py."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from producer.api import Client, JobCancelledError, JobTimeout
from shared.jobctl import JobFinishedError, JobState, cancel_job, check_name
from shared.jobs import JobError, task_id
from shared.priority import (
    DEFAULT_PRIORITY,
    PriorityError,
    check_priority,
    queue_lists,
    transport_priority,
)
from shared.registry import queue_for
from shared.settings import Settings
from tests.conftest import ROOT, RedisServer, run_cli


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own: listings see only the jobs made here."""
    server = RedisServer(tmp_path_factory.mktemp("jobctl-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(own_redis: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A producer's environment: the module's Redis, two models no worker serves."""
    folder = tmp_path_factory.mktemp("jobctl")
    models = folder / "models.toml"
    models.write_text(
        '[models.jca]\nhandle = "/nowhere/a"\nlabels = "imagenet1k"\n\n'
        '[models.jcb]\nhandle = "/nowhere/b"\nlabels = "imagenet1k"\n',
        encoding="utf-8",
    )
    for i in range(12):
        (folder / f"img{i:02d}.jpg").write_bytes(b"not decoded by anyone here")
    out = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    out.update(
        IMGQ_BROKER_URL=own_redis,
        IMGQ_MODELS_FILE=str(models),
        IMGQ_CHUNK_SIZE="4",
        IMGQ_IMAGES=str(folder),
    )
    return out


@pytest.fixture
def client(env: dict[str, str]) -> Client:
    return Client(
        Settings(
            broker_url=env["IMGQ_BROKER_URL"], models_file=env["IMGQ_MODELS_FILE"], chunk_size=4
        )
    )


def images(env: dict[str, str], n: int = 12) -> list[str]:
    folder = Path(env["IMGQ_IMAGES"])
    return sorted(str(p) for p in folder.glob("*.jpg"))[:n]


def queued_ids(r: redis.Redis, model: str) -> dict[str, list[str]]:
    """Task ids waiting in each of a model's priority lists (non-empty ones)."""
    out: dict[str, list[str]] = {}
    for key in queue_lists(queue_for(model)):
        raw: list[bytes] = r.lrange(key, 0, -1)  # type: ignore[assignment]
        if raw:
            out[key] = [json.loads(m)["headers"]["id"] for m in raw]
    return out


def test_priorities_names_and_transport_mapping() -> None:
    assert [transport_priority(p) for p in (0, 5, 9)] == [9, 4, 0]
    assert check_priority(DEFAULT_PRIORITY) == 5
    for bad in (-1, 10, 1.5, True, "3"):
        with pytest.raises(PriorityError):
            check_priority(bad)  # type: ignore[arg-type]
    lists = queue_lists("imgq.m")
    assert lists[0] == "imgq.m" and lists[9] == "imgq.m\x06\x169" and len(lists) == 10
    name = "nightly backfill: cats & dogs <2026>"
    assert check_name(name) == name
    for bad_name in ("two\nlines", "tab\there", "x" * 201):
        with pytest.raises(ValueError):
            check_name(bad_name)


def test_tasks_go_to_the_list_of_their_priority(client: Client, env: dict[str, str]) -> None:
    r = client.store.client
    low = client.submit(images(env, 8), models=["jca"], priority=0, name="low one")
    high = client.submit(images(env, 4), models=["jca"], priority=9)
    normal = client.submit(images(env, 4), models=["jca"])
    waiting = queued_ids(r, "jca")
    assert waiting[queue_for("jca") + "\x06\x169"] == low.record.task_ids("jca")[::-1]
    assert waiting[queue_for("jca")] == high.record.task_ids("jca")
    assert waiting[queue_for("jca") + "\x06\x164"] == normal.record.task_ids("jca")
    # The name and the job id are in what Flower shows as the task's arguments.
    raw = json.loads(r.lindex(queue_for("jca") + "\x06\x169", 0))  # type: ignore[arg-type]
    assert raw["headers"]["argsrepr"].startswith(f"(job='{low.job_id}', name='low one', ")
    # Once in each queued message, in its headers: not repeated in its properties.
    assert "argsrepr" not in raw["properties"] and "kwargsrepr" not in raw["properties"]
    record = client.job(low.job_id).record
    assert (record.name, record.priority) == ("low one", 0)
    assert client.job(normal.job_id).record.priority == DEFAULT_PRIORITY
    for job in (low, high, normal):
        job.cancel()
    assert queued_ids(r, "jca") == {}


def test_cancel_removes_only_that_jobs_waiting_tasks(client: Client, env: dict[str, str]) -> None:
    r = client.store.client
    doomed = client.submit(images(env), models=["jca", "jcb"], name="wrong folder")
    kept = client.submit(images(env, 4), models=["jca"])
    # One task of the doomed job is done, as if a worker had finished it.
    client.store.mark_finished(task_id(doomed.job_id, "jca", 0), ok=3, failed=1)
    assert not client.store.is_cancelled(doomed.job_id)
    outcome = doomed.cancel()
    assert outcome.removed_tasks == 2 * 3  # 3 chunks x 2 models were waiting
    assert not outcome.already and outcome.status.cancelled
    assert client.store.is_cancelled(doomed.job_id)
    assert queued_ids(r, "jca") == {queue_for("jca") + "\x06\x164": kept.record.task_ids("jca")}
    assert queued_ids(r, "jcb") == {}
    # Results so far stay counted; the rest are pending for good.
    status = doomed.status()
    assert status.models["jca"].as_dict() == {"total": 12, "done": 3, "failed": 1, "pending": 8}
    assert status.models["jcb"].pending == 12
    # A cancelled job is not sent again by a resume, and a second cancel says so.
    assert doomed.resend_unfinished() == 0
    assert queued_ids(r, "jcb") == {}
    assert cancel_job(client.store, client.broker.client, doomed.job_id).already
    with pytest.raises(JobCancelledError, match="cancelled"):
        doomed.wait(progress=False, timeout=5)
    kept.cancel()


def test_cancel_of_a_finished_or_unknown_job_is_refused(
    client: Client, env: dict[str, str]
) -> None:
    job = client.submit(images(env, 4), models=["jca"], chunk_size=4)
    client.store.mark_finished(task_id(job.job_id, "jca", 0), ok=4, failed=0)
    with pytest.raises(JobFinishedError, match="already finished"):
        job.cancel()
    assert not client.store.is_cancelled(job.job_id)
    with pytest.raises(JobError, match="unknown or has expired"):
        client.cancel("never-was")
    with pytest.raises(JobError, match="must be 1-64"):
        client.cancel("bad.id")


def test_jobs_lists_every_state_with_its_counts(client: Client, env: dict[str, str]) -> None:
    imgs = images(env, 8)
    queued = client.submit(imgs, models=["jca"], name="q")
    running = client.submit(imgs, models=["jca", "jcb"], name="r")
    client.store.mark_finished(task_id(running.job_id, "jcb", 1), ok=4, failed=0)
    finished = client.submit(imgs, models=["jca"], name="f")
    client.store.mark_finished(task_id(finished.job_id, "jca", 0), ok=4, failed=0)
    client.store.mark_finished(task_id(finished.job_id, "jca", 1), ok=2, failed=2)
    cancelled = client.submit(imgs, models=["jcb"], name="c", priority=8)
    client.store.mark_finished(task_id(cancelled.job_id, "jcb", 0), ok=1, failed=3)
    cancelled.cancel()

    listed = client.jobs(limit=4)
    assert [j.job_id for j in listed] == [
        cancelled.job_id,
        finished.job_id,
        running.job_id,
        queued.job_id,
    ]
    got = {j.name: (j.state, j.total, j.done, j.failed, j.pending) for j in listed}
    assert got == {
        "q": (JobState.QUEUED, 8, 0, 0, 8),
        "r": (JobState.RUNNING, 16, 4, 0, 12),
        "f": (JobState.FINISHED, 8, 6, 2, 0),
        "c": (JobState.CANCELLED, 8, 1, 3, 4),
    }
    only = client.jobs(limit=10, states={JobState.FINISHED, JobState.QUEUED})
    assert {j.name for j in only} >= {"f", "q"}
    assert {j.state for j in only} <= {JobState.FINISHED, JobState.QUEUED}

    # The command line: the same, as JSON, filtered and limited.
    result = run_cli(["jobs", "--json", "--limit", "4"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["name"], r["state"], r["done"], r["pending"]) for r in rows] == [
        ("c", "cancelled", 1, 4),
        ("f", "finished", 6, 0),
        ("r", "running", 4, 12),
        ("q", "queued", 0, 8),
    ]
    assert rows[0]["priority"] == 8 and rows[0]["models"] == ["jcb"] and rows[0]["age_s"] >= 0
    result = run_cli(["jobs", "--state", "cancelled", "--limit", "1"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith(cancelled.job_id) and " cancelled " in lines[1]
    result = run_cli(["status", cancelled.job_id], env, timeout=60)
    assert result.returncode == 0
    assert f"job {cancelled.job_id} (c): cancelled, 8 images" in result.stdout
    assert "4 image results never made" in result.stdout
    for job in (queued, running):
        job.cancel()


def test_expired_jobs_leave_the_listing(client: Client, env: dict[str, str]) -> None:
    job = client.submit(images(env, 4), models=["jca"], name="short-lived")
    job.cancel()
    for suffix in ("", ":chunks", ":done"):
        client.store.client.delete(f"imgq:job:{job.job_id}{suffix}")
    assert job.job_id not in {j.job_id for j in client.jobs(limit=100)}
    assert client.store.client.zscore("imgq:jobs", job.job_id) is None


def test_command_line_errors_and_exit_codes(client: Client, env: dict[str, str]) -> None:
    imgs = images(env, 4)

    def cli(*args: str) -> tuple[int, str]:
        result = run_cli(list(args), env, timeout=60, cwd=ROOT)
        return result.returncode, result.stderr.strip()

    code, err = cli("wait", "never-submitted")
    assert code == 3 and "unknown or has expired" in err and len(err.splitlines()) == 1
    code, err = cli("cancel", "bad.id")
    assert code == 3 and "must be 1-64" in err and len(err.splitlines()) == 1
    code, err = cli("submit", *imgs, "--model", "jca", "--priority", "12")
    assert code == 2 and "12 is not in the range 0<=x<=9" in err and len(err.splitlines()) == 1
    code, err = cli("submit", *imgs, "--model", "jca", "--name", "two\nlines")
    assert code == 2 and "control characters" in err and "--name" in err
    code, err = cli("jobs", "--state", "lost")
    assert code == 2 and "'lost' is not one of" in err

    pending = client.submit(imgs, models=["jca"])
    code, err = cli("wait", pending.job_id, "--timeout", "0.5", "--no-progress")
    assert code == 4 and "not finished after 0.5 s" in err
    result = run_cli(["cancel", pending.job_id], env, timeout=60)
    assert result.returncode == 0 and f"cancelled job {pending.job_id}" in result.stdout
    code, err = cli("wait", pending.job_id, "--no-progress")
    assert code == 5 and "was cancelled" in err and f"imgq results {pending.job_id}" in err
    result = run_cli(["cancel", pending.job_id], env, timeout=60)
    assert result.returncode == 0 and "already cancelled" in result.stdout

    done = client.submit(imgs, models=["jca"], chunk_size=4)
    client.store.mark_finished(task_id(done.job_id, "jca", 0), ok=4, failed=0)
    code, err = cli("cancel", done.job_id)
    assert code == 6 and "already finished" in err and len(err.splitlines()) == 1
    result = run_cli(["wait", done.job_id, "--no-progress", "--out", "-"], env, timeout=60)
    assert result.returncode == 0 and "finished" in result.stdout


def test_wait_times_out_without_workers(client: Client, env: dict[str, str]) -> None:
    job = client.submit(images(env, 4), models=["jcb"])
    with pytest.raises(JobTimeout):
        job.wait(progress=False, timeout=0.3)
    job.cancel()


def test_cancel_in_slices_keeps_the_others_in_order(
    client: Client, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.jobctl

    monkeypatch.setattr(shared.jobctl, "PURGE_SLICE", 2)  # several slices, one odd-sized
    r = client.store.client
    before = client.submit(images(env), models=["jcb"])
    doomed = client.submit(images(env), models=["jcb"])
    after = client.submit(images(env, 8), models=["jcb"])
    assert doomed.cancel().removed_tasks == 3
    # Oldest last (the end workers take from), as the transport pushed them.
    expected = (before.record.task_ids("jcb") + after.record.task_ids("jcb"))[::-1]
    assert queued_ids(r, "jcb") == {queue_for("jcb") + "\x06\x164": expected}
    before.cancel()
    after.cancel()


def test_a_submit_cancelled_while_it_lists_exits_5_like_a_cancelled_wait(
    client: Client, env: dict[str, str], tmp_path: Path
) -> None:
    """The manifest is a pipe the test writes: the job exists, is cancelled, and only
    then does its listing go on; the submit stops with the cancel's exit code (5), not
    as a failure (1)."""
    import subprocess
    import sys

    manifest = tmp_path / "manifest"
    os.mkfifo(manifest)
    job_id = "jobctl-cancel-listing"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "submit", f"@{manifest}", "--model", "jca",
         "--job-id", job_id, "--wait", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pipe = os.open(manifest, os.O_WRONLY)  # unbuffered: each write reaches the pipe
        try:
            os.write(pipe, "".join(f"/nowhere/img{i:03d}.jpg\n" for i in range(8)).encode())
            deadline = time.monotonic() + 60
            while not client.store.client.exists(f"imgq:job:{job_id}"):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            client.cancel(job_id)
            # The submit may see the cancel and stop listing before it reads this.
            with contextlib.suppress(BrokenPipeError):
                os.write(pipe, "".join(f"/nowhere/img{i:03d}.jpg\n" for i in range(8, 40)).encode())
        finally:
            os.close(pipe)  # the end of the listing, when the submit reads on
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 5, err
    assert err.strip().splitlines()[-1] == (
        f"Error: job {job_id} was cancelled while its sources were listed"
    )
    assert client.store.get(job_id).cancelled is not None


def test_submit_wait_stops_when_the_job_is_cancelled(client: Client, env: dict[str, str]) -> None:
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "submit", *images(env, 4), "--model", "jca",
         "--job-id", "jobctl-cancel-waiting", "--wait", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not client.store.client.exists("imgq:job:jobctl-cancel-waiting"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        client.cancel("jobctl-cancel-waiting")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 5 and "was cancelled" in err.strip().splitlines()[-1]


def test_cancel_sends_the_completion_callback_once(env: dict[str, str]) -> None:
    from tests.notify_receiver import Receiver

    receiver = Receiver().start()
    try:
        client = Client(
            Settings(
                broker_url=env["IMGQ_BROKER_URL"],
                models_file=env["IMGQ_MODELS_FILE"],
                chunk_size=4,
                allow_private_urls=True,  # the receiver listens on loopback
            )
        )
        job = client.submit(images(env), models=["jca"], notify=receiver.url("/done"))
        assert not job.cancel().already
        (post,) = receiver.wait_for("/done", 1)
        body = json.loads(post.body)
        assert body["job_id"] == job.job_id and body["state"] == "cancelled"
        assert job.cancel().already  # a second cancel sends nothing more
        time.sleep(0.5)
        assert len(receiver.posts_to("/done")) == 1
    finally:
        receiver.stop()


def test_a_waiting_producer_reads_the_first_wake_at_once_then_paces_its_reads(
    client: Client, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each task finished wakes the producer. A poll with no news and the first
    notification are read at once (a job done in one task, a 1-image job on a GPU,
    ends with no pause); a notification right after another is read MIN_REFRESH_S
    after it (a big job finishes thousands of tasks a second)."""
    import producer.api as api
    from shared.jobs import ProgressListener

    job = client.submit(images(env, 8), models=["jca"], chunk_size=4)  # 2 tasks
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(api, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    wakes: list[int] = []  # the pauses taken before each wait
    finished = 0

    def wait(self: ProgressListener, timeout: float) -> bool:
        nonlocal finished
        wakes.append(len(sleeps))
        if len(wakes) == 1:
            return False  # a poll: nothing new
        # As a worker does it: the task recorded as finished, the waiter told.
        client.store.mark_finished(task_id(job.job_id, "jca", finished), ok=4, failed=0)
        finished += 1
        return True

    monkeypatch.setattr(ProgressListener, "wait", wait)
    status = job.wait(progress=False, timeout=30, poll_interval=0.01)
    assert status.finished and status.models["jca"].done == 8
    assert wakes == [0, 0, 0], "no pause before a wait, nor after a poll"
    # The second notification came right after the first read: its read waits.
    assert len(sleeps) == 1 and 0 < sleeps[0] <= api.MIN_REFRESH_S

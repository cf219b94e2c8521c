"""Completion callbacks on real workers: one signed POST per job, retried, taken over when
its sender dies or stops, private URLs refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.api import Client
from shared import keys
from shared.contract import task_id
from shared.jobs import JobStore
from shared.notify import (
    DELIVERY_HEADER,
    notify_if_ended,
    notify_job_end,
    resume_due,
    track_due,
)
from shared.schemas import ImageRef
from shared.settings import Settings
from tests.conftest import WorkerProcess, renamed_model_file, run_cli
from tests.notify_receiver import Receiver

pytestmark = pytest.mark.slow

# A model only this module's workers serve, so that its jobs end on them.
MODEL = "tnotify"
SECRET = "test-notify-secret"
ENV = {
    "IMGQ_ALLOW_PRIVATE_URLS": "true",  # the receiver listens on loopback
    "IMGQ_NOTIFY_SECRET": SECRET,
    "IMGQ_NOTIFY_BACKOFF": "0.2",
    # Enough tries that a sender never runs out of them in these tests.
    "IMGQ_NOTIFY_TRIES": "20",
    # The callback's lease lasts a heartbeat timeout: a dead sender's expires in 4 s.
    "IMGQ_HEARTBEAT_INTERVAL": "1",
    "IMGQ_HEARTBEAT_TIMEOUT": "4",
}
# After the first POST, how long to keep watching for a second one.
QUIET_S = 1.5


@pytest.fixture(scope="module")
def models_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models file with MODEL (the t1001 SavedModel under another name)."""
    return renamed_model_file(models_dir, tmp_path_factory.mktemp("notify-models"), MODEL)


@pytest.fixture(scope="module")
def workers(start_worker: Callable[..., WorkerProcess], models_file: Path) -> list[WorkerProcess]:
    """Two workers serving MODEL, allowed to call back to loopback."""
    env = {**ENV, "IMGQ_MODELS_FILE": str(models_file)}
    pair = [start_worker(MODEL, name=f"notify{i}", env=env, wait=False) for i in range(2)]
    for worker in pair:
        worker.wait_ready(120)
    return pair


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def make_client(imgq_env: dict[str, str], models_file: Path) -> Client:
    """A producer allowed to call back to loopback, with the workers' secret."""
    return Client(
        Settings(
            broker_url=imgq_env["IMGQ_BROKER_URL"],
            models_file=models_file,
            allow_private_urls=True,
            notify_secret=SECRET,
            notify_backoff=0.2,
            notify_tries=20,
        )
    )


def verify(post_headers: dict[str, str], body: bytes) -> None:
    """The signature header is HMAC-SHA256 of '<timestamp>.<body>' with SECRET."""
    timestamp = post_headers["x-imgq-timestamp"]
    assert abs(time.time() - int(timestamp)) < 300
    mac = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    assert hmac.compare_digest(post_headers["x-imgq-signature"], "sha256=" + mac.hexdigest())
    wrong = hmac.new(b"another secret", timestamp.encode() + b"." + body, hashlib.sha256)
    assert post_headers["x-imgq-signature"] != "sha256=" + wrong.hexdigest()


def test_one_signed_post_per_job_from_two_workers(
    workers: list[WorkerProcess],
    receiver: Receiver,
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    client = make_client(imgq_env, models_file)
    good = sorted(str(p) for p in photos.glob("*.jpg"))[:2]
    # Three jobs of two one-image chunks each, with a missing file so counts differ:
    # the two workers take a chunk each and finish the job's last chunks together.
    jobs = [
        client.submit(
            [good[0], good[1] if i else "/nonexistent/missing.jpg"],
            models=[MODEL],
            chunk_size=1,
            notify=receiver.url(f"/hook/{i}"),
        )
        for i in range(3)
    ]
    for job in jobs:
        job.wait(progress=False, timeout=120)  # the producer races the workers to send
    for i, job in enumerate(jobs):
        post = receiver.wait_for(f"/hook/{i}", 1)[0]
        assert post.status == 200
        verify(post.headers, post.body)
        doc = json.loads(post.body)
        failed = 0 if i else 1
        assert doc["job_id"] == job.job_id
        assert doc["state"] == "finished" and doc["event"] == "job.finished"
        assert doc["models"] == {
            MODEL: {"total": 2, "done": 2 - failed, "failed": failed, "pending": 0}
        }
        assert doc["totals"] == {"total": 2, "done": 2 - failed, "failed": failed, "pending": 0}
        assert doc["finished_at"].endswith("Z")
    time.sleep(QUIET_S)
    assert [len(receiver.posts_to(f"/hook/{i}")) for i in range(3)] == [1, 1, 1]


def test_receiver_failing_twice_gets_a_third_try(
    workers: list[WorkerProcess],
    receiver: Receiver,
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    receiver.fail_first = 2
    client = make_client(imgq_env, models_file)
    image = sorted(str(p) for p in photos.glob("*.jpg"))[0]
    job = client.submit([image], models=[MODEL], notify=receiver.url("/flaky"))
    job.wait(progress=False, timeout=120)
    posts = receiver.wait_for("/flaky", 3)
    assert [p.status for p in posts] == [503, 503, 200]
    assert len({p.body for p in posts}) == 1  # the same document each time
    # ... under the same delivery id, which the document carries too
    assert {p.headers[DELIVERY_HEADER.lower()] for p in posts} == {
        json.loads(posts[0].body)["delivery_id"]
    }
    verify(posts[2].headers, posts[2].body)
    time.sleep(QUIET_S)
    assert len(receiver.posts_to("/flaky")) == 3


def test_simultaneous_ends_claim_once_and_all_failed_is_failed(
    receiver: Receiver, imgq_env: dict[str, str]
) -> None:
    """Eight threads see the end of a job whose every image failed at the same moment."""
    client = redis.Redis.from_url(imgq_env["IMGQ_BROKER_URL"])
    store = JobStore(client, ttl=600)
    jid = "notify-race-" + uuid.uuid4().hex[:8]
    chunks = [[ImageRef(src=f"/x/{i}.jpg", ref=f"/x/{i}.jpg")] for i in range(3)]
    store.create(jid, ["m1"], chunks, chunk_size=1, notify=receiver.url("/race"))
    settings = Settings(
        broker_url=imgq_env["IMGQ_BROKER_URL"], allow_private_urls=True, notify_backoff=0.2
    )
    # A process not allowed to reach the receiver does not take the claim from others.
    strict = Settings(broker_url=imgq_env["IMGQ_BROKER_URL"])
    assert notify_job_end(store, jid, "failed", strict) is None
    assert not client.exists(keys.job_callback_lease(jid), keys.job_callback(jid))
    store.mark_finished(task_id(jid, "m1", 0), ok=0, failed=1)
    assert notify_if_ended(store, jid, settings) is False  # two chunks to go
    for i in (1, 2):
        store.mark_finished(task_id(jid, "m1", i), ok=0, failed=1)
    start = threading.Barrier(8)
    sent: list[bool] = []

    def see_end() -> None:
        start.wait()
        sent.append(notify_if_ended(store, jid, settings))

    threads = [threading.Thread(target=see_end) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(sent) == [False] * 7 + [True]
    post = receiver.wait_for("/race", 1)[0]
    doc = json.loads(post.body)
    assert doc["state"] == "failed" and doc["totals"]["failed"] == 3
    assert "x-imgq-signature" not in post.headers  # no secret in these settings
    # A cancel seen later (issue 13's path) finds the job claimed too.
    assert notify_job_end(store, jid, "cancelled", settings) is None
    time.sleep(QUIET_S)
    assert len(receiver.posts_to("/race")) == 1


def test_an_end_nobody_saw_is_found_by_the_scan(
    receiver: Receiver, imgq_env: dict[str, str]
) -> None:
    """The process that recorded a job's last task died before taking the callback's
    lease: the job is in the due set since its submit, so a scan sends the callback.
    Jobs deleted or expired meanwhile leave the set."""
    client = redis.Redis.from_url(imgq_env["IMGQ_BROKER_URL"])
    store = JobStore(client, ttl=600)
    jid = "notify-unseen-" + uuid.uuid4().hex[:8]
    gone = "notify-gone-" + uuid.uuid4().hex[:8]
    store.create(jid, ["m1"], [[ImageRef(src="/x.jpg", ref="/x.jpg")]], chunk_size=1,
                 notify=receiver.url("/unseen"))  # fmt: skip
    track_due(store, jid)
    client.zadd(keys.CALLBACKS_DUE, {gone: 0})
    settings = Settings(
        broker_url=imgq_env["IMGQ_BROKER_URL"], allow_private_urls=True, notify_backoff=0.2
    )
    store.mark_finished(task_id(jid, "m1", 0), ok=1, failed=0)  # ... and nothing more
    deadline = time.monotonic() + 30
    while not receiver.posts_to("/unseen"):
        assert time.monotonic() < deadline
        resume_due(store, settings)  # the workers scan too: whoever takes the lease sends
        time.sleep(0.1)
    post = receiver.wait_for("/unseen", 1)[0]
    assert json.loads(post.body)["state"] == "finished"
    while client.zscore(keys.CALLBACKS_DUE, jid) is not None:  # removed with the outcome
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while client.zscore(keys.CALLBACKS_DUE, gone) is not None:  # removed by a scan
        assert time.monotonic() < deadline
        resume_due(store, settings)
        time.sleep(0.1)
    time.sleep(QUIET_S)
    assert len(receiver.posts_to("/unseen")) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/hook", "refused to notify 127.0.0.1: a loopback address"),
        ("http://10.1.2.3/hook", "refused to notify 10.1.2.3: a private address"),
        ("http://localhost:9/hook", "refused to notify localhost (it resolves to"),
        ("ftp://example.com/hook", "must be an http:// or https:// URL with a host"),
    ],
)
def test_refused_notify_url_fails_the_submit(
    url: str, message: str, imgq_env: dict[str, str], photos: Path
) -> None:
    image = sorted(str(p) for p in photos.glob("*.jpg"))[0]
    result = run_cli(["submit", image, "-m", "t1001", "--notify", url], imgq_env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr  # a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "submitted job" not in result.stdout


def sender_of(store: JobStore, job_id: str, workers: list[WorkerProcess]) -> WorkerProcess:
    """The worker holding the job's callback lease (its value is host/pid/random)."""
    deadline = time.monotonic() + 30
    while True:
        raw = store.client.get(keys.job_callback_lease(job_id))
        if raw is not None:
            pid = int(raw.decode().split("/")[1])
            return next(w for w in workers if w.running.pid == pid)
        assert time.monotonic() < deadline, "nobody holds the callback's lease"
        time.sleep(0.05)


def test_sender_killed_mid_retry_another_worker_delivers(
    workers: list[WorkerProcess],
    receiver: Receiver,
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    """SIGKILL the worker that retries a callback: the other worker takes it over once the
    lease expires, and POSTs the same document under the same delivery id."""
    receiver.fail_first = 1000  # down until told otherwise
    client = make_client(imgq_env, models_file)
    image = sorted(str(p) for p in photos.glob("*.jpg"))[0]
    job = client.submit([image], models=[MODEL], notify=receiver.url("/killed"))
    receiver.wait_for("/killed", 2, timeout=120)  # a worker sent and is retrying
    sender = sender_of(client.store, job.job_id, workers)
    sending = job.status().callback
    assert sending is not None and sending.state == "sending" and sending.attempts >= 2
    assert sending.last_error == "HTTP 503" and sending.http_status == 503
    sender.running.kill()
    sender.running.wait(10)
    before = len(receiver.posts_to("/killed"))
    receiver.fail_first = before + 1  # the taker's first try fails too, its second succeeds
    posts = receiver.wait_for("/killed", before + 2, timeout=60)
    assert [p.status for p in posts] == [503] * (before + 1) + [200]
    assert len({p.body for p in posts}) == 1
    assert len({p.headers[DELIVERY_HEADER.lower()] for p in posts}) == 1
    verify(posts[-1].headers, posts[-1].body)
    want = {"state": "sent", "attempts": before + 2, "last_error": "HTTP 503", "http_status": 200}
    deadline = time.monotonic() + 10
    while (callback := job.status().callback) is None or callback.state != "sent":
        assert time.monotonic() < deadline, callback
        time.sleep(0.05)
    result = run_cli(["status", job.job_id, "--json"], imgq_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["callback"] == want
    (listed,) = [j for j in client.jobs(limit=100) if j.job_id == job.job_id]
    assert listed.as_dict()["callback"] == want
    assert client.store.client.zscore(keys.CALLBACKS_DUE, job.job_id) is None
    time.sleep(QUIET_S)
    assert len(receiver.posts_to("/killed")) == before + 2


def test_worker_stopping_mid_retry_gives_up_its_lease(
    workers: list[WorkerProcess],
    receiver: Receiver,
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    """SIGTERM the worker that retries a callback: it lets go of the lease at once and
    exits without spending its tries; another process sends the callback."""
    alive = [w for w in workers if w.running.poll() is None]
    receiver.fail_first = 1000
    client = make_client(imgq_env, models_file)
    image = sorted(str(p) for p in photos.glob("*.jpg"))[0]
    job = client.submit([image], models=[MODEL], notify=receiver.url("/stopped"))
    receiver.wait_for("/stopped", 2, timeout=120)
    sender = sender_of(client.store, job.job_id, alive)
    lease = keys.job_callback_lease(job.job_id)
    holder = client.store.client.get(lease)
    stopped = time.monotonic()
    sender.running.send_signal(signal.SIGTERM)
    # Renewed to 4 s every second, the lease is deleted, not left to expire.
    last_ttl = 0
    while client.store.client.get(lease) == holder:
        last_ttl = max(0, int(client.store.client.pttl(lease))) or last_ttl
        assert time.monotonic() - stopped < 30
        time.sleep(0.02)
    assert last_ttl > 2000
    try:
        # 18 more tries would take minutes of backoff; the worker does not wait for them.
        assert sender.running.wait(30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the stopping worker waited for its callback's tries")
    before = len(receiver.posts_to("/stopped"))
    receiver.fail_first = before  # up again
    # Another worker, or this process (the same scan), takes the callback over.
    settings = make_client(imgq_env, models_file).settings
    deadline = time.monotonic() + 30
    while len(receiver.posts_to("/stopped")) == before:
        assert time.monotonic() < deadline
        resume_due(client.store, settings)
        time.sleep(0.2)
    posts = receiver.wait_for("/stopped", before + 1)
    assert posts[-1].status == 200
    assert len({p.headers[DELIVERY_HEADER.lower()] for p in posts}) == 1

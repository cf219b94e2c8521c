"""Completion callbacks on real workers: one signed POST per job, retried, private URLs refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.api import Client
from shared.contract import task_id
from shared.jobs import JobStore
from shared.notify import notify_if_ended, notify_job_end
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
    assert client.get(f"imgq:job:{jid}:notified") is None
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
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "submitted job" not in result.stdout

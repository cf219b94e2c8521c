"""Flower on real parts: a real Flower process watching the shared worker's events.

A job's tasks appear in Flower's HTTP API with the short argument summary the
producer sets (job, model, chunk, image count), the counts agree with
``imgq status``, the UI and API ask for the login, Prometheus metrics count the
task events, per-model queue lengths are visible, and the dashboard renders the
worker in a real browser.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from shared.jobs import task_id
from tests.browser import Browser
from tests.conftest import ARTIFACTS, ROOT, WorkerProcess, free_port, run_cli, wait_for
from tests.queues import waiting

pytestmark = pytest.mark.slow

USER, PASSWORD = "user", "secret-pass"
AUTH = (USER, PASSWORD)
MODELS = ["t1001", "tcustom"]
# The short task summary the producer sets as argsrepr (producer.api.Job.send_chunk).
ARGSREPR = re.compile(
    r"^\(job='(?P<job>[\w-]+)', name='(?P<name>[^']*)', model='(?P<model>\w+)', "
    r"chunk=(?P<chunk>\d+), "
    r"images=(?P<images>\d+)\)$"
)


@dataclass
class FlowerProcess:
    """A running ``celery -A workers.app flower`` and where it answers."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, **params: Any) -> Any:
        """GET an API path with the login; its JSON."""
        resp = httpx.get(self.url + path, auth=AUTH, params=params, timeout=10)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:500])
        return resp.json()


@contextlib.contextmanager
def running_flower(env: dict[str, str], log: Path) -> Iterator[FlowerProcess]:
    """A real Flower (``celery -A workers.app flower``) with basic auth on a free
    loopback port, configured by ``env`` like the workers; stopped at the end."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        "--persistent=False",
    ]
    # The login comes from the environment, as in the compose file: not on the
    # command line, where `ps` would show it.
    full_env = {**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
    flower = FlowerProcess(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"flower exited ({proc.returncode}):\n{flower.output()}")
        try:
            if httpx.get(flower.url + "/healthcheck", timeout=2).text == "OK":
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"flower did not answer in 60 s:\n{flower.output()}")
        time.sleep(0.2)
    try:
        yield flower
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def flower(
    imgq_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerProcess]:
    """A real Flower on this session's Redis, for the module."""
    with running_flower(imgq_env, tmp_path_factory.mktemp("flower") / "flower.log") as flower:
        yield flower


def poll(what: str, fn: Callable[[], Any], timeout: float = 30, interval: float = 0.3) -> Any:
    """Call ``fn`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout} s (last: {last!r})")


def node_of(flower: FlowerProcess, worker: WorkerProcess) -> str:
    """The worker's node name once Flower receives its events (heartbeats: every 2 s).

    Events Flower misses are gone, so a test submits only after this.
    """
    alive = poll(
        f"flower sees {worker.name}",
        lambda: [
            n
            for n, up in flower.get("/api/workers", status=1).items()
            if up and n.startswith(f"{worker.name}@")
        ],
    )
    return str(alive[0])


def flower_tasks(flower: FlowerProcess, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Flower's records of these task ids (Flower knows them from the workers' events)."""
    listed = flower.get("/api/tasks", taskname="imgq.classify")
    return {tid: task for tid, task in listed.items() if tid in ids}


def test_job_in_flower_api_metrics_and_status(
    flower: FlowerProcess,
    shared_worker: WorkerProcess,
    client: Any,
    photos: Path,
    imgq_env: dict[str, str],
) -> None:
    node = node_of(flower, shared_worker)
    assert "shared" in node

    job = client.submit([str(photos)], models=MODELS, chunk_size=1, name="holiday-snaps")
    assert job.wait(progress=False, timeout=120).finished
    ids = {t for m in MODELS for t in job.record.task_ids(m)}
    assert len(ids) == 3 * len(MODELS)

    # Every task of the job, done by the shared worker, summarised by its argsrepr.
    def all_succeeded() -> dict[str, dict[str, Any]]:
        tasks = flower_tasks(flower, ids)
        ok = set(tasks) == ids and all(t["state"] == "SUCCESS" for t in tasks.values())
        return tasks if ok else {}

    tasks = poll("every task SUCCESS in flower", all_succeeded)
    images_by_model: Counter[str] = Counter()
    tasks_by_model: Counter[str] = Counter()
    for tid, task in tasks.items():
        assert task["name"] == "imgq.classify"
        assert task["worker"] == node
        assert task["kwargs"] == "{}"
        m = ARGSREPR.match(task["args"])
        assert m, task["args"]
        assert task_id(m["job"], m["model"], int(m["chunk"])) == tid
        assert m["job"] == job.job_id and m["name"] == "holiday-snaps"
        # The summary, not the image list.
        assert str(photos) not in task["args"] and ".jpg" not in task["args"]
        images_by_model[m["model"]] += int(m["images"])
        tasks_by_model[m["model"]] += 1

    # The Tasks page's search (and the API's) finds a job's tasks by its id or its
    # name in the summary.
    assert set(flower.get("/api/tasks", search=job.job_id)) == ids
    assert set(flower.get("/api/tasks", search="args:holiday-snaps")) == ids
    assert set(flower.get("/api/tasks", search=f"args:{job.job_id} AND args:tcustom")) == set(
        job.record.task_ids("tcustom")
    )

    # `imgq status` agrees: images of the SUCCESS tasks in Flower = done images.
    st = run_cli(["status", job.job_id, "--json"], imgq_env)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["finished"] is True and status["images"] == 3
    for model in MODELS:
        counts = status["models"][model]
        assert counts["failed"] == 0 and counts["pending"] == 0
        assert counts["done"] == images_by_model[model] == counts["total"]
        # chunk_size 1: SUCCESS tasks x chunk size = done images.
        assert tasks_by_model[model] * job.record.chunk_size == counts["done"]

    # The worker list (Flower asks the workers over the broker): its model queues.
    workers = flower.get("/api/workers", refresh=1)
    assert node in workers, list(workers)
    queues = {q["name"] for q in workers[node]["active_queues"]}
    assert {f"imgq.{m}" for m in MODELS} <= queues
    assert "imgq.classify" in workers[node]["registered"]

    # One task's details.
    one = flower.get(f"/api/task/info/{sorted(ids)[0]}")
    assert one["state"] == "SUCCESS" and ARGSREPR.match(one["args"])

    # Prometheus: event counters per worker, type and task name; the worker is online.
    resp = httpx.get(flower.url + "/metrics", timeout=10)
    assert resp.status_code == 200
    samples = [s for family in text_string_to_metric_families(resp.text) for s in family.samples]

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    for kind in ("task-received", "task-started", "task-succeeded"):
        count = total("flower_events_total", task="imgq.classify", worker=node, type=kind)
        assert count >= len(ids), (kind, count)
    assert total("flower_worker_online", worker=node) == 1.0
    assert total("flower_task_runtime_seconds_count", task="imgq.classify", worker=node) >= len(ids)


def test_login_required_except_metrics_and_healthcheck(flower: FlowerProcess) -> None:
    for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks"):
        resp = httpx.get(flower.url + path, timeout=10)
        assert resp.status_code == 401, (path, resp.status_code)
        if not path.startswith("/api/"):
            # The UI pages ask the browser for the login (the API just refuses).
            assert resp.headers.get("WWW-Authenticate") == 'Basic realm="flower"', path
        wrong = httpx.get(flower.url + path, auth=(USER, "wrong"), timeout=10)
        assert wrong.status_code == 401, (path, wrong.status_code)
    assert httpx.get(flower.url + "/", auth=AUTH, timeout=10).status_code == 200
    # Flower 2.2 serves these without the login (docs/monitoring.md says so and
    # why the port must stay private); this keeps the docs honest.
    assert httpx.get(flower.url + "/healthcheck", timeout=10).text == "OK"
    assert httpx.get(flower.url + "/metrics", timeout=10).status_code == 200


def log_in(browser: Browser) -> None:
    """Send Flower's basic-auth login with every request of the page (scripts, XHR too)."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    browser.send("Network.enable")
    browser.send("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def test_queue_lengths_per_model(
    flower: FlowerProcess,
    shared_worker: WorkerProcess,
    client: Any,
    photos: Path,
    redis_url: str,
    browser: Browser,
) -> None:
    """A model's backlog shows in Flower's queue lengths, equal to the Redis list's length.

    The shared worker stops consuming one model's queue through Flower's control
    API (pausing a model), the job's tasks for it wait in ``imgq.tprobs``, and
    consuming again finishes the job.
    """
    node = node_of(flower, shared_worker)
    workers = flower.get("/api/workers", refresh=1)
    assert "imgq.tprobs" in {q["name"] for q in workers[node]["active_queues"]}
    r = redis.Redis.from_url(redis_url)

    def control(action: str) -> None:
        resp = httpx.post(
            f"{flower.url}/api/worker/queue/{action}/{node}",
            params={"queue": "imgq.tprobs"},
            auth=AUTH,
            timeout=10,
        )
        assert resp.status_code == 200, (action, resp.status_code, resp.text)

    control("cancel-consumer")
    try:
        job = client.submit([str(photos)], models=["t1001", "tprobs"], chunk_size=1)
        # t1001 runs, tprobs waits: its three tasks are the queue's three messages.
        poll("t1001 done", lambda: job.status().models["t1001"].pending == 0, timeout=60)
        assert job.status().models["tprobs"].done == 0
        assert waiting(r, "imgq.tprobs") == 3
        lengths = {
            q["name"]: q["messages"] for q in flower.get("/api/queues/length")["active_queues"]
        }
        assert lengths["imgq.tprobs"] == 3, lengths
        assert lengths["imgq.t1001"] == 0, lengths
        assert {f"imgq.{m}" for m in ("t21k", "tcustom", "tpoison")} <= set(lengths)
        # The broker page shows the same numbers.
        log_in(browser)
        cells = (
            "Array.from(document.querySelectorAll('#queue-table tbody tr')).map(r => r.innerText)"
        )
        browser.navigate(flower.url + "/broker", ready=f"{cells}.length > 0", timeout=30)
        rows = {line.split("\t")[0]: line.split("\t")[1] for line in browser.eval(cells)}
        browser.screenshot(ARTIFACTS / "flower-broker.png")
        assert rows.get("imgq.tprobs") == "3" and rows.get("imgq.t1001") == "0", rows
        assert browser.console == [], browser.console
        # Flower lists the queues its last look at the workers found consumed.
        # Once it looks again (refresh=1, a worker's page, a restart), a queue
        # nobody consumes is gone from the list, backlog and all: the backlog of
        # a model without workers is only in Redis (docs/monitoring.md).
        flower.get("/api/workers", refresh=1)
        lengths = {
            q["name"]: q["messages"] for q in flower.get("/api/queues/length")["active_queues"]
        }
        assert "imgq.tprobs" not in lengths and "imgq.t1001" in lengths, lengths
        assert waiting(r, "imgq.tprobs") == 3
    finally:
        control("add-consumer")
    assert job.wait(progress=False, timeout=60).finished
    assert waiting(r, "imgq.tprobs") == 0
    flower.get("/api/workers", refresh=1)  # Flower's view of the queues, as before


def test_dashboard_in_browser(
    flower: FlowerProcess, shared_worker: WorkerProcess, browser: Browser
) -> None:
    node = node_of(flower, shared_worker)
    log_in(browser)
    # Ready when the workers table (filled by the page's XHR poll) lists the worker.
    rows = "Array.from(document.querySelectorAll('#workers-table tbody tr'))"
    row_js = f"({rows}.map(r => r.innerText).find(t => t.includes({json.dumps(node)})) || '')"
    browser.navigate(flower.url + "/", ready=f"{row_js} !== ''", timeout=60)
    # The poll redraws the table (empty for a moment): the row as last seen drawn.
    row = ""

    def drawn() -> bool:
        nonlocal row
        row = browser.eval(row_js)
        return row != ""

    wait_for(drawn, 30, "the worker's row to be drawn")
    assert "Online" in row, row
    refreshed = browser.eval("document.getElementById('workers-refresh-status').innerText")
    browser.screenshot(ARTIFACTS / "flower-dashboard.png")
    assert "Connecting" not in refreshed, refreshed
    assert browser.console == [], browser.console

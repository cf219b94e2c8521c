"""The compose deployment, run for real: the image built from the Dockerfile, the stack
of docker-compose.yml up (Redis, PostgreSQL, Flower, CPU workers), a job submitted
from the host through the published Redis port and followed in Flower's API, the
workers scaled, one of them killed mid-job, a worker scraped by the monitoring
profile's Prometheus, the Sentinel layout's master killed mid-job, and everything
torn down.

It needs a Docker Engine (started here as root when none answers) with the Compose
v2 plugin, debootstrap and the host's apt mirror and PyPI; it runs only under
``make test-deploy`` (IMGQ_TEST_DEPLOY=1) and skips, saying why, where the engine
cannot be had. The figures it measures (build times, image size, time from
``compose up`` to the first result) are written to test-artifacts/deploy-figures.json.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.api import Client
from shared.settings import Settings
from tests.compose_stack import (
    IMGQ_IMAGE,
    SENTINEL,
    BuildFigures,
    Compose,
    EngineUnavailable,
    Flower,
    build_images,
    docker,
    docker_engine,
)
from tests.conftest import ARTIFACTS, free_port, wait_for

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("IMGQ_TEST_DEPLOY") != "1",
        reason="the compose deployment test runs under `make test-deploy` (IMGQ_TEST_DEPLOY=1)",
    ),
    pytest.mark.timeout(1800),
]

MODEL = "tdeploy"
# Chunks of two images, each batch waiting 250 ms for company (the test override):
# a worker does about 16 images a second, so this job lasts about 50 s with two
# workers. The third worker is started as soon as the first result is in and comes
# online within seconds; the job must still have work for it then, and again at the
# kill (figures: pending_when_third_online, killed_with_pending). Every image differs
# (the result cache computes an image's bytes once: 200 colours made a job of 1,600
# mostly cache hits, over before a third worker could join). The Sentinel job
# reuses the first 800, cached by then: its subject is the queue across a failover.
JOB_IMAGES = 1600
SENTINEL_IMAGES = 800
CHUNK = 2


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    try:
        with docker_engine(log):
            yield
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker Engine for the deployment test: {exc}")


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, Any]]:
    """What the run measured; written to test-artifacts/deploy-figures.json at the end."""
    found: dict[str, Any] = {}
    yield found
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "deploy-figures.json").write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture(scope="module")
def built(engine: None, figures: dict[str, Any]) -> BuildFigures:
    build = BuildFigures()
    build_images(build)
    figures["build"] = vars(build)
    return build


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models, images and results folders the containers mount, readable by the
    image's unprivileged user."""
    from PIL import Image

    from tests.savedmodels import build_classifier

    base = tmp_path_factory.mktemp("deploy")
    models = base / "models"
    models.mkdir()
    build_classifier(models / MODEL, 1001, seed=7)
    (models / "models.toml").write_text(
        f'[models.{MODEL}]\nhandle = "/models/{MODEL}"\ninput_size = 32\n'
        'activation = "softmax"\nlabels = "imagenet1k-background"\n',
        encoding="utf-8",
    )
    images = base / "images"
    images.mkdir()
    for i in range(JOB_IMAGES):
        Image.new("RGB", (64, 48), (i % 250, i // 250, 90)).save(
            images / f"img{i:04d}.jpg", quality=85
        )
    (images / "sentinel.txt").write_text(
        "".join(f"img{i:04d}.jpg\n" for i in range(SENTINEL_IMAGES)), encoding="utf-8"
    )
    (base / "results").mkdir()
    for path in [base, *base.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    return base


@pytest.fixture(scope="module")
def stack(built: BuildFigures, workdir: Path) -> Iterator[Compose]:
    """The compose project; torn down (volumes included) at the end, whatever happened."""
    passwords = {name: secrets.token_hex(12) for name in ("redis", "flower", "postgres")}
    compose = Compose(
        workdir,
        {
            "IMGQ_IMAGE": IMGQ_IMAGE,
            "REDIS_PASSWORD": passwords["redis"],
            "FLOWER_USER": "admin",
            "FLOWER_PASSWORD": passwords["flower"],
            "POSTGRES_PASSWORD": passwords["postgres"],
            "IMGQ_RESULTS_URL": f"postgresql://imgq:{passwords['postgres']}@postgres:5432/imgq",
            "IMAGES_DIR": str(workdir / "images"),
            "RESULTS_DIR": str(workdir / "results"),
            "IMGQ_TEST_MODELS_DIR": str(workdir / "models"),
            "IMGQ_TEST_MODEL": MODEL,
            # Off the host's own services' ports.
            "REDIS_PORT": str(free_port()),
            "POSTGRES_PORT": str(free_port()),
            "FLOWER_PORT": str(free_port()),
            "METRICS_PORT": str(free_port()),
            "PROMETHEUS_PORT": str(free_port()),
        },
    )
    try:
        yield compose
    finally:
        tear_down(compose)


def tear_down(compose: Compose) -> None:
    """Keep every service's log (test-artifacts/deploy-compose.log), then remove it all."""
    if compose.containers(every=True):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "deploy-compose.log").write_text(compose.logs(), encoding="utf-8")
    compose.down()


def host_urls(stack: Compose) -> tuple[str, str]:
    """The broker and results-store URLs of the stack, from the host's side."""
    env = stack.env
    return (
        f"redis://:{env['REDIS_PASSWORD']}@127.0.0.1:{env['REDIS_PORT']}/0",
        f"postgresql://imgq:{env['POSTGRES_PASSWORD']}@127.0.0.1:{env['POSTGRES_PORT']}/imgq",
    )


def flower_of(stack: Compose) -> Flower:
    env = stack.env
    return Flower(
        f"http://127.0.0.1:{env['FLOWER_PORT']}", (env["FLOWER_USER"], env["FLOWER_PASSWORD"])
    )


def short_id(node: str) -> str:
    """The container of a worker's node name: its hostname, the short container id
    (``celery@<12 hex digits>``)."""
    return node.rpartition("@")[2]


def pg_answers(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def rows(url: str, job_id: str) -> tuple[int, int, int, int, int]:
    """(rows, distinct positions, rows with an error, lowest and highest position)."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT position), "
            "count(*) FILTER (WHERE error_code IS NOT NULL), "
            "coalesce(min(position), -1), coalesce(max(position), -1) "
            "FROM imgq_results WHERE job_id = %s AND model = %s",
            (job_id, MODEL),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])


def row_count(url: str, job_id: str) -> int:
    try:
        return rows(url, job_id)[0]
    except Exception:  # the table does not exist yet
        return 0


def assert_every_image_once(url: str, job_id: str, n: int) -> None:
    assert rows(url, job_id) == (n, n, 0, 0, n - 1)


def test_image_builds_and_runs_as_its_user(built: BuildFigures) -> None:
    assert built.imgq_size_bytes > 0
    user = docker("run", "--rm", IMGQ_IMAGE, "id", "-u").stdout.strip()
    assert user == "10001"
    version = docker("run", "--rm", IMGQ_IMAGE, "imgq", "--version")
    assert version.returncode == 0 and version.stdout.strip()


def test_job_survives_scaling_and_a_worker_killed_mid_job(
    stack: Compose, workdir: Path, figures: dict[str, Any]
) -> None:
    broker, results = host_urls(stack)
    start = time.monotonic()
    stack.run(
        "up", "-d", "--scale", "worker-resnet=2", "redis", "postgres", "flower", "worker-resnet",
        timeout=600,
    )  # fmt: skip
    figures["compose_up_seconds"] = round(time.monotonic() - start, 1)
    wait_for(lambda: pg_answers(results), 120, "PostgreSQL on its published port", interval=0.5)
    client = Client(
        Settings(
            broker_url=broker,
            results_url=results,
            models_file=str(workdir / "models" / "models.toml"),
        )
    )
    job = client.submit(
        [f"/images/img{i:04d}.jpg" for i in range(JOB_IMAGES)], models=[MODEL], chunk_size=CHUNK
    )
    wait_for(lambda: row_count(results, job.job_id) > 0, 300, "the first result", interval=0.2)
    figures["up_to_first_result_seconds"] = round(time.monotonic() - start, 1)
    # The warm-up traces every batch size on purpose; TensorFlow must not warn about it.
    start_logs = stack.run("logs", "--no-color", "worker-resnet").stdout
    assert "warmed up" in start_logs and "retracing" not in start_logs

    # A third worker joins while the job runs (started now: it takes tens of seconds
    # to load its model, and the job does not wait for it).
    before = set(stack.containers("worker-resnet"))
    assert len(before) == 2
    scaled_at = time.monotonic()
    stack.run("up", "-d", "--scale", "worker-resnet=3", "--no-recreate", "worker-resnet")
    (third,) = set(stack.containers("worker-resnet")) - before

    # Flower: the API asks for the login, and lists the job's tasks with it.
    flower = flower_of(stack)
    anonymous = httpx.get(flower.url + "/api/tasks", timeout=10)
    assert anonymous.status_code == 401
    wait_for(lambda: len(flower.job_tasks(job.job_id)) > 0, 60, "Flower to see the job")

    def newcomer() -> str | None:
        """The third worker's node name, once Flower sees it online."""
        return next((n for n in flower.online_workers() if third.startswith(short_id(n))), None)

    wait_for(lambda: newcomer() is not None, 180, "the third worker online")
    node_name = newcomer()
    assert node_name is not None
    figures["third_online_seconds"] = round(time.monotonic() - scaled_at, 1)
    pending = job.status().models[MODEL].pending
    figures["pending_when_third_online"] = pending
    assert pending > 0, "the job ended before the third worker came online"
    assert len(flower.online_workers()) == 3

    def worked_on_job(node: str) -> bool:
        return any(t.get("worker") == node for t in flower.job_tasks(job.job_id).values())

    # It takes some of the job's tasks: or the job ended first, which says it was too short.
    wait_for(
        lambda: worked_on_job(node_name) or job.status().finished,
        120,
        "the third worker to take tasks of the job",
    )
    assert worked_on_job(node_name), f"the third worker took none of the {pending} pending images"
    assert not job.status().finished, "the job ended before a worker could be killed"

    # docker kill (SIGKILL) one worker while it runs a task of the job.
    def running_node() -> str | None:
        for task in flower.job_tasks(job.job_id).values():
            if task.get("state") == "STARTED" and task.get("worker"):
                return str(task["worker"])
        return None

    wait_for(lambda: running_node() is not None, 60, "a task running on a worker")
    node = running_node()
    assert node is not None
    container = short_id(node)
    assert any(c.startswith(container) for c in stack.containers("worker-resnet")), node
    docker("kill", container)
    killed_at = job.status()
    assert not killed_at.finished, "the job ended before the kill"
    figures["killed_with_pending"] = killed_at.models[MODEL].pending

    status = job.wait(progress=False, timeout=600)
    assert status.models[MODEL].as_dict() == {
        "total": JOB_IMAGES,
        "done": JOB_IMAGES,
        "failed": 0,
        "pending": 0,
    }
    assert_every_image_once(results, job.job_id, JOB_IMAGES)
    figures["job_seconds"] = round(time.monotonic() - start, 1)


def test_prometheus_scrapes_the_workers(stack: Compose) -> None:
    stack.run("--profile", "monitoring", "up", "-d", "prometheus", timeout=300)
    api = f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/api/v1/query"

    def query(expr: str) -> list[dict[str, Any]]:
        try:
            resp = httpx.get(api, params={"query": expr}, timeout=10)
            resp.raise_for_status()
        except httpx.HTTPError:
            return []
        result: list[dict[str, Any]] = resp.json()["data"]["result"]
        return result

    # Each worker replica is a target of the imgq-workers job (one DNS name, --scale).
    wait_for(lambda: len(query('up{job="imgq-workers"} == 1')) >= 2, 120, "worker targets up")
    classified = query(f'sum(imgq_worker_images_classified_total{{model="{MODEL}"}})')
    assert classified and float(classified[0]["value"][1]) > 0


def sentinels_know_the_replica(stack: Compose) -> bool:
    """Every sentinel lists the replica, linked to its master and not down."""
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        containers = stack.containers(name)
        if not containers:
            return False
        for container in containers:
            out = docker(
                "exec", container, "redis-cli", "-p", "26379", "SENTINEL", "replicas", "mymaster",
                check=False,
            ).stdout.split()  # fmt: skip
            fields = dict(zip(out[::2], out[1::2], strict=False))
            flags = fields.get("flags", "")
            if (
                fields.get("master-link-status") != "ok"
                or "s_down" in flags
                or "disconnected" in flags
            ):
                return False
    return True


def test_sentinel_layout_survives_its_master_killed_mid_job(
    stack: Compose, figures: dict[str, Any]
) -> None:
    _, results = host_urls(stack)
    # The single Redis goes; master, replica and sentinels come, and the workers follow.
    stack.run("rm", "--stop", "--force", "redis")
    stack.run(
        "up", "-d", "--scale", "worker-resnet=2", "redis-master", "redis-replica",
        "sentinel-1", "sentinel-2", "sentinel-3", "worker-resnet",
        files=SENTINEL, timeout=600,
    )  # fmt: skip
    # A sentinel learns of the replica from the master's INFO, every 10 s: a master
    # killed before that leaves no replica it would promote (failover-abort-no-good-
    # slave, again each minute). So the job starts once every sentinel knows it.
    wait_for(lambda: sentinels_know_the_replica(stack), 60, "the sentinels to see the replica")
    job_id = f"sentinel-{secrets.token_hex(4)}"
    producer = f"{stack.project}-producer"
    stack.run(
        "run", "-d", "--name", producer, "producer",
        "imgq", "submit", "@/images/sentinel.txt", "--model", MODEL, "--job-id", job_id,
        "--chunk-size", str(CHUNK), "--wait", "--no-progress", "--timeout", "600",
        files=SENTINEL,
    )  # fmt: skip
    wait_for(lambda: row_count(results, job_id) >= 40, 300, "the job to get going", interval=0.5)
    (master,) = stack.containers("redis-master")
    docker("kill", master)
    killed_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    assert row_count(results, job_id) < SENTINEL_IMAGES, "the job ended before the kill"
    kill_time = time.monotonic()
    exit_code = docker("wait", producer, timeout=700).stdout.strip()
    figures["sentinel_kill_to_end_seconds"] = round(time.monotonic() - kill_time, 1)
    output = docker("logs", producer, check=False)
    assert exit_code == "0", output.stdout + output.stderr
    assert_every_image_once(results, job_id, SENTINEL_IMAGES)
    # Which workers went on after the failover (tasks each finished since the kill).
    after = {}
    for container in stack.containers("worker-resnet"):
        logs = docker("logs", "--since", killed_at, container)
        after[container[:12]] = (logs.stdout + logs.stderr).count("succeeded in")
    figures["sentinel_tasks_after_failover"] = after


def test_teardown_leaves_nothing(
    stack: Compose, figures: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tear_down(stack)
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
    with capsys.disabled():
        print("\ndeployment figures:", json.dumps(figures, indent=2))

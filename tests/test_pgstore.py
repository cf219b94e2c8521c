"""The PostgreSQL results store on a real server: schema and its versions, idempotent
writes, a job end to end (exports in every format, SQL, delete), bad settings, and
PostgreSQL restarted mid-job."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from producer.api import Client
from shared.jobs import JobRecord
from shared.pg_schema import SCHEMA_VERSION, SchemaError, current_version, ensure_schema
from shared.results_store import PostgresResultsStore, ResultsStoreError
from shared.settings import Settings
from tests.conftest import WorkerProcess, run_cli
from tests.pg import PostgresServer, row_count, with_schema
from tests.queues import waiting
from tests.test_faults import SLOW, make_images, succeeded, wait_for

PASSWORD = "pg-s3cret-word"


@pytest.fixture
def fresh_url(postgres_url: str) -> Iterator[str]:
    """A URL on an empty schema of its own (the session's server)."""
    schema = f"imgq_t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    base = postgres_url.split("?", 1)[0]
    yield with_schema(base, schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def record(image: str, label: str | None, score: float = 0.9) -> dict[str, Any]:
    """A worker's record for one image: classified when ``label`` is given, else failed."""
    if label is None:
        return {
            "job_id": "j",
            "image": image,
            "model": "m",
            "top5": [],
            "error": {"code": "not_found", "message": f"{image}: no such file"},
        }
    top5 = [{"index": i, "label": f"{label}{i}", "score": score / (i + 1)} for i in range(5)]
    return {"job_id": "j", "image": image, "model": "m", "top5": top5, "error": None}


def test_schema_is_created_once_versioned_and_a_newer_one_refused(fresh_url: str) -> None:
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        assert current_version(conn) == 0
        assert ensure_schema(conn) == 0
        assert ensure_schema(conn) == SCHEMA_VERSION  # already there: nothing to do
        assert current_version(conn) == SCHEMA_VERSION
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'imgq_results'"
            )
        }
        assert indexes == {"imgq_results_pkey", "imgq_results_job_model_top1"}
        conn.execute("UPDATE imgq_schema SET version = %s", (SCHEMA_VERSION + 1,))
        with pytest.raises(SchemaError, match="upgrade imgq"):
            ensure_schema(conn)
    store = PostgresResultsStore(fresh_url)
    with pytest.raises(ResultsStoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        store.check()


def test_writes_are_idempotent_and_reads_in_submission_order(fresh_url: str) -> None:
    store = PostgresResultsStore(fresh_url)
    first = [record("a.jpg", "cat"), record("b.jpg", None)]
    second = [record("c.jpg", "dog"), record("d.jpg", "cow")]
    store.write_chunk("j", "m", 2, second)
    store.write_chunk("j", "m", 0, first)
    store.write_chunk("j", "m", 0, first)  # a redelivered task
    store.write_chunk("j", "m", 2, second)
    assert store.count("j") == 4
    job = JobRecord("j", ("m",), total_images=4, chunk_size=2, n_chunks=2, created=0.0)
    records = list(store.iter_records(job))
    assert [r.image for r in records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert records[0].top5[0].label == "cat0" and records[0].top5[4].score == pytest.approx(0.18)
    assert records[1].error is not None and records[1].error.code.value == "not_found"
    # A rerun that ends differently (a failed task resent) replaces its rows.
    store.write_chunk("j", "m", 0, [record("a.jpg", "lynx"), record("b.jpg", "owl")])
    assert store.count("j") == 4
    assert [r.top5[0].label for r in store.iter_records(job)][:2] == ["lynx0", "owl0"]
    assert store.delete_job(job) == 4
    assert store.count("j") == 0
    store.close()


def test_bad_results_urls_fail_in_one_line_without_the_password(
    imgq_env: dict[str, str], fresh_url: str, tmp_path: Path
) -> None:
    image = make_images(tmp_path / "imgs", 1)[0]
    base = fresh_url.split("?", 1)[0]
    host = base.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    cases = {
        f"postgresql://u:{PASSWORD}@{host}:notaport/db": "not a valid PostgreSQL URL",
        f"postgresql://u:{PASSWORD}@127.0.0.1:1/test": "cannot reach the PostgreSQL server",
        f"{base.rsplit('/', 1)[0]}/no_such_db_{uuid.uuid4().hex[:6]}": (
            "the database does not exist"
        ),
        "mysql://db/x": "must be 'redis' or a postgresql:// URL",
    }
    for url, expected in cases.items():
        result = run_cli(
            ["submit", image, "--model", "tsolo"], {**imgq_env, "IMGQ_RESULTS_URL": url}
        )
        # A value that is no store at all is a bad setting (2); the others fail to connect.
        assert result.returncode == (2 if url.startswith("mysql") else 1), result
        assert expected in result.stderr
        assert PASSWORD not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_job_end_to_end_exports_sql_and_delete(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    images = make_images(tmp_path / "imgs", 10, size=(40, 30))
    sources = [*images, str(tmp_path / "missing.jpg")]
    env = {**imgq_env, "IMGQ_RESULTS_URL": postgres_url}
    worker = start_worker("tsolo", "tfault", name="pg-e2e", env={"IMGQ_RESULTS_URL": postgres_url})
    client = Client(Settings(**_settings(imgq_env, postgres_url)))
    job = client.submit(sources, models=["tsolo", "tfault"], chunk_size=4)
    status = job.wait(progress=False, timeout=120)
    assert status.models["tsolo"].as_dict() == {"total": 11, "done": 10, "failed": 1, "pending": 0}
    records = job.results()
    assert Counter((r.image, r.model) for r in records) == Counter(
        (s, m) for s in sources for m in ("tsolo", "tfault")
    )
    assert row_count(postgres_url, job.job_id) == 22
    # Redis holds summaries, never the records.
    backend = client.app.backend
    raw = backend.get(backend.get_key_for_task(f"{job.job_id}.tsolo.000000"))
    assert json.loads(raw)["result"] == {"ok": 4, "failed": 0, "stored": "postgresql"}
    # The same records from SQL, as the docs query them.
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(
            "SELECT source, top1_label, top1_score FROM imgq_results "
            "WHERE job_id = %s AND model = 'tsolo' AND error_code IS NULL "
            "ORDER BY position",
            (job.job_id,),
        ).fetchall()
    by_image = {r.image: r for r in records if r.model == "tsolo"}
    assert [r[0] for r in rows] == images
    for source, label, score in rows:
        assert label == by_image[source].top5[0].label
        assert score == pytest.approx(by_image[source].top5[0].score, rel=1e-6)
    # Every export format, from the CLI, holds the same records.
    jsonl = run_cli(["results", job.job_id, "--out", str(tmp_path / "r.jsonl")], env)
    assert jsonl.returncode == 0, jsonl.stderr
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines == [r.to_json_dict() for r in records]
    csv_out = run_cli(["results", job.job_id, "--format", "csv"], env)
    assert csv_out.returncode == 0 and len(csv_out.stdout.strip().splitlines()) == 23
    parquet = run_cli(["results", job.job_id, "--out", str(tmp_path / "r.parquet")], env)
    assert parquet.returncode == 0, parquet.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    expected = [r.to_json_dict() for r in records]
    assert [
        {
            "job_id": r["job_id"],
            "image": r["image"],
            "model": r["model"],
            "top5": r["top5"],
            "error": {"code": r["error_code"], "message": r["error_message"]}
            if r["error_code"]
            else None,
        }
        for r in table
    ] == [
        {**e, "top5": [{**p, "score": pytest.approx(p["score"])} for p in e["top5"]]}
        for e in expected
    ]
    to_stdout = run_cli(["results", job.job_id, "--format", "parquet"], env)
    assert to_stdout.returncode == 2 and "--out FILE.parquet" in to_stdout.stderr
    # Delete: rows and Redis records go; the job is unknown afterwards.
    deleted = run_cli(["delete", job.job_id, "--yes"], env)
    assert deleted.returncode == 0, deleted.stderr
    assert "22 result(s) from postgresql" in deleted.stderr
    assert row_count(postgres_url, job.job_id) == 0
    r = redis.Redis.from_url(imgq_env["IMGQ_BROKER_URL"])
    assert not r.keys(f"imgq:*{job.job_id}*")
    again = run_cli(["status", job.job_id], env)
    assert again.returncode == 1 and "unknown or has expired" in again.stderr
    gone = run_cli(["delete", job.job_id, "--yes"], env)
    assert gone.returncode == 1 and "nothing to delete" in gone.stderr
    worker.stop()


def test_delete_with_the_redis_store_removes_results_and_records(
    shared_worker: WorkerProcess, imgq_env: dict[str, str], tmp_path: Path
) -> None:
    images = make_images(tmp_path / "imgs", 3, size=(40, 30))
    client = Client(Settings(**_settings(imgq_env, "redis")))
    job = client.submit(images, models=["t1001"], chunk_size=2)
    job.wait(progress=False, timeout=120)
    r = redis.Redis.from_url(imgq_env["IMGQ_BROKER_URL"])
    assert r.keys(f"*{job.job_id}*")
    result = run_cli(["delete", job.job_id, "--yes"], imgq_env)
    assert result.returncode == 0, result.stderr
    assert "2 result(s) from redis" in result.stderr
    assert not r.keys(f"*{job.job_id}*")
    # Gone from the job listing and the sweep's open jobs too.
    assert r.zscore("imgq:jobs", job.job_id) is None
    assert r.zscore("imgq:jobs:open", job.job_id) is None
    listed = run_cli(["jobs", "--json"], imgq_env)
    assert job.job_id not in listed.stdout


def test_worker_that_cannot_reach_its_store_does_not_consume(
    start_worker: Callable[..., WorkerProcess], imgq_env: dict[str, str], tmp_path: Path
) -> None:
    down = f"postgresql://imgq:{PASSWORD}@127.0.0.1:1/imgq"
    client = Client(Settings(**_settings(imgq_env, "redis")))
    job = client.submit(make_images(tmp_path / "imgs", 1), models=["tsolo"])
    queue = client.store.client
    assert waiting(queue, "imgq.tsolo") == 1
    worker = start_worker("tsolo", name="pg-down", wait=False, env={"IMGQ_RESULTS_URL": down})
    assert worker.proc.wait(120) == 2
    out = worker.output()
    assert "imgq worker cannot start: results store" in out
    assert "cannot reach the PostgreSQL server" in out and PASSWORD not in out
    assert waiting(queue, "imgq.tsolo") == 1  # nothing taken
    queue.delete("imgq.tsolo")
    del job


def test_a_chunk_that_fails_for_good_gets_task_failed_rows(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    fresh_url: str,
    tmp_path: Path,
) -> None:
    """A chunk whose rows the store refuses (here a trigger refuses the rows of one
    image) is retried, then fails for good: every image of that chunk gets one
    ``task_failed`` row, the other chunks their results, and the job finishes."""
    worker = start_worker("tsolo", name="pg-fails", env={"IMGQ_RESULTS_URL": fresh_url})
    with psycopg.connect(fresh_url, autocommit=True) as conn:  # the worker made the schema
        conn.execute(
            """CREATE FUNCTION refuse_rows() RETURNS trigger AS $$
            BEGIN
              IF NEW.error_code IS NULL AND NEW.source LIKE '%refused%' THEN
                RAISE EXCEPTION 'rows of this image are refused';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON imgq_results "
            "FOR EACH ROW EXECUTE FUNCTION refuse_rows()"
        )
    good = make_images(tmp_path / "imgs", 5, size=(40, 30))
    refused = make_images(tmp_path / "refused", 1, size=(40, 30))
    sources = [*good[:3], *refused, *good[3:]]  # chunks of 2: the second one fails
    client = Client(Settings(**_settings(imgq_env, fresh_url)))
    job = client.submit(sources, models=["tsolo"], chunk_size=2)
    status = job.wait(progress=False, timeout=180)
    assert status.models["tsolo"].as_dict() == {"total": 6, "done": 4, "failed": 2, "pending": 0}
    records = job.results()
    assert [r.image for r in records] == sources
    failed = [r for r in records if r.error is not None]
    assert [r.image for r in failed] == sources[2:4]
    for r in failed:
        assert r.error is not None and r.error.code.value == "task_failed"
        assert "rows of this image are refused" in r.error.message
    assert all(len(r.top5) == 5 for r in records if r.error is None)
    assert row_count(fresh_url, job.job_id) == 6
    assert "Retry in" in worker.output()  # retried before failing for good
    worker.stop()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL with password authentication, for restarts."""
    server = PostgresServer(password=PASSWORD).init().start()
    try:
        yield server
    finally:
        server.remove()


def test_wrong_password_is_refused_without_echoing_it(
    own_postgres: PostgresServer, imgq_env: dict[str, str], tmp_path: Path
) -> None:
    image = make_images(tmp_path / "imgs", 1)[0]
    url = own_postgres.url(password="not-" + PASSWORD)
    result = run_cli(["submit", image, "--model", "tsolo"], {**imgq_env, "IMGQ_RESULTS_URL": url})
    assert result.returncode == 1
    assert "refused the user name or password" in result.stderr
    assert PASSWORD not in result.stderr and "imgq:***@" in result.stderr


def test_postgres_restart_mid_job(
    own_postgres: PostgresServer,
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    tmp_path: Path,
) -> None:
    url = own_postgres.url()
    images = make_images(tmp_path / "imgs", 80, size=(40, 30))
    worker = start_worker(
        "tfault",
        name="pg-restart",
        env={"IMGQ_RESULTS_URL": url, **SLOW},
        args=("--concurrency", "2"),
    )
    client = Client(Settings(**_settings(imgq_env, url)))
    job = client.submit(images, models=["tfault"], chunk_size=2)
    wait_for(lambda: succeeded(worker) >= 5, 120, "the job to start")
    own_postgres.stop("fast")  # disconnects every client
    # The worker pauses (no image fails, it stays up) and says so in `imgq workers`.
    wait_for(lambda: "imgq worker paused" in worker.output(), 60, "the worker to pause")

    def listed_paused() -> bool:
        out = json.loads(run_cli(["workers", "--json"], imgq_env).stdout)["workers"]
        return any(w["name"].startswith("pg-restart@") and w.get("store_unavailable") for w in out)

    wait_for(listed_paused, 30, "imgq workers to show the pause", interval=0.5)
    counts = job.status().models["tfault"]
    assert not job.status().finished and counts.failed == 0
    assert worker.proc.poll() is None
    own_postgres.start()
    status = job.wait(progress=False, timeout=240)
    assert status.models["tfault"].as_dict() == {
        "total": 80,
        "done": 80,
        "failed": 0,
        "pending": 0,
    }
    assert row_count(url, job.job_id) == 80
    records = job.results()
    assert sorted(r.image for r in records) == sorted(images)
    assert all(r.error is None for r in records)
    out = worker.output()
    assert "PostgreSQL unreachable" in out and "imgq worker resumed" in out  # it waited
    assert worker.proc.poll() is None
    worker.stop()


def _settings(imgq_env: dict[str, str], results_url: str) -> dict[str, Any]:
    return {
        "broker_url": imgq_env["IMGQ_BROKER_URL"],
        "models_file": imgq_env["IMGQ_MODELS_FILE"],
        "results_url": results_url,
    }

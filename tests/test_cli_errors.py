"""Every mistake a user can make gets one clear line, before any work starts.

Every command runs with bad values of its options, every ``IMGQ_*`` setting with a
bad value, a broker URL without a scheme or with a database Redis does not have, an
unreachable Redis, a busy port, a missing output folder: the exit code is the
documented one, stderr has at most two lines and no traceback, and no job was
created. In-process (click's runner) wherever the process itself does not matter;
a few real processes where it does. No worker is needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from producer.api import Client
from producer.cli import main
from shared.jobs import JOB_INDEX_KEY
from shared.settings import Settings, env_names, get_settings
from tests.conftest import ROOT, RedisServer, free_port

# Settings whose every value is usable (names, secrets, folders created on use).
ANY_VALUE = {
    "worker_models",
    "allowed_roots",
    "notify_secret",
    "openvino_cache_dir",
    "tfhub_cache_dir",
    "worker_metrics_addr",
    "ready_file",
}
# A bad value of every other setting, with a word the message must contain.
BAD_SETTINGS: dict[str, tuple[str, str]] = {
    "broker_url": ("localhost:6379", "redis://"),
    "result_backend": ("localhost:6379", "redis://"),
    "results_url": ("mysql://db/x", "postgresql://"),
    "models_file": ("/nowhere/models.toml", "no such file"),
    "result_expires": ("59", "greater than or equal to 60"),
    "visibility_timeout": ("9", "greater than or equal to 10"),
    "sentinel_master": ("", "at least 1 character"),
    "heartbeat_interval": ("0", "greater than 0"),
    "heartbeat_timeout": ("0.5", "greater than or equal to 1"),
    "sweep_grace": ("0", "greater than or equal to 1"),
    "chunk_size": ("0", "greater than or equal to 1"),
    "batch_size": ("0", "greater than or equal to 1"),
    "max_batch_delay_ms": ("-1", "greater than or equal to 0"),
    "worker_concurrency": ("0", "greater than or equal to 1"),
    "jit_compile": ("maybe", "valid boolean"),
    "mixed_precision": ("maybe", "valid boolean"),
    "precision": ("fp64", "'fp32'"),
    "runtime": ("onnx", "'tensorflow'"),
    "decode": ("slow", "'fast'"),
    "decode_threads": ("0", "greater than or equal to 1"),
    "max_image_bytes": ("0", "greater than or equal to 1"),
    "max_image_pixels": ("0", "greater than or equal to 1"),
    "fetch_timeout": ("0", "greater than 0"),
    "fetch_max_redirects": ("-1", "greater than or equal to 0"),
    "allow_private_urls": ("maybe", "valid boolean"),
    "result_cache": ("maybe", "valid boolean"),
    "s3_endpoint_url": ("ftp://store:21", "http://"),
    "s3_max_attempts": ("0", "greater than or equal to 1"),
    "notify_tries": ("0", "greater than or equal to 1"),
    "notify_backoff": ("0", "greater than 0"),
    "memory_growth": ("maybe", "valid boolean"),
    "warm_up": ("maybe", "valid boolean"),
    "warm_up_sizes": ("some", "'all' or 'largest'"),
    "gpu_memory_limit_mb": ("-1", "greater than or equal to 0"),
    "require_gpu": ("maybe", "valid boolean"),
    "redis_connect_timeout": ("0", "greater than 0"),
    "worker_metrics_port": ("70000", "less than or equal to 65535"),
}
JOB = "cli-errors-known"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own, so that "no job was created" can be counted."""
    server = RedisServer(tmp_path_factory.mktemp("cli-errors-redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images (never decoded here), a models file with a model no worker serves."""
    path = tmp_path_factory.mktemp("cli-errors")
    (path / "models.toml").write_text(
        '[models.ce]\nhandle = "/nowhere/ce"\nlabels = "imagenet1k"\n\n'
        '[models.cemb]\nkind = "embedding"\nhandle = "/nowhere/cemb"\n',
        encoding="utf-8",
    )
    for name in ("a.jpg", "b.jpg"):
        (path / name).write_bytes(b"not decoded here")
    (path / "a-file").write_text("x", encoding="utf-8")
    for label in ("cat", "dog"):  # a training set: two labels of two images
        (path / "train" / label).mkdir(parents=True)
        for name in ("1.jpg", "2.jpg"):
            (path / "train" / label / name).write_bytes(b"not decoded here")
    (path / "list.txt").write_text("a.jpg\n", encoding="utf-8")
    (path / "nocol.csv").write_text("id,name\n1,a.jpg\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(redis_url: str, folder: Path) -> dict[str, str]:
    """The environment of every command here: no other IMGQ_* setting."""
    return {"IMGQ_BROKER_URL": redis_url, "IMGQ_MODELS_FILE": str(folder / "models.toml")}


@pytest.fixture(scope="module")
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="module")
def known_job(env: dict[str, str], folder: Path) -> str:
    """A job on record (never run): commands that read a job read this one."""
    client = Client(Settings(**{"broker_url": env["IMGQ_BROKER_URL"]}))
    client.submit([str(folder / "a.jpg")], models=["resnet50"], job_id=JOB)
    return JOB


def invoke(args: list[str], env: dict[str, str], **extra: str) -> Result:
    """Run ``imgq ARGS`` in this process with exactly ``env`` (and ``extra``) as IMGQ_*."""
    wanted = {**env, **extra}
    clear: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith("IMGQ_") or k == "TFHUB_CACHE_DIR"
    }
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, args, env={**clear, **wanted}, catch_exceptions=True)
    finally:
        get_settings.cache_clear()


def assert_one_clear_line(result: Result, code: int, *words: str) -> str:
    """Exit ``code``, at most two lines on stderr, no traceback, every word in it."""
    err = result.stderr.strip()
    detail = f"exit {result.exit_code}, stderr: {err!r}, exception: {result.exception!r}"
    assert result.exit_code == code, detail
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), detail
    assert 1 <= len(err.splitlines()) <= 2, detail
    assert "Traceback" not in err, detail
    for word in words:
        assert word in err, detail
    return err


def jobs_on_record(r: redis.Redis) -> int:
    return int(r.zcard(JOB_INDEX_KEY))


# --- every command, with a bad value of each of its options ---------------------------
def bad_options(folder: Path) -> list[tuple[list[str], str]]:
    """(arguments, the option the message must name)."""
    img = str(folder / "a.jpg")
    missing = str(folder / "no-such-folder" / "out.jsonl")
    return [
        (["submit", img, "-m", "ce", "--chunk-size", "-1"], "--chunk-size"),
        (["submit", img, "-m", "ce", "--chunk-size", "0"], "--chunk-size"),
        (["submit", img, "-m", "ce", "--chunk-size", "5000"], "--chunk-size"),
        (["submit", img, "-m", "ce", "--priority", "12"], "--priority"),
        (["submit", img, "-m", "ce", "--job-id", "bad.id"], "--job-id"),
        (["submit", img, "-m", "ce", "--name", "two\nlines"], "--name"),
        (["submit", img, "-m", "ce", "--wait", "--timeout", "-5"], "--timeout"),
        (["submit", img, "-m", "ce", "--timeout", "5"], "--timeout"),
        (["submit", img, "-m", "ce", "--out", "x.jsonl"], "--out"),
        (["submit", img, "-m", "ce", "--wait", "--out", missing], "--out"),
        (["submit", img, "-m", "ce", "--wait", "--out", str(folder)], "--out"),
        (["submit", img, "-m", "ce", "--wait", "--format", "csv"], "--format"),
        (["submit", img, "-m", "ce", "--wait", "--format", "xml"], "--format"),
        (["submit", img, "-m", "nosuchmodel"], "nosuchmodel"),
        (["submit", str(folder / "phtos"), "-m", "ce"], "no such file or folder: "),
        (["submit", str(folder / "list.txt"), "-m", "ce"], "@"),
        (["submit", str(folder / "nocol.csv"), "-m", "ce"], "no column named image"),
        (["submit", str(folder / "*.png"), "-m", "ce"], "no file matches"),
        (["run", str(folder / "phtos"), "-m", "ce"], "no such file or folder: "),
        (["submit", "-m", "ce"], "SOURCES"),
        (["submit", img], "--model"),
        (["run", img, "-m", "ce", "--chunk-size", "-1"], "--chunk-size"),
        (["run", img, "-m", "ce", "--out", missing], "--out"),
        (["run", img, "-m", "ce", "--out", str(folder)], "--out"),
        (["run", img, "-m", "ce", "--show", "-1"], "--show"),
        (["run", img, "-m", "ce", "--report", str(folder / "nope" / "r.html")], "--report"),
        (["run", img, "-m", "ce", "--state-dir", str(folder / "a-file")], "--state-dir"),
        (["run", img, "-m", "ce", "--job-id", "bad.id"], "--job-id"),
        (["run", "--resume", "bad.id"], "--resume"),
        (["run", "-m", "ce"], "SOURCES"),
        (["results", JOB, "--out", missing], "--out"),
        (["results", JOB, "--out", str(folder)], "--out"),
        (["results", JOB, "--format", "parquet"], "--out"),
        (["wait", JOB, "--timeout", "-5"], "--timeout"),
        (["wait", JOB, "--timeout", "0"], "--timeout"),
        (["wait", JOB, "--format", "parquet"], "--format"),
        (["wait", JOB, "--out", missing], "--out"),
        (["report", JOB], "--out"),
        (["report", JOB, "--out", str(folder / "nope" / "r.html")], "--out"),
        (["report", JOB, "--out", str(folder)], "--out"),
        (["report", JOB, "--png-dir", str(folder / "nope" / "charts")], "--png-dir"),
        (["report", JOB, "--out", "r.html", "--page-size", "0"], "--page-size"),
        (["report", JOB, "--out", "r.html", "--max-images", "0"], "--max-images"),
        (["jobs", "--limit", "0"], "--limit"),
        (["jobs", "--state", "lost"], "--state"),
        (["worker", "-m", "ce", "-c", "0"], "--concurrency"),
        (["worker", "-m", "ce", "--batch-size", "0"], "--batch-size"),
        (["worker", "-m", "ce", "--pool", "prefork"], "--pool"),
        (["worker", "-m", "nosuchmodel"], "nosuchmodel"),
        (["worker", "-m", "ce", "--gpu", "0,1"], "--gpu"),
        (["worker", "-m", "ce", "--gpu", "all"], "--gpu"),
        (["metrics", "--port", "0"], "--port"),
        (["metrics", "-m", "nosuchmodel"], "nosuchmodel"),
        (["status", JOB, "--jsn"], "--jsn"),
        (["delete", JOB, "--force"], "--force"),
        (["cancel"], "JOB_ID"),
        (["workers", "--jsn"], "--jsn"),
        (["models", "--jsn"], "--jsn"),
        (["models", "delete"], "MODEL"),
        (["models", "delete", "bad name@x"], "NAME@VERSION"),
        (["train", str(folder), "--base", "cemb"], "--name"),
        (["train", str(folder), "--name", "mine"], "--base"),
        (["train", str(folder), "--base", "cemb", "--name", "bad@name"], "--name"),
        (["train", str(folder), "--base", "cemb", "--name", "ce"], "--name"),
        (["train", str(folder), "--base", "nosuchmodel", "--name", "mine"], "nosuchmodel"),
        (["train", str(folder), "--base", "ce", "--name", "mine"], "is a classifier"),
        (["train", str(folder / "nope"), "--base", "cemb", "--name", "mine"], "no such file"),
        (["train", str(folder), "--base", "cemb", "--name", "mine", "--val-fraction", "0.9"],
         "--val-fraction"),
        (["train", str(folder), "--base", "cemb", "--name", "mine", "--timeout", "0"],
         "--timeout"),
        (["train", str(folder), "--base", "cemb", "--name", "mine", "--report",
          str(folder / "nope" / "r.html")], "--report"),
        (["export", "mine@1"], "--out"),
        (["export", "bad name@x", "--out", str(folder / "exp")], "NAME@VERSION"),
        (["similar", img], "--job"),
        (["similar", img, "--job", JOB, "-k", "0"], "-k"),
        (["duplicates", JOB, "--threshold", "2"], "--threshold"),
        (["duplicates", JOB, "-k", "0"], "-k"),
        (["cache", "purge", "--modle", "cemb"], "--modle"),
    ]  # fmt: skip


def test_every_bad_option_is_one_line_and_exit_2(
    env: dict[str, str], folder: Path, r: redis.Redis, known_job: str
) -> None:
    before = jobs_on_record(r)
    failures = []
    for args, option in bad_options(folder):
        result = invoke(args, env)
        try:
            assert_one_clear_line(result, 2, option)
        except AssertionError as exc:
            failures.append(f"imgq {' '.join(args)!r}: {exc}")
    assert failures == []
    assert jobs_on_record(r) == before  # nothing was submitted


def test_allow_missing_submits_a_path_this_host_does_not_see(
    env: dict[str, str], folder: Path, r: redis.Redis
) -> None:
    gone = str(folder / "on-another-host.jpg")
    result = invoke(["submit", gone, "-m", "ce", "--allow-missing"], env)
    assert result.exit_code == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    assert int(r.hget(f"imgq:job:{job_id}", "total_images") or 0) == 1
    assert invoke(["cancel", job_id], env).exit_code == 0


# --- every setting with a bad value, every command ------------------------------------
def commands(folder: Path) -> list[list[str]]:
    """One valid invocation of every command (none of them gets to do its work)."""
    img = str(folder / "a.jpg")
    return [
        ["submit", img, "-m", "ce"],
        ["run", img, "-m", "ce", "--out", str(folder / "r.jsonl")],
        ["worker", "-m", "ce"],
        ["jobs"],
        ["wait", JOB],
        ["cancel", JOB],
        ["status", JOB],
        ["results", JOB],
        ["delete", JOB, "--yes"],
        ["report", JOB, "--out", str(folder / "r.html")],
        ["models"],
        ["metrics"],
        ["workers"],
        ["train", str(folder / "train"), "--base", "cemb", "--name", "mine"],
        ["export", "mine@1", "--out", str(folder / "exp")],
        ["similar", img, "--job", JOB],
        ["duplicates", JOB],
        ["cache", "purge"],
    ]


# With the Redis results store (this module's), these refuse before any Redis is
# asked: an embedding model's vectors and the result cache live in PostgreSQL.
NEEDS_POSTGRESQL = ("train", "cache")


def test_imgq_alone_shows_the_help(env: dict[str, str]) -> None:
    result = invoke([], env)
    assert "Commands:" in result.output and len(result.output.splitlines()) > 10


def test_the_table_of_bad_settings_covers_every_setting() -> None:
    assert set(BAD_SETTINGS) | ANY_VALUE == set(Settings.model_fields)


@pytest.mark.parametrize("field", sorted(BAD_SETTINGS))
def test_a_bad_setting_stops_every_command_in_one_line(
    field: str, env: dict[str, str], folder: Path, r: redis.Redis, known_job: str
) -> None:
    value, allowed = BAD_SETTINGS[field]
    name = env_names(field)[0]
    before = jobs_on_record(r)
    failures = []
    for args in commands(folder):
        result = invoke(args, env, **{name: value})
        try:
            err = assert_one_clear_line(result, 2, name, allowed)
            assert "pydantic" not in err and "https://" not in err
        except AssertionError as exc:
            failures.append(f"imgq {' '.join(args)!r}: {exc}")
    assert failures == []
    assert jobs_on_record(r) == before
    assert r.exists(f"imgq:job:{known_job}")  # nothing deleted, nothing cancelled
    assert not r.hexists(f"imgq:job:{known_job}", "cancelled")


def test_settings_checked_across_fields_name_both(env: dict[str, str]) -> None:
    result = invoke(["jobs"], env, IMGQ_HEARTBEAT_INTERVAL="5", IMGQ_HEARTBEAT_TIMEOUT="8")
    assert_one_clear_line(result, 2, "IMGQ_HEARTBEAT_TIMEOUT", "IMGQ_HEARTBEAT_INTERVAL")


# --- the broker: no scheme, a database Redis does not have, unreachable ---------------
def test_broker_url_without_scheme_or_a_bad_database(
    env: dict[str, str], folder: Path, redis_url: str, r: redis.Redis, known_job: str
) -> None:
    base = redis_url.rsplit("/", 1)[0]
    before = jobs_on_record(r)
    failures = []
    for url, words in (
        ("localhost:6379", ("IMGQ_BROKER_URL", "redis://")),
        (f"{base}/abc", ("IMGQ_BROKER_URL", "database index")),
        (f"{base}/99", ("IMGQ_BROKER_URL", "DB index")),
    ):
        for args in commands(folder):
            if args[0] in (*NEEDS_POSTGRESQL, "models") or (
                url.endswith("/99") and args[0] == "metrics"
            ):
                continue  # models reads no Redis; metrics reports Redis down per scrape
            result = invoke(args, env, IMGQ_BROKER_URL=url)
            try:
                assert_one_clear_line(result, 2, *words)
            except AssertionError as exc:
                failures.append(f"{url} imgq {' '.join(args)!r}: {exc}")
    assert failures == []
    assert jobs_on_record(r) == before


def test_unreachable_redis_is_one_line_and_exit_1(env: dict[str, str], folder: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    failures = []
    for args in commands(folder):
        if args[0] in (*NEEDS_POSTGRESQL, "models", "metrics", "worker", "run"):
            continue  # no Redis needed; serves anyway; waits for Redis; starts one of its own
        result = invoke(args, env, IMGQ_BROKER_URL=down)
        try:
            assert_one_clear_line(result, 1, "cannot reach Redis")
        except AssertionError as exc:
            failures.append(f"imgq {' '.join(args)!r}: {exc}")
    assert failures == []


# --- a busy port ---------------------------------------------------------------------
def test_metrics_on_a_busy_port(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke(["metrics", "--port", str(port)], env)
    assert_one_clear_line(result, 2, f"127.0.0.1:{port}", "--port")


# --- the API refuses what the command line refuses -------------------------------------
@pytest.mark.parametrize("size", [-2, 0, 5000])
def test_api_refuses_a_chunk_size_out_of_range(
    size: int, env: dict[str, str], folder: Path, r: redis.Redis
) -> None:
    client = Client(Settings(broker_url=env["IMGQ_BROKER_URL"]))
    before = jobs_on_record(r)
    with pytest.raises(ValueError, match=f"chunk_size {size} is not in 1-4096"):
        client.submit([str(folder / "a.jpg")], models=["resnet50"], chunk_size=size)
    assert jobs_on_record(r) == before


# --- exit codes of waits -----------------------------------------------------------------
def test_submit_wait_timeout_exits_4_like_wait(env: dict[str, str], folder: Path) -> None:
    result = invoke(
        ["submit", str(folder / "a.jpg"), "-m", "ce", "--wait", "--timeout", "0.3",
         "--no-progress", "--job-id", "cli-errors-timeout"],
        env,
    )  # fmt: skip
    assert_one_clear_line(result, 4, "not finished after 0.3 s", "imgq wait cli-errors-timeout")
    assert invoke(["cancel", "cli-errors-timeout"], env).exit_code == 0


def test_cancelled_jobs_results_say_cancelled(
    env: dict[str, str], folder: Path, tmp_path: Path
) -> None:
    client = Client(Settings(broker_url=env["IMGQ_BROKER_URL"], models_file=folder / "models.toml"))
    job = client.submit([str(folder / "a.jpg"), str(folder / "b.jpg")], models=["ce"])
    job.cancel()
    result = invoke(["results", job.job_id, "--out", str(tmp_path / "r.jsonl")], env)
    assert result.exit_code == 0, result.stderr
    assert f"job {job.job_id} was cancelled" in result.stderr
    assert "pending" not in result.stderr and "0 were never" not in result.stderr
    assert "2 were never classified" in result.stderr


# --- real processes: what a shell sees -------------------------------------------------
def run_process(
    args: list[str], env: dict[str, str], **extra: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    return subprocess.run(
        args, env={**base, **env, **extra}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_real_processes_print_one_line_for_a_bad_setting(env: dict[str, str], folder: Path) -> None:
    imgq = [sys.executable, "-m", "producer.cli"]
    celery = [sys.executable, "-m", "celery", "-A", "workers.app", "worker"]
    for args in ([*imgq, "worker", "-m", "ce"], celery, [*imgq, "jobs"]):
        proc = run_process(args, env, IMGQ_BATCH_SIZE="0")
        err = proc.stderr.strip()
        assert proc.returncode == 2, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert "IMGQ_BATCH_SIZE='0'" in err, (args, err)
    proc = run_process(
        [*imgq, "submit", str(folder / "a.jpg"), "-m", "ce", "--chunk-size", "-1"], env
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- a job is read from the results store it was submitted with ------------------------
def test_a_job_is_read_from_its_own_results_store(
    env: dict[str, str], folder: Path, postgres_url: str, tmp_path: Path
) -> None:
    from shared.contract import error_result, task_id
    from shared.schemas import ErrorCode

    models = folder / "models.toml"
    on_redis = Client(Settings(broker_url=env["IMGQ_BROKER_URL"], models_file=models))
    job = on_redis.submit([str(folder / "a.jpg")], models=["ce"])
    assert job.record.results_store == on_redis.store.get(job.job_id).results_store == "redis"
    tid = task_id(job.job_id, "ce", 0)
    record = error_result(job.job_id, "a.jpg", "ce", ErrorCode.NOT_FOUND, "gone")
    on_redis.app.backend.store_result(tid, [record], "SUCCESS")
    on_redis.store.mark_finished(tid, ok=0, failed=1)
    # Read with IMGQ_RESULTS_URL naming PostgreSQL: the records come from Redis anyway.
    out = tmp_path / "r.jsonl"
    result = invoke(["results", job.job_id, "--out", str(out)], env, IMGQ_RESULTS_URL=postgres_url)
    assert result.exit_code == 0, result.stderr
    assert "wrote 1 record to" in result.stderr and len(out.read_text().splitlines()) == 1

    # A PostgreSQL job read with IMGQ_RESULTS_URL=redis: refused, not "0 records".
    on_pg = Client(
        Settings(broker_url=env["IMGQ_BROKER_URL"], models_file=models, results_url=postgres_url)
    )
    pg_job = on_pg.submit([str(folder / "a.jpg")], models=["ce"])
    assert pg_job.record.results_store == "postgresql"
    for args in (
        ["results", pg_job.job_id],
        ["report", pg_job.job_id, "--out", str(tmp_path / "r.html")],
    ):
        result = invoke(args, env)
        assert_one_clear_line(result, 1, "keeps its results in postgresql", "IMGQ_RESULTS_URL")
    pg_job.cancel()


# --- an interrupted run says how to resume, or that it cannot ---------------------------
def test_resume_hint_never_names_a_state_dir_of_none(tmp_path: Path) -> None:
    from producer.runner import RunPlan, resume_hint

    temporary = resume_hint("j1", RunPlan(sources=["x"], models=["m"]), embedded=True)
    assert "None" not in temporary and "cannot be resumed" in temporary
    kept = RunPlan(sources=["x"], models=["m"], state_dir=tmp_path / "my state")
    assert resume_hint("j1", kept, embedded=True) == (
        f"resume with  imgq run --resume j1 --state-dir '{tmp_path / 'my state'}'"
    )
    assert resume_hint("j1", kept, embedded=False) == "resume with  imgq run --resume j1"


def test_a_worker_refuses_the_prefork_pool_it_is_asked_for(env: dict[str, str]) -> None:
    # Celery replaces an explicit -P prefork with the configured thread pool without a
    # word; the worker reads its command line and refuses, before any model loads.
    celery = [sys.executable, "-m", "celery", "-A", "workers.app", "worker"]
    for pool in (["-P", "prefork"], ["--pool=processes"]):
        proc = run_process([*celery, *pool, "--model", "ce"], env)
        assert proc.returncode == 2, proc.stderr
        assert "imgq worker cannot start: the prefork pool forks" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_worker_asked_for_a_gpu_refuses_to_start_without_one(env: dict[str, str]) -> None:
    # On a host without /dev/nvidia*, imgq worker --gpu stops before starting Celery.
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this host has an NVIDIA GPU")
    result = invoke(["worker", "-m", "ce", "--gpu", "0"], env)
    assert_one_clear_line(result, 2, "--gpu 0", "no NVIDIA GPU")
    # What --gpu hands the worker: where TensorFlow then lists no GPU (CUDA libraries
    # that fail to load, tensorflow-cpu), the worker refuses instead of running on the
    # CPU; before any model loads (this one's handle does not exist).
    celery = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--model", "ce"]
    proc = run_process(celery, env, IMGQ_REQUIRE_GPU="true", CUDA_VISIBLE_DEVICES="0")
    assert proc.returncode == 2, proc.stderr
    # The one line on stderr (the log has it too, with a timestamp).
    lines = [line for line in proc.stderr.splitlines() if line.startswith("imgq worker cannot")]
    assert len(lines) == 1 and "a GPU was asked for (IMGQ_REQUIRE_GPU=true)" in lines[0]
    assert "Traceback" not in proc.stderr and "could not be loaded" not in proc.stderr


# --- what a user reads --------------------------------------------------------------------
def test_reattached_progress_rate_and_top5_labels_and_plurals(
    env: dict[str, str], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli_common import print_top5_table
    from shared.contract import ok_result, task_id

    client = Client(Settings(broker_url=env["IMGQ_BROKER_URL"], models_file=folder / "models.toml"))
    job = client.submit([str(folder / "a.jpg")], models=["ce"], chunk_size=1)
    tid = task_id(job.job_id, "ce", 0)
    label = "European fire salamander, Salamandra salamandra"
    client.app.backend.store_result(
        tid, [ok_result(job.job_id, "a.jpg", "ce", [0], [0.9], [label])], "SUCCESS"
    )
    client.store.mark_finished(tid, ok=1, failed=0)
    capsys.readouterr()
    job.wait(progress=True)  # re-attached to a finished job: no rate of millions img/s
    bar = capsys.readouterr().err
    assert "1/1" in bar and "img/s" in bar
    rate = bar.rsplit("img/s", 1)[0].rsplit(" ", 1)[-1].lstrip("?,")
    assert not rate or float(rate) < 1000, bar
    print_top5_table(job, 10)
    assert "European fire salamander 90.0%" in capsys.readouterr().out
    result = invoke(["status", job.job_id], env)
    assert f"job {job.job_id}: finished, 1 image\n" in result.stdout

"""No side channels: worker options as Celery worker arguments, readiness by ping,
help defaults from the settings, URLs redacted by kombu."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from producer.embedded import EmbeddedWorker, ping
from shared.settings import Settings
from tests.conftest import CUSTOM_LABELS, ROOT, free_port, run_cli


def test_help_defaults_are_the_settings_defaults(imgq_env: dict[str, str]) -> None:
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    worker = run_cli(["worker", "--help"], imgq_env)
    assert worker.returncode == 0, worker.stderr
    text = " ".join(worker.stdout.split())
    assert f"IMGQ_WORKER_CONCURRENCY; default {defaults['worker_concurrency']}]" in text
    assert f"IMGQ_BATCH_SIZE; default {defaults['batch_size']}]" in text
    submit = run_cli(["submit", "--help"], imgq_env)
    assert f"IMGQ_CHUNK_SIZE; default {defaults['chunk_size']}]" in " ".join(submit.stdout.split())


def test_worker_batch_size_out_of_bounds_is_a_usage_error(imgq_env: dict[str, str]) -> None:
    proc = run_cli(["worker", "--model", "tsolo", "--batch-size", "0"], imgq_env, timeout=60)
    assert proc.returncode == 2
    assert "Invalid value for '--batch-size'" in proc.stderr


def test_broker_url_password_is_redacted(imgq_env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"not read: the broker is unreachable")
    env = {**imgq_env, "IMGQ_BROKER_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    proc = run_cli(["run", str(image), "-m", "tsolo", "--no-progress"], env, timeout=60)
    assert proc.returncode == 1
    assert "using the broker at redis://:**@127.0.0.1:" in proc.stderr
    assert "cannot reach Redis at redis://:**@127.0.0.1:" in proc.stderr
    assert "s3cret" not in proc.stderr


def test_a_worker_of_numpy_models_loads_no_tensorflow(
    imgq_env: dict[str, str], tmp_path: Path
) -> None:
    worker = EmbeddedWorker(
        ["tsolo"], imgq_env["IMGQ_BROKER_URL"], tmp_path / "w.log", base_env=imgq_env
    ).start()
    try:
        worker.wait_ready(timeout=60)
        assert worker.proc is not None
        maps = Path(f"/proc/{worker.proc.pid}/maps").read_text()
        assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps
        assert "runtime numpy, precision fp32" in worker.output()
    finally:
        worker.stop()
    # Asked for a GPU, it refuses to start rather than run on the CPU.
    gpu = {**imgq_env, "IMGQ_REQUIRE_GPU": "true"}
    proc = run_cli(["worker", "--model", "tsolo"], gpu, timeout=60)
    assert proc.returncode != 0
    assert "this worker's models all run on the numpy runtime, on the CPU" in proc.stderr


def test_a_worker_not_started_or_on_no_broker_is_not_ready(tmp_path: Path) -> None:
    worker = EmbeddedWorker(["tsolo"], "redis://127.0.0.1:1/0", tmp_path / "w.log")
    assert not worker.ready()  # never started
    assert not ping(f"redis://127.0.0.1:{free_port()}/0", "nobody@nowhere", timeout=0.2)


def test_celery_worker_takes_imgq_options_as_arguments(
    imgq_env: dict[str, str], photos: Path, client: Any, tmp_path: Path
) -> None:
    # No IMGQ_WORKER_MODELS and no -Q: the models come from --model alone, and
    # --batch-size wins over the environment's IMGQ_BATCH_SIZE (8).
    assert "IMGQ_WORKER_MODELS" not in imgq_env and imgq_env["IMGQ_BATCH_SIZE"] == "8"
    log = tmp_path / "celery.log"
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", "opts@%h"]
    cmd += ["--model", "tsolo", "--batch-size", "3", "--loglevel", "INFO"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=imgq_env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        worker = EmbeddedWorker(["tsolo"], imgq_env["IMGQ_BROKER_URL"], log, hostname="opts@%h")
        worker.proc = proc  # started above with the celery command itself
        worker.wait_ready(timeout=120)
        job = client.submit([str(photos / "coffee.jpg")], models=["tsolo"])
        job.wait(progress=False, timeout=120)
        [rec] = job.results()
        assert rec.error is None and rec.top5[0].label in CUSTOM_LABELS
        text = log.read_text()
        assert "serving tsolo on queues imgq.tsolo" in text
        assert "batches of up to 3 " in text
    finally:
        proc.terminate()
        proc.wait(60)

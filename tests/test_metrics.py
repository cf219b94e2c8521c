"""``imgq metrics``: queue lengths per model on a Prometheus endpoint, read from Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from producer.api import Client
from shared.priority import queue_lists
from shared.settings import Settings
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_queue_lengths_on_metrics(
    imgq_env: dict[str, str], models_dir: Path, photos: Path, tmp_path: Path
) -> None:
    # A model no worker serves: its tasks stay queued.
    models = tmp_path / "models.toml"
    models.write_text(
        f'[models.tmetric]\nhandle = "{models_dir / "t1001"}"\ninput_size = 32\n'
        'labels = "imagenet1k-background"\n'
    )
    env = {**imgq_env, "IMGQ_MODELS_FILE": str(models)}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "metrics", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = Client(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models))
    try:
        job = client.submit(
            sorted(str(p) for p in photos.glob("*.jpg")), models=["tmetric"], chunk_size=1
        )
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(url, timeout=5).text
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert 'imgq_queue_length{model="tmetric",queue="imgq.tmetric"} 3.0' in text
        assert "imgq_redis_up 1.0" in text
        assert "imgq_unacked_tasks" in text
        assert "imgq_redis_memory_used_bytes" in text and "imgq_redis_memory_max_bytes" in text
        assert 'model="resnet50"' in text  # every registry model is reported
    finally:
        redis.Redis.from_url(imgq_env["IMGQ_BROKER_URL"]).delete(*queue_lists("imgq.tmetric"))
        proc.terminate()
        proc.wait(10)
    assert job.status().models["tmetric"].pending == 3

"""Redis high availability: a real master, replica and three sentinels; the master is
SIGKILLed mid-job, a replica is promoted, and the job finishes with every image once;
Flower, watching through the sentinels, follows the failover."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.api import Client
from shared.settings import Settings
from tests.conftest import WorkerProcess, run_cli
from tests.redis_ha import MASTER_NAME, SentinelGroup
from tests.test_faults import assert_exactly_once, make_images, succeeded, wait_for
from tests.test_flower import running_flower

pytestmark = pytest.mark.slow


def test_master_killed_mid_job_a_replica_takes_over(
    start_worker: Callable[..., WorkerProcess], imgq_env: dict[str, str], tmp_path: Path
) -> None:
    group = SentinelGroup(tmp_path / "ha").start()
    stack = contextlib.ExitStack()
    try:
        env = {
            "IMGQ_BROKER_URL": group.url,
            "IMGQ_SENTINEL_MASTER": MASTER_NAME,
            "IMGQ_MAX_BATCH_DELAY_MS": "150",
            # Writes acknowledged by the old master but not yet replicated are lost
            # at a failover; the sweep finds their tasks sooner than the default.
            "IMGQ_SWEEP_GRACE": "5",
        }
        worker = start_worker("tfault", name="ha", env=env, args=("--concurrency", "2"))
        # Flower watches through the sentinels too, and must follow the failover.
        flower = stack.enter_context(running_flower({**imgq_env, **env}, tmp_path / "flower.log"))
        client = Client(
            Settings(
                broker_url=group.url,
                sentinel_master=MASTER_NAME,
                models_file=imgq_env["IMGQ_MODELS_FILE"],
            )
        )
        images = make_images(tmp_path / "imgs", 200, size=(64, 48))
        job = client.submit(images, models=["tfault"], chunk_size=2)
        wait_for(lambda: succeeded(worker) >= 5, 120, "the job to start")
        old = group.master_port()
        assert group.master.proc is not None
        group.master.proc.send_signal(signal.SIGKILL)
        group.master.proc.wait(10)
        wait_for(lambda: group.master_port() != old, 60, "a replica to be promoted")
        assert group.master_port() == group.replica.port
        status = job.wait(progress=False, timeout=240)
        assert status.models["tfault"].as_dict() == {
            "total": 200,
            "done": 200,
            "failed": 0,
            "pending": 0,
        }
        records = job.results()
        assert_exactly_once(records, images, ["tfault"])
        assert all(r.error is None for r in records)
        assert worker.proc.poll() is None, "the worker must follow the failover"
        # Status and the worker listing read through the sentinels too.
        cli_env = {**imgq_env, **env}
        out = run_cli(["status", job.job_id, "--json"], cli_env, timeout=60)
        assert out.returncode == 0, out.stderr
        listing = run_cli(["workers", "--json"], cli_env, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert any(w["alive"] for w in json.loads(listing.stdout)["workers"])
        # Flower, started on the old master, shows a job run on the new one.
        after = client.submit(images[:8], models=["tfault"], chunk_size=2)
        after.wait(progress=False, timeout=120)
        ids = set(after.record.task_ids("tfault"))

        def shown() -> bool:
            tasks = flower.get("/api/tasks", search=after.job_id)
            return set(tasks) == ids and all(t["state"] == "SUCCESS" for t in tasks.values())

        wait_for(shown, 60, "Flower to show the job run after the failover")
        worker.stop()
    finally:
        stack.close()
        group.stop()

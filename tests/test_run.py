"""``imgq run``: the whole job in one command on an embedded Redis and worker,
Ctrl-C in the middle with nothing left behind, and ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def run_env(imgq_env: dict[str, str]) -> dict[str, str]:
    """The tests' environment without a broker: ``imgq run`` embeds its own."""
    env = {k: v for k, v in imgq_env.items() if k not in {"IMGQ_BROKER_URL", "IMGQ_RESULT_BACKEND"}}
    return env


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_run_end_to_end(imgq_env: dict[str, str], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    proc = run_cli(
        [
            "run",
            str(photos),
            str(photos / "missing.jpg"),
            "--allow-missing",  # a path this host does not see: a not_found record
            "-m",
            "t1001",
            "-m",
            "t21k",
            "--out",
            str(out),
            "--report",
            str(tmp_path / "report.html"),
            "--no-progress",
        ],
        run_env(imgq_env),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "embedded Redis" in proc.stderr
    report = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "chelsea.jpg" in report and "t21k" in report and "not_found" in report
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    assert Counter((r["image"], r["model"]) for r in records).most_common(1)[0][1] == 1
    missing = [r for r in records if r["image"].endswith("missing.jpg")]
    assert {r["error"]["code"] for r in missing} == {"not_found"}
    # The short table: every image, every model.
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        assert name in proc.stdout
    assert "t21k" in proc.stdout and "%" in proc.stdout


def test_run_uses_a_configured_broker(
    imgq_env: dict[str, str], shared_worker: object, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.csv"
    proc = run_cli(
        [
            "run",
            str(photos / "coffee.jpg"),
            "-m",
            "tcustom",
            "--out",
            str(out),
            "--no-progress",
            "--show",
            "0",
        ],
        imgq_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "workers already running there" in proc.stderr
    assert len(out.read_text().splitlines()) == 2  # header + one row


def test_run_bad_model_fails_fast(imgq_env: dict[str, str], photos: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_cli(
        ["run", str(photos), "-m", "nope", "--out", str(tmp_path / "r.jsonl")], run_env(imgq_env)
    )
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
    models = tmp_path / "m.toml"
    models.write_text('[models.ghost]\nhandle = "/nowhere"\nlabels = "imagenet1k"\n')
    env = {**run_env(imgq_env), "IMGQ_MODELS_FILE": str(models)}
    proc = run_cli(["run", str(photos), "-m", "ghost", "--out", str(tmp_path / "r.jsonl")], env)
    assert proc.returncode == 1
    assert "model 'ghost' could not be loaded" in proc.stderr
    # What to do comes with it: a local SavedModel in the models file.
    assert "IMGQ_MODELS_FILE" in proc.stderr and "[models.ghost]" in proc.stderr
    assert time.monotonic() - start < 120


def test_ctrl_c_leaves_nothing_behind_and_resume_finishes(
    imgq_env: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    # Many one-image tasks, so that the job is still running when interrupted.
    folder = tmp_path / "many"
    folder.mkdir()
    n_images = 200
    for i in range(n_images):
        Image.new("RGB", (64, 48), (i % 256, (7 * i) % 256, 90)).save(folder / f"img{i:03d}.jpg")
    state = tmp_path / "state"
    out = tmp_path / "r.jsonl"
    # One-image tasks that each wait 50 ms for company (a slow model that costs no CPU).
    env = {**run_env(imgq_env), "IMGQ_CHUNK_SIZE": "1", "IMGQ_MAX_BATCH_DELAY_MS": "50"}
    cmd = [
        sys.executable,
        "-m",
        "producer.cli",
        "run",
        str(folder),
        "-m",
        "tsolo",
        "--state-dir",
        str(state),
        "--job-id",
        "resume-me",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal: a pytest started in the background of a script
        # ignores SIGINT, and its children would inherit that (Python then keeps it).
        preexec_fn=_sigint_default,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 180
    # Interrupt once some, not all, of the job is done.
    while time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        log = state / "worker.log"
        if log.exists() and log.read_text().count("succeeded in") >= 5:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    seen |= descendants(proc.pid)
    assert len(seen) >= 2  # redis-server and the worker
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "imgq run --resume resume-me --state-dir" in err
    time.sleep(0.5)
    assert alive(seen) == set(), f"left behind: {alive(seen)}"
    assert not out.exists()

    resumed = run_cli(
        [
            "run",
            "--resume",
            "resume-me",
            "--state-dir",
            str(state),
            "--out",
            str(out),
            "--no-progress",
            "--show",
            "0",
        ],
        env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming job resume-me" in resumed.stderr
    sent = int(resumed.stderr.split("resuming job resume-me: ")[1].split()[0])
    assert 0 < sent < n_images  # what was done is not classified again
    records = [json.loads(line) for line in out.read_text().splitlines()]
    images = [r["image"] for r in records]
    assert sorted(images) == sorted(str(p) for p in folder.iterdir())
    assert all(r["error"] is None for r in records)
    assert os.path.exists(state / "appendonlydir") or any(state.glob("*.aof"))

"""End to end on real parts: a real Redis, real worker processes, the imgq CLI and API.

Every image appears exactly once per model; top-5 indices, labels, order and
scores match a direct TensorFlow call on the same SavedModel and input.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.sources import expand_sources
from shared.labels import load_labels
from shared.settings import Settings
from tests.conftest import (
    CUSTOM_LABELS,
    ROOT,
    TEST_MODELS,
    WorkerProcess,
    renamed_model_file,
    run_cli,
    wait_for,
)
from tests.savedmodels import direct_scores
from workers.inputs import ReadLimits, load_image
from workers.runtimes.base import to_unit

pytestmark = pytest.mark.slow

MODELS = ["t1001", "t21k", "tprobs", "tcustom"]


def expected_top5(models_dir: Path, model: str, paths: list[Path]) -> dict[str, list[int]]:
    """Top-5 indices per image from a direct TensorFlow call on the same decoded input."""
    _, _, activation, _ = TEST_MODELS[model]
    limits = ReadLimits.from_settings(Settings())
    batch = to_unit(np.stack([load_image(str(p), (32, 32), limits) for p in paths]))
    scores = direct_scores(models_dir / model, batch, activation)
    return {
        str(p): list(np.argsort(-s, kind="stable")[:5]) for p, s in zip(paths, scores, strict=True)
    }


def test_folder_of_photos_and_broken_files(
    shared_worker: WorkerProcess, client: Any, photos: Path, models_dir: Path, tmp_path: Path
) -> None:
    from tests.corpus import build_bad_corpus

    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in photos.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    expected_errors = build_bad_corpus(folder / "bad")
    # The folder brings its image files; what is not a file (a missing path, a
    # directory named like an image) comes in a manifest, which passes it on as is.
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "".join(
            f"{folder / 'bad' / n}\n" for n in expected_errors if not (folder / "bad" / n).is_file()
        )
    )
    sources = [str(folder), f"@{manifest}"]
    job = client.submit(sources, models=MODELS, chunk_size=3)
    status = job.wait(progress=False, timeout=240)
    assert status.finished
    records = job.results()

    submitted = [r.src for r in expand_sources(sources)]
    assert len(submitted) == 3 + len(expected_errors)
    # Exactly once per image and model.
    counts = Counter((r.image, r.model) for r in records)
    assert set(counts) == {(s, m) for s in submitted for m in MODELS}
    assert set(counts.values()) == {1}
    for model in MODELS:
        c = status.models[model]
        assert c.total == len(submitted) and c.pending == 0
        assert c.failed == sum(1 for r in records if r.model == model and r.error)

    # Broken files: the documented code; good ones: top-5 equal to a direct call.
    by_key = {(r.image, r.model): r for r in records}
    for name, code in expected_errors.items():
        src = str(folder / "bad" / name)
        for model in MODELS:
            rec = by_key[(src, model)]
            if code is None:
                assert rec.error is None, (name, rec.error)
                assert len(rec.top5) == 5
            else:
                assert rec.error is not None and rec.error.code.value == code, (name, rec.error)
                assert rec.top5 == [] and rec.error.message
    good = sorted(folder.glob("*.jpg"))
    assert len(good) == 3
    for model in MODELS:
        want = expected_top5(models_dir, model, good)
        labels = CUSTOM_LABELS if model == "tcustom" else load_labels(TEST_MODELS[model][3])
        for path in good:
            rec = by_key[(str(path), model)]
            assert [p.index for p in rec.top5] == want[str(path)]
            assert [p.label for p in rec.top5] == [labels[i] for i in want[str(path)]]
            scores = [p.score for p in rec.top5]
            assert scores == sorted(scores, reverse=True)
            assert all(0.0 <= s <= 1.0 for s in scores)


def test_cli_submit_status_results(
    shared_worker: WorkerProcess, imgq_env: dict[str, str], photos: Path, tmp_path: Path
) -> None:
    proc = run_cli(
        ["submit", str(photos), "--model", "t1001", "--model", "tcustom", "--job-id", "cli-job-1"],
        imgq_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "cli-job-1"

    # The same id again is refused, and nothing is queued twice.
    again = run_cli(["submit", str(photos), "-m", "t1001", "--job-id", "cli-job-1"], imgq_env)
    assert again.returncode == 1 and "already exists" in again.stderr

    waited = run_cli(
        [
            "submit",
            str(photos / "chelsea.jpg"),
            "-m",
            "tprobs",
            "--wait",
            "--no-progress",
            "--out",
            str(tmp_path / "one.csv"),
        ],
        imgq_env,
    )
    assert waited.returncode == 0, waited.stderr
    rows = list(csv.DictReader((tmp_path / "one.csv").open()))
    assert len(rows) == 1 and rows[0]["model"] == "tprobs" and rows[0]["top1_label"]
    assert float(rows[0]["top1_score"]) >= float(rows[0]["top5_score"])

    deadline_wait = run_cli(["submit", "--help"], imgq_env)
    assert "--chunk-size" in deadline_wait.stdout

    import time

    for _ in range(300):
        st = run_cli(["status", "cli-job-1", "--json"], imgq_env)
        data = json.loads(st.stdout)
        if data["finished"]:
            break
        time.sleep(0.5)
    assert data["models"]["t1001"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    assert data["models"]["tcustom"]["done"] == 3
    text = run_cli(["status", "cli-job-1"], imgq_env).stdout
    assert "finished" in text and "tcustom" in text

    out = tmp_path / "r.jsonl"
    res = run_cli(["results", "cli-job-1", "--format", "jsonl", "--out", str(out)], imgq_env)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6
    assert set(lines[0]) == {"job_id", "image", "model", "top5", "error"}
    assert lines[0]["image"] == str(photos / "astronaut.jpg")
    assert all(r["top5"][0]["label"] in CUSTOM_LABELS for r in lines if r["model"] == "tcustom")
    res_csv = run_cli(["results", "cli-job-1", "--format", "csv"], imgq_env)
    assert len(list(csv.DictReader(res_csv.stdout.splitlines()))) == 6

    unknown = run_cli(["status", "no-such-job"], imgq_env)
    assert unknown.returncode == 1 and "unknown or has expired" in unknown.stderr
    bad_model = run_cli(["submit", str(photos), "-m", "vgg"], imgq_env)
    assert bad_model.returncode == 2 and "unknown model 'vgg'" in bad_model.stderr


def test_model_error_on_one_image_spares_the_rest(
    shared_worker: WorkerProcess, client: Any, photos: Path, tmp_path: Path
) -> None:
    from PIL import Image

    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    good = sorted(str(p) for p in photos.glob("*.jpg"))
    job = client.submit([good[0], str(white), *good[1:]], models=["tpoison"], chunk_size=8)
    job.wait(progress=False, timeout=120)
    records = {r.image: r for r in job.results()}
    assert len(records) == 4
    assert records[str(white)].error is not None
    assert records[str(white)].error.code.value == "inference_failed"
    assert all(records[g].error is None and len(records[g].top5) == 5 for g in good)
    assert "alive" if shared_worker.proc.poll() is None else pytest.fail("worker died")


def test_worker_with_unloadable_model_exits_with_a_clear_message(
    start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    models = tmp_path / "m.toml"
    models.write_text('[models.ghost]\nhandle = "/nowhere/saved"\nlabels = "imagenet1k"\n')
    w = start_worker("ghost", name="ghost", wait=False, env={"IMGQ_MODELS_FILE": str(models)})
    assert w.proc.wait(120) != 0
    out = w.output()
    assert "model 'ghost' could not be loaded from handle '/nowhere/saved'" in out
    assert "IMGQ_MODELS_FILE" in out and "TFHUB_CACHE_DIR" in out


def celery_worker(*args: str) -> list[str]:
    """``celery -A workers.app worker`` on the queue of a model no other worker serves."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        "imgq.tsolo",
        *args,
    ]


def test_celery_command_serves_the_queues_it_is_given(
    imgq_env: dict[str, str], photos: Path, client: Any, tmp_path: Path
) -> None:
    log = tmp_path / "celery.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            celery_worker("-n", "celerycmd@%h", "--loglevel", "INFO"),
            cwd=ROOT,
            env=imgq_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        job = client.submit([str(photos / "coffee.jpg")], models=["tsolo"])
        job.wait(progress=False, timeout=120)
        [rec] = job.results()
        assert rec.error is None and rec.top5[0].label in CUSTOM_LABELS
        text = log.read_text()
        assert "serving tsolo on queues imgq.tsolo" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_prefork_pool_is_refused(imgq_env: dict[str, str]) -> None:
    # "-P prefork" is Celery's default value and gives way to the configured
    # threads pool; its alias "processes" is an explicit request for fork.
    proc = subprocess.run(
        celery_worker("-P", "processes", "-n", "prefork@%h"),
        cwd=ROOT,
        env=imgq_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "TensorFlow does not survive fork" in proc.stderr + proc.stdout


def test_messages_of_the_older_inline_form_still_run(
    shared_worker: WorkerProcess, client: Any, photos: Path
) -> None:
    """A message that carries its images (what producers sent before messages named
    their chunk) is classified as before: workers can be upgraded first."""
    from shared.celery_app import CLASSIFY_TASK
    from shared.contract import ClassifyMessage
    from shared.schemas import ImageRef

    sources = sorted(str(p) for p in photos.glob("*.jpg"))
    refs = [ImageRef(src=s, ref=s) for s in sources]
    record = client.store.create("inline-form", ["t1001"], [refs], chunk_size=len(refs))
    message = ClassifyMessage(job_id=record.job_id, model="t1001", chunk=0, images=tuple(refs))
    assert len(message.to_args()) == 4
    client.app.send_task(
        CLASSIFY_TASK, args=message.to_args(), task_id=message.task_id, queue="imgq.t1001"
    )
    job = client.job(record.job_id)
    assert job.wait(progress=False, timeout=120).models["t1001"].done == len(sources)
    assert sorted(r.image for r in job.results()) == sources


def test_a_task_whose_job_record_is_gone_is_dropped(
    shared_worker: WorkerProcess, client: Any, photos: Path
) -> None:
    """A message naming a chunk of a job that was deleted (or expired) has nothing to
    classify: REVOKED, no result, the worker goes on."""
    from shared.celery_app import CLASSIFY_TASK
    from shared.contract import ClassifyMessage

    message = ClassifyMessage(job_id="gone-job", model="t1001", chunk=0, size=3)
    client.app.send_task(
        CLASSIFY_TASK, args=message.to_args(), task_id=message.task_id, queue="imgq.t1001"
    )
    result = client.app.AsyncResult(message.task_id)
    wait_for(lambda: result.state == "REVOKED", 60, "the task to be dropped")
    assert "job 'gone-job' is unknown or has expired" in shared_worker.output()
    # The worker still serves: a real job runs after it.
    job = client.submit(sorted(str(p) for p in photos.glob("*.jpg")), models=["t1001"])
    assert job.wait(progress=False, timeout=120).finished


def test_readme_python_api_example_runs_as_written(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    models_dir: Path,
    photos: Path,
    tmp_path: Path,
) -> None:
    import shutil

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    # "resnet50" served by a small test model, on a worker of this test's own.
    env = {
        **imgq_env,
        "IMGQ_MODELS_FILE": str(renamed_model_file(models_dir, tmp_path, "resnet50")),
    }
    start_worker("resnet50", name="readme", env=env)
    shutil.copytree(photos, tmp_path / "photos")
    (tmp_path / "urgent").mkdir()
    shutil.copy(sorted(photos.glob("*.jpg"))[0], tmp_path / "urgent")
    proc = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    printed = proc.stdout.splitlines()
    for photo in photos.glob("*.jpg"):
        assert any(line.startswith(f"./photos/{photo.name} ") for line in printed), proc.stdout
    assert any(" urgent " in line for line in printed), proc.stdout

"""``imgq report`` on a real job: a worker classified real photos with two test
models (ImageNet-1k with background, ImageNet-21k); the HTML holds every image and
model with the job's own top-5 in order, the PNGs exist, and a real browser renders
the page without console errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.browser import Browser
from tests.conftest import ARTIFACTS, WorkerProcess, run_cli
from tests.test_report import JS_STATE, report_data

pytestmark = pytest.mark.slow


def test_report_of_a_real_job(
    shared_worker: WorkerProcess,
    client: Any,
    imgq_env: dict[str, str],
    photos: Path,
    tmp_path: Path,
    browser: Browser,
) -> None:
    sources = [*sorted(str(p) for p in photos.glob("*.jpg")), str(photos / "missing.jpg")]
    job = client.submit(sources, models=["t1001", "t21k"], chunk_size=2)
    job.wait(progress=False, timeout=120)
    records = job.results()

    html = tmp_path / "report.html"
    pngs = tmp_path / "png"
    proc = run_cli(["report", job.job_id, "--out", str(html), "--png-dir", str(pngs)], imgq_env)
    assert proc.returncode == 0, proc.stderr
    assert "4 images" in proc.stderr and "MB" in proc.stderr

    data = report_data(html.read_text(encoding="utf-8"))
    assert [m["name"] for m in data["models"]] == ["t1001", "t21k"]
    assert [m["caption"] for m in data["models"]] == [
        "softmax probability",
        "sigmoid, multi-label",
    ]
    rows = {row[0]: row for row in data["images"]}
    assert list(rows) == sources
    for record in records:
        result = rows[record.image][2][["t1001", "t21k"].index(record.model)]
        if record.error:
            assert result["c"] == record.error.code.value == "not_found"
        else:
            assert [data["labels"][p[0]] for p in result] == [p.label for p in record.top5]
            assert [p[1] for p in result] == [p.index for p in record.top5]
    files = sorted(pngs.glob("*.png"))
    assert len(files) == 4
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.width > 600

    browser.navigate(html.as_uri())
    state = browser.eval(JS_STATE)
    assert state["names"] == sources
    assert state["errors"] == ["not_found", "not_found"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / "report-job.png")
    assert browser.console == []

    none = run_cli(["report", job.job_id], imgq_env)
    assert none.returncode == 2 and "--out" in none.stderr

    # Without the `report` extra (Jinja2 hidden from the interpreter): one line, exit 1.
    blocker = tmp_path / "no_jinja"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['jinja2'] = None\n")
    env = {**imgq_env, "PYTHONPATH": f"{blocker}:{imgq_env.get('PYTHONPATH', '')}"}
    missing = run_cli(["report", job.job_id, "--out", str(tmp_path / "x.html")], env)
    assert missing.returncode == 1, missing.stderr
    assert "imgq[report]" in missing.stderr and "Traceback" not in missing.stderr

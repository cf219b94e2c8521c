"""Precision, runtime and decoding through a real worker process: the switches in the
models file and the environment, the start-up lines, and the answers."""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from shared.settings import Settings
from tests.conftest import WorkerProcess
from tests.savedmodels import build_classifier, direct_scores
from workers.hardware import detect
from workers.inputs import ReadLimits, load_image
from workers.runtimes.base import to_unit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models file with one OpenVINO-convertible model in two modes."""
    base = tmp_path_factory.mktemp("fast-models")
    build_classifier(base / "m", 1001, resize="bilinear", seed=9)
    common = 'handle = "m"\ninput_size = 32\nlabels = "imagenet1k-background"\n'
    (base / "models.toml").write_text(
        f'[models.tfast]\n{common}runtime = "openvino"\nprecision = "auto"\ndecode = "exact"\n\n'
        f"[models.tplain]\n{common}"
    )
    return base


@pytest.mark.skipif(find_spec("openvino") is None, reason="the openvino extra is not installed")
def test_openvino_auto_precision_exact_decode_worker(
    start_worker: Callable[..., WorkerProcess],
    redis_url: str,
    fast_models: Path,
    photos: Path,
    tmp_path: Path,
) -> None:
    from producer.api import Client

    env = {
        "IMGQ_MODELS_FILE": str(fast_models / "models.toml"),
        "IMGQ_OPENVINO_CACHE_DIR": str(tmp_path / "ov"),
    }
    worker = start_worker("tfast", "tplain", name="fastpaths", env=env)
    client = Client(Settings(broker_url=redis_url, models_file=fast_models / "models.toml"))
    paths = sorted(photos.iterdir())
    job = client.submit([str(p) for p in paths], models=["tfast", "tplain"], chunk_size=2)
    assert job.wait(progress=False, timeout=180).finished
    records = {(r.model, r.image): r for r in job.results()}
    assert len(records) == 2 * len(paths)

    log = worker.output()
    expected = "bf16 (asked: auto)" if detect().bf16 else "fp32 (asked: auto)"
    assert "devices: CPU " in log and "no GPU" in log
    assert "model tfast ready:" in log and "runtime openvino" in log
    assert f"precision {expected}, decode exact" in log
    assert "precision fp32, decode fast" in log  # tplain: the worker's defaults

    limits = ReadLimits.from_settings(Settings())
    for mode, exact in (("tfast", True), ("tplain", False)):
        batch = to_unit(
            np.stack([load_image(str(p), (32, 32), limits, exact=exact) for p in paths])
        )
        ref = direct_scores(fast_models / "m", batch, "softmax")
        for p, scores in zip(paths, ref, strict=True):
            top5 = records[(mode, str(p))].top5
            assert top5[0].index == int(np.argmax(scores))
            tolerance = 0.05 if mode == "tfast" else 1e-4
            assert abs(top5[0].score - scores.max()) <= tolerance


def test_a_precision_the_device_cannot_run_stops_the_worker(
    start_worker: Callable[..., WorkerProcess], fast_models: Path
) -> None:
    hardware = detect()
    precision = "fp16" if not hardware.gpus else "bf16"
    worker = start_worker(
        "tplain",
        name="refused",
        wait=False,
        env={"IMGQ_MODELS_FILE": str(fast_models / "models.toml"), "IMGQ_PRECISION": precision},
    )
    assert worker.proc.wait(120) != 0
    out = worker.output()
    assert "model 'tplain': precision fp16 is for GPUs and this worker has no GPU" in out

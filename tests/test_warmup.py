"""Warm-up in-process: after it, a first batch of any size traces no graph (the cost
that made first batches slow)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from shared.registry import load_registry
from workers.classifier import Classifier

SIZES = (1, 3, 5, 12, 16)  # batches of buckets 1, 4, 8, 12 and 16


def traces(clf: Classifier) -> dict[int, int]:
    """Per fixed batch size: how many times its graph has been traced."""
    assert clf.backend is not None
    compiled = clf.backend._compiled  # type: ignore[attr-defined]
    return {size: fn.experimental_get_tracing_count() for size, fn in compiled.items()}


def predict_every_size(clf: Classifier) -> None:
    for n in SIZES:
        clf.predict(np.random.default_rng(n).integers(0, 256, (n, 192, 192, 3), dtype=np.uint8))


def loaded(models_dir: Path) -> Classifier:
    spec = dataclasses.replace(
        load_registry(models_dir / "models.toml")["t1001"], input_size=(192, 192)
    )
    return Classifier(spec, max_batch_size=16).load()


def test_first_batch_of_every_size_is_warm(models_dir: Path) -> None:
    # Counted, not timed: a first batch is slow because its graph is traced then, so
    # after warm-up no batch of any size traces anything.
    clf = loaded(models_dir)
    assert clf.warm_up() > 0
    every_bucket = dict.fromkeys(clf.buckets, 1)  # 1, 2, 4, 8, 12, 16
    assert traces(clf) == every_bucket
    predict_every_size(clf)
    assert traces(clf) == every_bucket


def test_without_warm_up_the_first_batch_pays_for_tracing(models_dir: Path) -> None:
    # The same count without warm-up: each size is traced by its first batch, so the
    # check above can fail.
    clf = loaded(models_dir)
    assert traces(clf) == {16: 1}  # loading checks the output width on the largest
    predict_every_size(clf)
    assert traces(clf) == {1: 1, 4: 1, 8: 1, 12: 1, 16: 1}


def test_warm_up_prints_no_retracing_warnings(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = load_registry(models_dir / "models.toml")["t1001"]
    clf = Classifier(spec, max_batch_size=64).load()  # 12 batch sizes, 12 traces
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        clf.warm_up()
    assert [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()] == []
    assert logging.getLogger("tensorflow").filters == []  # only while warming up


def test_a_worker_on_a_host_without_gpu_keeps_tensorflows_cuinit_error_quiet() -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this host has an NVIDIA GPU")
    code = "import os, workers.app; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for env, expected in ((base, "3"), ({**base, "TF_CPP_MIN_LOG_LEVEL": "1"}, "1")):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr


def test_warm_up_of_the_largest_size_only(models_dir: Path) -> None:
    """IMGQ_WARM_UP_SIZES=largest: bulk work's batch size only; the others wait for a
    partial batch."""
    clf = loaded(models_dir)
    assert clf.backend is not None
    clf.warm_up(largest_only=True)
    assert sorted(clf.backend._compiled) == [16]  # type: ignore[attr-defined]
    clf.predict(np.zeros((3, 192, 192, 3), np.uint8))  # traced now, on first use
    assert sorted(clf.backend._compiled) == [4, 16]  # type: ignore[attr-defined]

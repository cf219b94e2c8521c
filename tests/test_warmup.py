"""Warm-up in-process: after it, a first batch of each size costs what a later one does."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from shared.registry import load_registry
from workers.classifier import Classifier

SIZES = (1, 3, 5, 12, 16)  # buckets 1, 4, 8, 12, 16


def call_seconds(clf: Classifier, size: int, seed: int) -> float:
    """Seconds of one predict call on ``size`` fresh images."""
    images = np.random.default_rng(seed).integers(0, 256, (size, 192, 192, 3), dtype=np.uint8)
    start = time.perf_counter()
    clf.predict(images)
    return time.perf_counter() - start


def first_over_later(clf: Classifier) -> list[float]:
    """Per size: its first call's time over a later call's, both taken in the same
    order of sizes (so that switching shapes costs both alike)."""
    first = [call_seconds(clf, n, seed=n) for n in SIZES]
    later = [call_seconds(clf, n, seed=100 + n) for n in SIZES]
    return [f / s for f, s in zip(first, later, strict=True)]


def loaded(models_dir: Path) -> Classifier:
    # 192x192 inputs: calls long enough (milliseconds) to time.
    spec = dataclasses.replace(
        load_registry(models_dir / "models.toml")["t1001"], input_size=(192, 192)
    )
    return Classifier(spec, max_batch_size=16).load()


def test_first_batch_of_every_size_is_warm(models_dir: Path) -> None:
    clf = loaded(models_dir)
    assert clf.warm_up() > 0
    ratios = first_over_later(clf)
    # The median over the sizes, so that one scheduling hiccup does not decide.
    assert statistics.median(ratios) <= 1.5, ratios


def test_without_warm_up_the_first_batch_pays_for_tracing(models_dir: Path) -> None:
    # The same measurement fails without warm-up: the check above can fail.
    ratios = first_over_later(loaded(models_dir))
    assert statistics.median(ratios) > 1.5, ratios


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

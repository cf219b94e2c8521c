"""Warm-up in-process: after it, a first batch of each size costs what a later one does."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from shared.registry import load_registry
from workers.classifier import Classifier

SIZES = (1, 3, 5, 12, 16)  # buckets 1, 4, 8, 12, 16


def call_seconds(clf: Classifier, size: int, seed: int) -> float:
    """Seconds of one predict call on ``size`` fresh images."""
    images = np.random.default_rng(seed).random((size, 192, 192, 3), dtype=np.float32)
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

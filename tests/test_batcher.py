"""Dynamic batching across callers: batches form, results stay per image, one bad
input spares the rest."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from shared.registry import load_registry
from workers.batcher import DynamicBatcher, TopK
from workers.classifier import Classifier


@pytest.fixture(scope="module")
def classifier(models_dir: Path) -> Classifier:
    spec = load_registry(models_dir / "models.toml")["t1001"]
    return Classifier(spec, max_batch_size=8).load()


@pytest.fixture(scope="module")
def poison(models_dir: Path) -> Classifier:
    spec = load_registry(models_dir / "models.toml")["tpoison"]
    return Classifier(spec, max_batch_size=8).load()


def images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 230, (n, 32, 32, 3), dtype=np.uint8)


def test_single_image_callers_are_batched(classifier: Classifier) -> None:
    batcher = DynamicBatcher(classifier, max_delay=0.05)
    data = images(24)
    results: dict[int, TopK | Exception] = {}

    def call(i: int) -> None:
        results[i] = batcher.predict([data[i]])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    assert batcher.images == 24
    assert batcher.batches < 24 / 2  # gathered, not one call per image
    direct = classifier.predict(data[:8])
    for i in range(8):
        got = results[i]
        assert isinstance(got, TopK)
        assert list(got.indices) == list(direct.indices[i])
        np.testing.assert_allclose(got.scores, direct.scores[i], rtol=1e-5)


def test_a_full_batch_does_not_wait_for_the_delay(classifier: Classifier) -> None:
    batcher = DynamicBatcher(classifier, max_delay=5.0)
    start = time.monotonic()
    out = batcher.predict(list(images(8)))
    assert time.monotonic() - start < 4.0
    assert all(isinstance(o, TopK) for o in out)
    assert batcher.batches == 1
    batcher.close()


def test_a_lone_image_waits_at_most_the_delay(classifier: Classifier) -> None:
    batcher = DynamicBatcher(classifier, max_delay=0.2)
    batcher.predict(list(images(1)))  # warm the bucket of 1
    start = time.monotonic()
    [out] = batcher.predict(list(images(1, seed=9)))
    elapsed = time.monotonic() - start
    assert isinstance(out, TopK)
    assert 0.2 <= elapsed < 2.0
    batcher.close()


def test_one_bad_image_spares_the_batch(poison: Classifier) -> None:
    batcher = DynamicBatcher(poison, max_delay=0.01)
    data = list(images(6))
    data[2] = np.full((32, 32, 3), 255, np.uint8)  # the model fails on an all-white image
    out = batcher.predict(data)
    assert [isinstance(o, TopK) for o in out] == [True, True, False, True, True, True]
    assert "poison" in str(out[2])
    batcher.close()


def test_closed_batcher_refuses_work(classifier: Classifier) -> None:
    batcher = DynamicBatcher(classifier)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(list(images(1)))


class SlowModel:
    """The classifier, each model call made ``seconds`` longer: a model busy long
    enough for images to come in one by one while it runs."""

    def __init__(self, inner: Classifier, seconds: float) -> None:
        self._inner = inner
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, staged: Any) -> Any:
        time.sleep(self.seconds)
        return self._inner.run(staged)


def test_images_that_come_one_by_one_fill_the_batch_while_the_model_is_busy(
    classifier: Classifier,
) -> None:
    # One image every 30 ms, a delay of 20 ms, a model call of 300 ms: the batch after
    # the first keeps filling for as long as the model is busy, so batches are full
    # (8) rather than the one or two images that came within the delay.
    batcher = DynamicBatcher(cast(Classifier, SlowModel(classifier, 0.3)), max_delay=0.02)
    data = images(25)
    futures = []
    for i in range(25):
        futures.extend(batcher.submit([data[i]]))
        time.sleep(0.03)
    for future in futures:
        assert isinstance(future.result(timeout=30), TopK)
    batcher.close()
    assert batcher.images == 25
    assert batcher.sizes[8] >= 2, batcher.sizes
    assert batcher.batches <= 5, batcher.sizes
    assert batcher.sizes[1] <= 2, batcher.sizes  # the first, perhaps the last

"""Heads of your own labels in a real Redis: versions numbered once, immutable, resolved
and deleted by name or by version; a job's route to its base model's queue; the head
applied to vectors."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from shared.heads import HeadCache, HeadError, HeadStore, parse_ref, softmax
from shared.jobs import JobStore
from shared.schemas import ImageRef


@pytest.fixture
def heads(redis_url: str) -> HeadStore:
    return HeadStore(redis.Redis.from_url(redis_url))


def name() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def save(store: HeadStore, head: str, dim: int = 4, labels: int = 3, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    info = store.save(
        head,
        base="temb",
        base_handle="/models/temb",
        labels=[f"label é {i}" for i in range(labels)],
        weights=rng.normal(size=(dim, labels)),
        bias=rng.normal(size=labels),
        n_train=10,
        metrics={"accuracy": 0.9},
    )
    return info.ref


def test_versions_count_up_and_are_never_given_again(heads: HeadStore) -> None:
    n = name()
    assert [save(heads, n, seed=s) for s in range(3)] == [f"{n}@1", f"{n}@2", f"{n}@3"]
    assert heads.resolve(n) == f"{n}@3"
    assert heads.delete(f"{n}@3") == [f"{n}@3"]
    assert heads.resolve(n) == f"{n}@2"
    assert save(heads, n) == f"{n}@4"  # 3 is not given again
    with pytest.raises(HeadError, match=f"has no version 3: it has {n}@1, {n}@2, {n}@4"):
        heads.get(f"{n}@3")
    assert heads.delete(n) == [f"{n}@1", f"{n}@2", f"{n}@4"]
    assert n not in {i.name for i in heads.all_versions()}
    with pytest.raises(HeadError, match="no model named"):
        heads.resolve(n)


def test_a_version_reads_back_as_saved(heads: HeadStore) -> None:
    n = name()
    first = heads.get(save(heads, n, seed=1))
    save(heads, n, seed=2)
    again = heads.get(f"{n}@1")
    assert np.array_equal(again.weights, first.weights)
    assert np.array_equal(again.bias, first.bias)
    assert again.labels == ("label é 0", "label é 1", "label é 2")
    assert again.info.metrics == {"accuracy": 0.9} and again.info.base == "temb"
    vectors = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    expected = softmax(vectors @ first.weights + first.bias)
    assert np.allclose(again.probabilities(vectors), expected, atol=1e-6)
    assert np.allclose(again.probabilities(vectors).sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(HeadError, match="takes 4-d vectors"):
        again.probabilities(np.zeros((1, 5), np.float32))
    cache = HeadCache(heads)
    assert cache.get(f"{n}@1") is cache.get(f"{n}@1")


@pytest.mark.parametrize("bad", ["", "a b", "a.b", "x@0", "x@-1", "@1", "x" * 65, "é"])
def test_bad_names_and_references_are_refused(heads: HeadStore, bad: str) -> None:
    with pytest.raises(HeadError):
        parse_ref(bad)


def test_mismatched_weights_are_refused(heads: HeadStore) -> None:
    with pytest.raises(HeadError, match="weights are"):
        heads.save(
            name(),
            base="temb",
            base_handle="",
            labels=["a", "b"],
            weights=np.zeros((4, 3)),
            bias=np.zeros(3),
            n_train=0,
            metrics={},
        )


def test_a_job_routes_a_head_to_its_base_models_queue(redis_url: str) -> None:
    store = JobStore(redis.Redis.from_url(redis_url), ttl=3600)
    job = f"j{uuid.uuid4().hex[:10]}"
    store.create(
        job,
        ["resnet50", "dogs@2"],
        [[ImageRef(src="a.jpg", ref="/a.jpg")]],
        chunk_size=4,
        routes={"dogs@2": "resnet50_features"},
    )
    record = store.get(job)
    assert record.routes == {"dogs@2": "resnet50_features"}
    assert record.queue_of("dogs@2") == "imgq.resnet50_features"
    assert record.queue_of("resnet50") == "imgq.resnet50"
    store.delete(job)

"""Your own labels: classifier heads trained on an embedding model's vectors, kept in
Redis (the job store) where every worker and producer reads them, with no shared
volume.

A head is a linear layer over a base embedding model's pooled vector:
``probabilities = softmax(vector @ weights + bias)`` over its own labels
(``producer.training`` fits it). Heads are **versioned and immutable**: training
``dogs`` again saves ``dogs@2`` beside ``dogs@1``; ``dogs`` means the latest. A
version number is never reused, not even after ``imgq models delete dogs@2``, so a
name with its version always means the same weights.

Jobs name a head by its pinned reference (``dogs@2``): the producer resolves
``dogs`` once, at submit, so a job keeps one version while another is trained. Its
tasks go to the base model's queue (``shared.jobs.JobRecord.routes``), where the
workers that hold the base apply every head a batch asks for to one backbone pass
(``workers.runtime``).

Keys (the job store's Redis, ``shared.keys``): ``imgq:heads`` (a set of names),
``imgq:head:<name>:meta`` (version -> JSON), ``imgq:head:<name>:weights`` (version
-> ``.npz`` bytes) and ``imgq:head:<name>:seq`` (the last version number given).
They have no TTL: a head lives until it is deleted, so the job store's Redis must
keep its data (``docs/operations.md``).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from shared import keys

if TYPE_CHECKING:  # NumPy is imported where weights are used: not at every `imgq` start
    import numpy as np

HEAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})(?:@(?P<version>[1-9][0-9]*))?$")


class HeadError(ValueError):
    """A head that does not exist, or a bad name or reference; one line for the user."""


class HeadNameError(HeadError):
    """A string that cannot name a head or one of its versions (a usage error)."""


def check_head_name(name: str) -> str:
    """``name`` when it can name a head (1-64 letters, digits, '-' or '_'), else HeadError."""
    if not HEAD_NAME_RE.match(name):
        raise HeadNameError(
            f"model name {name!r}: 1-64 letters, digits, '-' or '_', starting with a letter "
            "or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """(name, version) of ``NAME`` (version None: the latest) or ``NAME@V``; HeadError."""
    match = _REF_RE.match(ref)
    if match is None:
        raise HeadNameError(f"{ref!r} is not a model name or NAME@VERSION")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


def is_head_ref(model: str) -> bool:
    """True for a pinned head reference (``NAME@V``), the form jobs and tasks carry."""
    return "@" in model


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class HeadInfo:
    """What is known of one version without its weights (``imgq models``)."""

    name: str
    version: int
    base: str  # the embedding model it was trained on
    base_handle: str
    labels: tuple[str, ...]
    dim: int
    n_train: int
    metrics: dict[str, Any]
    created: float

    @property
    def ref(self) -> str:
        """``NAME@V``."""
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``imgq models --json``)."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "base": self.base,
            "base_handle": self.base_handle,
            "labels": list(self.labels),
            "dim": self.dim,
            "n_train": self.n_train,
            "metrics": self.metrics,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, name: str, version: int, raw: bytes | str) -> HeadInfo:
        data = json.loads(raw)
        return cls(
            name=name,
            version=version,
            base=str(data["base"]),
            base_handle=str(data.get("base_handle", "")),
            labels=tuple(data["labels"]),
            dim=int(data["dim"]),
            n_train=int(data.get("n_train", 0)),
            metrics=dict(data.get("metrics", {})),
            created=float(data.get("created", 0.0)),
        )


@dataclass(frozen=True)
class Head:
    """One version with its weights: ``weights`` (dim x labels) and ``bias`` (labels)."""

    info: HeadInfo
    weights: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)

    @property
    def ref(self) -> str:
        """``NAME@V``."""
        return self.info.ref

    @property
    def labels(self) -> tuple[str, ...]:
        """The head's labels, in the order of its outputs."""
        return self.info.labels

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """softmax(vectors @ weights + bias): (n, labels) float32 for (n, dim) vectors."""
        import numpy as np

        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.info.dim:
            raise HeadError(
                f"model {self.ref} takes {self.info.dim}-d vectors of {self.info.base}, "
                f"not {x.shape[-1]}-d ones"
            )
        return softmax(x @ self.weights + self.bias)


def _pack(weights: np.ndarray, bias: np.ndarray) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, weights=weights.astype(np.float32), bias=bias.astype(np.float32))
    return buf.getvalue()


def _unpack(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        return data["weights"].astype(np.float32), data["bias"].astype(np.float32)


class HeadStore:
    """Heads in the job store's Redis: save a new version, read, list, delete."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def save(
        self,
        name: str,
        *,
        base: str,
        base_handle: str,
        labels: Sequence[str],
        weights: np.ndarray,
        bias: np.ndarray,
        n_train: int,
        metrics: dict[str, Any],
    ) -> HeadInfo:
        """Save the next version of ``name`` (1 for a new name); its info."""
        import numpy as np

        check_head_name(name)
        w = np.asarray(weights, dtype=np.float32)
        b = np.asarray(bias, dtype=np.float32)
        if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[1] != len(labels):
            raise HeadError(
                f"a head's weights are (dim, labels) and its bias (labels,): got {w.shape}, "
                f"{b.shape} for {len(labels)} labels"
            )
        version = int(self.client.incr(keys.head_seq(name)))
        info = HeadInfo(
            name=name,
            version=version,
            base=base,
            base_handle=base_handle,
            labels=tuple(labels),
            dim=int(w.shape[0]),
            n_train=n_train,
            metrics=metrics,
            created=time.time(),
        )
        meta = {k: v for k, v in info.as_dict().items() if k not in ("name", "version", "ref")}
        pipe = self.client.pipeline(transaction=True)
        # The weights first, in the same transaction: a version listed always has them.
        pipe.hset(keys.head_weights(name), str(version), _pack(w, b))
        pipe.hset(keys.head_meta(name), str(version), json.dumps(meta))
        pipe.sadd(keys.HEADS, name)
        pipe.execute()
        return info

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` that exist, oldest first."""
        raw: list[bytes] = self.client.hkeys(keys.head_meta(name))  # type: ignore[assignment]
        return sorted(int(v) for v in raw)

    def resolve(self, ref: str) -> str:
        """``NAME@V`` for ``NAME`` (the latest version) or ``NAME@V`` (checked to exist);
        HeadError when there is none."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise HeadError(f"no model named {name!r} (imgq models lists them)")
        if version is None:
            return f"{name}@{versions[-1]}"
        if version not in versions:
            raise HeadError(
                f"model {name!r} has no version {version}: it has "
                + ", ".join(f"{name}@{v}" for v in versions)
            )
        return f"{name}@{version}"

    def info(self, ref: str) -> HeadInfo:
        """One version's info (``NAME`` is the latest); HeadError when there is none."""
        name, version = parse_ref(self.resolve(ref))
        assert version is not None
        raw = self.client.hget(keys.head_meta(name), str(version))
        if raw is None:  # deleted in between
            raise HeadError(f"no model {name}@{version}")
        return HeadInfo.from_json(name, version, raw)

    def get(self, ref: str) -> Head:
        """One version with its weights; HeadError when there is none."""
        info = self.info(ref)
        raw = self.client.hget(keys.head_weights(info.name), str(info.version))
        if raw is None:
            raise HeadError(f"no model {info.ref}")
        weights, bias = _unpack(raw.encode() if isinstance(raw, str) else raw)
        return Head(info=info, weights=weights, bias=bias)

    def all_versions(self) -> list[HeadInfo]:
        """Every version of every head, by name then version."""
        names = sorted(n.decode() for n in self.client.smembers(keys.HEADS))  # type: ignore[union-attr]
        out: list[HeadInfo] = []
        for name in names:
            raw: dict[bytes, bytes] = self.client.hgetall(keys.head_meta(name))  # type: ignore[assignment]
            for version in sorted(int(v) for v in raw):
                out.append(HeadInfo.from_json(name, version, raw[str(version).encode()]))
        return out

    def delete(self, ref: str) -> list[str]:
        """Delete ``NAME@V``, or every version of ``NAME``; the references deleted.
        HeadError when there is none. Version numbers are not given again."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise HeadError(f"no model named {name!r} (imgq models lists them)")
        doomed = versions if version is None else [version]
        if version is not None and version not in versions:
            self.resolve(ref)  # raises, naming the versions there are
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(keys.head_meta(name), *map(str, doomed))
        pipe.hdel(keys.head_weights(name), *map(str, doomed))
        pipe.execute()
        if not self.versions(name):
            self.client.srem(keys.HEADS, name)
        return [f"{name}@{v}" for v in doomed]


class HeadCache:
    """A process's heads by pinned reference: read from Redis once (they are immutable)."""

    def __init__(self, store: HeadStore) -> None:
        self.store = store
        self._heads: dict[str, Head] = {}
        self._lock = threading.Lock()

    def get(self, ref: str) -> Head:
        """The head ``NAME@V``; HeadError when it does not exist."""
        with self._lock:
            head = self._heads.get(ref)
        if head is not None:
            return head
        head = self.store.get(ref)
        with self._lock:
            self._heads[ref] = head
        return head

"""``imgq train``'s orchestration: a training set's vectors computed by the fleet, a
head fitted on them, and the head saved as the next version of its name.

The vectors come from an ordinary embedding job on the base model's queue, so a large
training set uses every worker of the base, and the result cache (PostgreSQL store)
makes training again on the same images free. The fit itself is
``producer.training``; the versions, ``shared.heads``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.api import Client
from producer.training import (
    FitResult,
    TrainingError,
    TrainingUsageError,
    check_labels,
    fit_head,
    read_training_set,
)
from shared.heads import HeadError, HeadInfo, check_head_name
from shared.registry import RegistryError, get_model


@dataclass(frozen=True)
class LeftOut:
    """A training image that could not be used, and why."""

    image: str
    label: str
    code: str
    message: str


@dataclass
class TrainOutcome:
    """What ``imgq train`` saved and measured."""

    info: HeadInfo
    fit: FitResult
    job_id: str
    left_out: list[LeftOut] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``imgq train --json``)."""
        return {
            "model": self.info.ref,
            "name": self.info.name,
            "version": self.info.version,
            "base": self.info.base,
            "labels": list(self.info.labels),
            "n_images": self.info.n_train,
            "metrics": self.fit.metrics,
            "embedding_job": self.job_id,
            "left_out": [vars(x) for x in self.left_out],
        }


def _check_names(client: Client, name: str, base: str) -> str:
    """The base model's handle, after checking ``name`` and ``base``; TrainingError."""
    try:
        check_head_name(name)
    except HeadError as exc:
        raise TrainingUsageError(f"--name: {exc}") from None
    registry = client.registry()
    if name in registry:
        raise TrainingUsageError(
            f"--name {name!r} is a model of the registry already: choose another name"
        )
    try:
        spec = get_model(registry, base)
    except RegistryError as exc:
        raise TrainingUsageError(f"--base: {exc}") from None
    if not spec.is_embedding:
        embedding = sorted(n for n, s in registry.items() if s.is_embedding)
        raise TrainingUsageError(
            f"--base {base!r} is a classifier: a head is trained on an embedding model's "
            f"vectors ({', '.join(embedding) or 'none is registered'})"
        )
    return spec.handle


def train_model(
    client: Client,
    data: str,
    *,
    base: str,
    name: str,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    timeout: float | None = None,
    on_job: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Train the next version of ``name`` on the images of ``data`` (a folder of label
    folders, or a CSV/JSONL manifest) with ``base``'s vectors; the saved version and
    its metrics. TrainingError (nothing saved) for a training set that cannot make a
    model: one label, a label with fewer than 2 usable images, no image readable.

    ``on_job`` is told the embedding job's id once it is submitted. The embedding job
    is deleted once the head is saved (its vectors stay in the result cache)."""
    handle = _check_names(client, name, base)
    training = read_training_set(data)
    label_of: dict[str, str] = {}
    for ref, label in zip(training.refs, training.labels, strict=True):
        known = label_of.setdefault(ref.src, label)
        if known != label:
            raise TrainingError(f"{ref.src} is labelled both {known!r} and {label!r}")
    refs = list({r.src: r for r in training.refs}.values())
    check_labels([label_of[r.src] for r in refs])
    job = client.submit(refs, models=[base], name=f"imgq train {name}")
    if on_job is not None:
        on_job(job.job_id)
    job.wait(progress=progress, timeout=timeout)
    left_out = [
        LeftOut(r.image, label_of.get(r.image, ""), r.error.code.value, r.error.message)
        for r in job.iter_results()
        if r.error is not None
    ]
    vectors, names = job.embeddings(base)
    if not names:
        first = f": {left_out[0].image}: {left_out[0].message}" if left_out else ""
        raise TrainingError(
            f"none of the {len(refs)} training images could be read{first}; no model saved"
        )
    labels = [label_of[n] for n in names]
    try:
        check_labels(labels)
    except TrainingError as exc:
        raise TrainingError(
            f"after leaving out {len(left_out)} unreadable image(s): {exc}"
        ) from None
    fit = fit_head(vectors, labels, val_fraction=val_fraction, seed=seed)
    info = client.heads.save(
        name,
        base=base,
        base_handle=handle,
        labels=fit.classes,
        weights=fit.weights,
        bias=fit.bias,
        n_train=len(labels),
        metrics=fit.metrics,
    )
    client.delete(job.job_id)
    return TrainOutcome(info=info, fit=fit, job_id=job.job_id, left_out=left_out)

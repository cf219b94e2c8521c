"""The model registry: plain data records, built-ins plus a user's TOML file.

Code never branches on a model's name; everything a worker needs to know about a
model (where to load it, its input size, its activation, its labels) is here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared.labels import BUILTIN_LABEL_SETS

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
QUEUE_PREFIX = "imgq."


class Activation(StrEnum):
    """How a model's raw outputs become scores."""

    SOFTMAX = "softmax"  # single-label logits (ImageNet-1k classifiers)
    SIGMOID = "sigmoid"  # multi-label logits (BiT-M ImageNet-21k, per its model card)
    NONE = "none"  # the model already outputs probabilities


class RegistryError(ValueError):
    """The registry or a user's models file is invalid."""


@dataclass(frozen=True)
class ModelSpec:
    """One model: a TF Hub handle or SavedModel path, its input size, activation and labels."""

    name: str
    handle: str
    input_size: tuple[int, int]  # (height, width)
    activation: Activation
    labels: str  # a built-in label set name, or a path to a text file
    labels_base_dir: Path | None = None  # resolves a relative labels path (the TOML's folder)
    description: str = ""
    batch_size: int | None = None  # overrides IMGQ_BATCH_SIZE for this model
    max_batch_delay_ms: float | None = None  # overrides IMGQ_MAX_BATCH_DELAY_MS

    @property
    def queue(self) -> str:
        """The Celery queue that carries this model's tasks."""
        return queue_for(self.name)


def queue_for(model: str) -> str:
    """The queue name of a model."""
    return f"{QUEUE_PREFIX}{model}"


def model_from_queue(queue: str) -> str | None:
    """The model served by a queue, or None when the queue is not a model queue."""
    if queue.startswith(QUEUE_PREFIX) and len(queue) > len(QUEUE_PREFIX):
        return queue[len(QUEUE_PREFIX) :]
    return None


BUILTIN_MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(
        name="resnet50",
        handle="https://tfhub.dev/tensorflow/resnet_50/classification/1",
        input_size=(224, 224),
        activation=Activation.SOFTMAX,
        labels="imagenet1k-background",
        description="ResNet-50 v1.5, ImageNet-1k; 1001 logits, index 0 is 'background'.",
    ),
    "bit_m_r152x4": ModelSpec(
        name="bit_m_r152x4",
        handle="https://tfhub.dev/google/bit/m-r152x4/imagenet21k_classification/1",
        input_size=(224, 224),
        activation=Activation.SIGMOID,
        labels="imagenet21k",
        description="BiT-M R152x4, ImageNet-21k; 21,843 multi-label logits (sigmoid).",
    ),
}


def _parse_size(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        size = (value, value)
    elif (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        size = (value[0], value[1])
    else:
        raise RegistryError(
            f"model {name!r}: input_size must be an integer or [height, width], got {value!r}"
        )
    if not all(8 <= v <= 4096 for v in size):
        raise RegistryError(f"model {name!r}: input_size {size} out of range 8..4096")
    return size


def _parse_model(
    name: str, table: Mapping[str, Any], base: ModelSpec | None, base_dir: Path
) -> ModelSpec:
    if not MODEL_NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r} must be lower-case letters, digits and underscores"
        )
    known = {
        "handle",
        "input_size",
        "activation",
        "labels",
        "description",
        "batch_size",
        "max_batch_delay_ms",
    }
    unknown = set(table) - known
    if unknown:
        raise RegistryError(
            f"model {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}"
        )
    if base is None:
        missing = {"handle", "labels"} - set(table)
        if missing:
            raise RegistryError(f"model {name!r}: missing required keys {sorted(missing)}")
    spec = base or ModelSpec(
        name=name,
        handle="",
        input_size=(224, 224),
        activation=Activation.SOFTMAX,
        labels="",
    )
    changes: dict[str, Any] = {}
    if "handle" in table:
        handle = table["handle"]
        if not isinstance(handle, str) or not handle:
            raise RegistryError(f"model {name!r}: handle must be a non-empty string")
        if "://" not in handle and not Path(handle).is_absolute():
            handle = str((base_dir / handle).resolve())
        changes["handle"] = handle
    if "input_size" in table:
        changes["input_size"] = _parse_size(name, table["input_size"])
    if "activation" in table:
        try:
            changes["activation"] = Activation(table["activation"])
        except ValueError:
            raise RegistryError(
                f"model {name!r}: activation must be one of "
                f"{[a.value for a in Activation]}, got {table['activation']!r}"
            ) from None
    if "labels" in table:
        labels = table["labels"]
        if not isinstance(labels, str) or not labels:
            raise RegistryError(f"model {name!r}: labels must be a label set name or a path")
        changes["labels"] = labels
        changes["labels_base_dir"] = None if labels in BUILTIN_LABEL_SETS else base_dir
    if "description" in table:
        changes["description"] = str(table["description"])
    if "batch_size" in table:
        size = table["batch_size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
            raise RegistryError(f"model {name!r}: batch_size must be an integer in 1..4096")
        changes["batch_size"] = size
    if "max_batch_delay_ms" in table:
        delay = table["max_batch_delay_ms"]
        valid = isinstance(delay, int | float) and not isinstance(delay, bool)
        if not valid or not 0 <= delay <= 10_000:
            raise RegistryError(f"model {name!r}: max_batch_delay_ms must be in 0..10000")
        changes["max_batch_delay_ms"] = float(delay)
    return replace(spec, **changes)


def load_registry(models_file: Path | None = None) -> dict[str, ModelSpec]:
    """Built-in models, with the models file's additions and overrides applied."""
    models = dict(BUILTIN_MODELS)
    if models_file is None:
        return models
    path = Path(models_file).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"models file {path} (IMGQ_MODELS_FILE) does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(
            f"models file {path} (IMGQ_MODELS_FILE) is not valid TOML: {exc}"
        ) from exc
    tables = data.get("models", {})
    if not isinstance(tables, dict) or set(data) - {"models"}:
        raise RegistryError(f"models file {path}: expected only [models.NAME] tables")
    base_dir = path.resolve().parent
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise RegistryError(f"models file {path}: [models.{name}] must be a table")
        models[name] = _parse_model(name, table, models.get(name), base_dir)
    return models


def get_model(registry: Mapping[str, ModelSpec], name: str) -> ModelSpec:
    """The named model, or a RegistryError listing the known names."""
    try:
        return registry[name]
    except KeyError:
        raise RegistryError(
            f"unknown model {name!r}; known models: {', '.join(sorted(registry))} "
            "(add one with a [models.NAME] table in IMGQ_MODELS_FILE)"
        ) from None

"""The model registry: plain data records, built-ins plus a user's TOML file.

Code never branches on a model's name; everything a worker needs to know about a
model (where to load it, its kind, its input size, its activation, its labels) is
here. A model is a *classifier* (top-5 labels) or an *embedding* model (the
network's pooled pre-logit vector, for search and near-duplicates; no labels).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from shared.labels import BUILTIN_LABEL_SETS
from shared.modes import DecodeMode, Precision, RuntimeKind
from shared.settings import BATCH_SIZE_BOUNDS, MAX_BATCH_DELAY_MS_BOUNDS

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
QUEUE_PREFIX = "imgq."


class Activation(StrEnum):
    """How a model's raw outputs become scores."""

    SOFTMAX = "softmax"  # single-label logits (ImageNet-1k classifiers)
    SIGMOID = "sigmoid"  # multi-label logits (BiT-M ImageNet-21k, per its model card)
    NONE = "none"  # the model already outputs probabilities


class ModelKind(StrEnum):
    """What a model's records carry."""

    CLASSIFICATION = "classification"  # top-5 classes and scores
    EMBEDDING = "embedding"  # the pooled feature vector ("embedding", "dim")


class RegistryError(ValueError):
    """The registry or a user's models file is invalid."""


@dataclass(frozen=True)
class ModelSpec:
    """One model: a TF Hub handle or SavedModel path, its kind, input size, activation
    and labels (classifiers; an embedding model has none and no activation)."""

    name: str
    handle: str
    input_size: tuple[int, int]  # (height, width)
    activation: Activation
    labels: str  # a built-in label set name, or a path to a text file ("" for embeddings)
    labels_base_dir: Path | None = None  # resolves a relative labels path (the TOML's folder)
    description: str = ""
    batch_size: int | None = None  # overrides IMGQ_BATCH_SIZE for this model
    max_batch_delay_ms: float | None = None  # overrides IMGQ_MAX_BATCH_DELAY_MS
    precision: Precision | None = None  # overrides IMGQ_PRECISION
    runtime: RuntimeKind | None = None  # overrides IMGQ_RUNTIME
    decode: DecodeMode | None = None  # overrides IMGQ_DECODE
    kind: ModelKind = ModelKind.CLASSIFICATION
    # A built-in model's own batch size where IMGQ_BATCH_SIZE (or --batch-size) is not
    # set: below the models file's batch_size and an explicit setting, above the default.
    default_batch_size: int | None = None

    @property
    def is_embedding(self) -> bool:
        """True for a model whose records carry a vector instead of top-5."""
        return self.kind is ModelKind.EMBEDDING

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
        # 936M parameters: 16 images keep a GPU busy in about 6-7 GB at 224 px
        # (docs/deployment.md#first-gpu-host), and a CPU batch stays seconds long.
        default_batch_size=16,
    ),
    "resnet50_features": ModelSpec(
        name="resnet50_features",
        handle="https://tfhub.dev/tensorflow/resnet_50/feature_vector/1",
        input_size=(224, 224),
        activation=Activation.NONE,
        labels="",
        kind=ModelKind.EMBEDDING,
        description="ResNet-50 v1.5 feature vector (ImageNet-1k): 2,048-d pooled features.",
    ),
    "bit_m_r152x4_features": ModelSpec(
        name="bit_m_r152x4_features",
        handle="https://tfhub.dev/google/bit/m-r152x4/1",
        input_size=(224, 224),
        activation=Activation.NONE,
        labels="",
        kind=ModelKind.EMBEDDING,
        description="BiT-M R152x4 feature vector (ImageNet-21k): 8,192-d pooled features.",
    ),
}


# One side of an input size; a bool is not a size (TOML has both).
_Side = Annotated[int, Field(strict=True, ge=8, le=4096)]
_NonEmpty = Annotated[str, Field(strict=True, min_length=1)]


class ModelEntry(BaseModel):
    """One ``[models.NAME]`` table of a models file: a new model, or what to change
    in the model of that name. Bounds are the settings' that the keys override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handle: _NonEmpty | None = None
    kind: ModelKind | None = None
    input_size: _Side | tuple[_Side, _Side] | None = None
    activation: Activation | None = None
    labels: _NonEmpty | None = None
    description: Annotated[str, BeforeValidator(str)] | None = None
    batch_size: (
        Annotated[int, Field(strict=True, ge=BATCH_SIZE_BOUNDS[0], le=BATCH_SIZE_BOUNDS[1])] | None
    ) = None
    max_batch_delay_ms: (
        Annotated[
            float,
            Field(strict=True, ge=MAX_BATCH_DELAY_MS_BOUNDS[0], le=MAX_BATCH_DELAY_MS_BOUNDS[1]),
        ]
        | None
    ) = None
    precision: Precision | None = None
    runtime: RuntimeKind | None = None
    decode: DecodeMode | None = None


class ModelsFile(BaseModel):
    """A models file: only ``[models.NAME]`` tables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelEntry] = Field(default_factory=dict)


# What each key must be, for the one-line error about a models file.
_EXPECTED = {
    "handle": "handle must be a non-empty string",
    "kind": f"kind must be one of {[k.value for k in ModelKind]}",
    "input_size": "input_size must be an integer or [height, width], each in 8..4096",
    "activation": f"activation must be one of {[a.value for a in Activation]}",
    "labels": "labels must be a label set name or a path",
    "description": "description must be a string",
    "batch_size": "batch_size must be an integer in {}..{}".format(*BATCH_SIZE_BOUNDS),
    "max_batch_delay_ms": "max_batch_delay_ms must be in {}..{}".format(*MAX_BATCH_DELAY_MS_BOUNDS),
    **{
        key: f"{key} must be one of {', '.join(m.value for m in enum)}"
        for key, enum in (
            ("precision", Precision),
            ("runtime", RuntimeKind),
            ("decode", DecodeMode),
        )
    },
}


def _explain(path: Path, data: Mapping[str, Any], exc: ValidationError) -> RegistryError:
    """One line saying what is wrong in a models file, from pydantic's errors."""
    errors = exc.errors()
    if any(len(e["loc"]) == 1 for e in errors):
        return RegistryError(f"models file {path}: expected only [models.NAME] tables")
    tables = errors[0]["loc"]
    if len(tables) == 2 and not isinstance(data["models"][tables[1]], dict):
        return RegistryError(f"models file {path}: [models.{tables[1]}] must be a table")
    name = str(tables[1])
    unknown = sorted(
        str(e["loc"][2]) for e in errors if e["type"] == "extra_forbidden" and e["loc"][1] == name
    )
    if unknown:
        return RegistryError(
            f"model {name!r}: unknown keys {unknown}; allowed: {sorted(ModelEntry.model_fields)}"
        )
    key = str(errors[0]["loc"][2])
    value = data["models"][name][key]
    return RegistryError(f"model {name!r}: {_EXPECTED[key]}, got {value!r}")


def _apply(name: str, entry: ModelEntry, base: ModelSpec | None, base_dir: Path) -> ModelSpec:
    """The model a table describes, on top of the model of that name if there is one."""
    if not MODEL_NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r} must be lower-case letters, digits and underscores"
        )
    kind = entry.kind or (base.kind if base else ModelKind.CLASSIFICATION)
    if base is None:
        # An embedding model has no labels: only its handle is required.
        required = {"handle"} if kind is ModelKind.EMBEDDING else {"handle", "labels"}
        missing = required - entry.model_fields_set
        if missing:
            raise RegistryError(f"model {name!r}: missing required keys {sorted(missing)}")
    if kind is ModelKind.EMBEDDING and entry.labels is not None:
        raise RegistryError(f"model {name!r}: an embedding model has no labels")
    spec = base or ModelSpec(
        name=name,
        handle="",
        input_size=(224, 224),
        activation=Activation.NONE if kind is ModelKind.EMBEDDING else Activation.SOFTMAX,
        labels="",
    )
    changes: dict[str, Any] = {"kind": kind}
    if kind is not spec.kind:
        # A classifier made an embedding model drops its labels and activation.
        if kind is ModelKind.EMBEDDING:
            changes.update(labels="", labels_base_dir=None, activation=Activation.NONE)
        elif entry.labels is None:
            raise RegistryError(f"model {name!r}: a classifier needs labels")
    if entry.handle is not None:
        handle = entry.handle
        if "://" not in handle and not Path(handle).is_absolute():
            handle = str((base_dir / handle).resolve())
        changes["handle"] = handle
    if entry.input_size is not None:
        size = entry.input_size
        changes["input_size"] = (size, size) if isinstance(size, int) else size
    if entry.activation is not None:
        changes["activation"] = entry.activation
    if entry.labels is not None:
        changes["labels"] = entry.labels
        changes["labels_base_dir"] = None if entry.labels in BUILTIN_LABEL_SETS else base_dir
    if entry.description is not None:
        changes["description"] = entry.description
    if entry.batch_size is not None:
        changes["batch_size"] = entry.batch_size
    if entry.max_batch_delay_ms is not None:
        changes["max_batch_delay_ms"] = float(entry.max_batch_delay_ms)
    for key in ("precision", "runtime", "decode"):
        if getattr(entry, key) is not None:
            changes[key] = getattr(entry, key)
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
    try:
        parsed = ModelsFile.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, data, exc) from None
    base_dir = path.resolve().parent
    for name, entry in parsed.models.items():
        models[name] = _apply(name, entry, models.get(name), base_dir)
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

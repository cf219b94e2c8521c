"""A trained head exported with its embedding model as one standalone SavedModel.

A head is a linear layer over an embedding model's pooled vectors: weights ``(D, K)``,
bias ``(K,)`` and K label names; its probabilities are ``softmax(vector @ W + b)``.
``export_head`` saves the backbone (loaded as a worker loads it) and the head in one
TF2 SavedModel that TF Serving or ``tf.saved_model.load`` runs without imgq:

- signature ``serving_default``: ``images``, float32 ``[None, H, W, 3]`` RGB in
  [0, 1] at the base model's input size, to ``probabilities`` ``[None, K]`` float32
  and ``embedding`` ``[None, D]`` float32 (the pooled vector the head was applied to);
- the labels as the asset ``assets/labels.txt`` (UTF-8, one per line, in the order
  of the probabilities) and as the attribute ``labels``, a string tensor (a
  non-trainable variable) of K names;
- ``imgq_export.json`` next to ``saved_model.pb``: the export's name, the base model,
  the input, the outputs, the labels and when it was made.

The SavedModel is written into a temporary folder beside the destination and renamed
into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.registry import ModelSpec
from workers.runtimes.tensorflow import (
    DEFAULT_HUB_CACHE_DIR,
    load_savedmodel,
    pooled_vectors,
    resolve_callable,
)

METADATA_FILE = "imgq_export.json"
LABELS_FILE = "labels.txt"
INPUT_NAME = "images"


class ExportError(Exception):
    """One line for the user."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _check_destination(out: Path) -> None:
    if out.is_dir():
        if any(out.iterdir()):
            raise ExportError(f"{out} already exists and is not empty; choose a new folder")
    elif out.exists():
        raise ExportError(f"{out} already exists and is not a folder")


def _check_head(
    base: ModelSpec, weights: np.ndarray, bias: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The head as float32 arrays and a list of labels, or an ExportError."""
    if not base.is_embedding:
        raise ExportError(
            f"model {base.name!r} is a {base.kind.value} model; a head is exported with "
            "the embedding model it was trained on"
        )
    w = np.asarray(weights)
    b = np.asarray(bias)
    if w.ndim != 2:
        raise ExportError(f"the head's weights must be (D, K), got shape {w.shape}")
    dim, k = w.shape
    if b.shape != (k,):
        raise ExportError(f"the head's bias must be ({k},) for weights {w.shape}, got {b.shape}")
    names = list(labels)
    if len(names) != k:
        raise ExportError(f"the head has {k} classes but {len(names)} labels")
    for i, name in enumerate(names):
        if not isinstance(name, str) or name.splitlines() != [name]:
            raise ExportError(
                f"label {i} ({name!r}) is empty or holds a line break; "
                f"{LABELS_FILE} holds one label per line"
            )
    if dim == 0 or k == 0:
        raise ExportError(f"the head's weights {w.shape} are empty")
    w32 = w.astype(np.float32)
    b32 = b.astype(np.float32)
    if not (np.isfinite(w32).all() and np.isfinite(b32).all()):
        raise ExportError("the head's weights or bias hold NaN or infinite values")
    return w32, b32, names


def _build_module(
    base: ModelSpec, backbone: Any, w: np.ndarray, b: np.ndarray, names: list[str], labels_txt: Path
) -> Any:
    """The tf.Module to save: the backbone, the head's variables, the labels, and the
    serving function; an ExportError when the backbone's vectors are not D wide."""
    import tensorflow as tf

    call = resolve_callable(backbone)
    height, width = base.input_size
    dim, k = w.shape

    probe = pooled_vectors(call(tf.zeros([1, height, width, 3], tf.float32)))
    got = int(probe.shape[-1])
    if got != dim:
        raise ExportError(
            f"the head's weights expect {dim}-d vectors but model {base.name!r} "
            f"outputs {got}-d vectors"
        )

    module = tf.Module()
    module.backbone = backbone  # tracked: its variables are saved with the head
    module.weights = tf.Variable(w, trainable=False, name="head_weights")
    module.bias = tf.Variable(b, trainable=False, name="head_bias")
    # A string tensor saved with the model (a plain tf.constant attribute would not be
    # saved: only variables, assets and functions are).
    module.labels = tf.Variable(tf.constant(names, tf.string), trainable=False, name="labels")
    module.labels_file = tf.saved_model.Asset(str(labels_txt))

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        """``images``: float32 [None, H, W, 3] RGB in [0, 1] at the base model's input
        size; ``probabilities``: softmax of the head, [None, K]; ``embedding``: the
        backbone's pooled vector, [None, D]."""
        vectors = tf.ensure_shape(pooled_vectors(call(images)), [None, dim])
        logits = tf.matmul(vectors, module.weights) + module.bias
        return {
            "probabilities": tf.ensure_shape(tf.nn.softmax(logits, axis=-1), [None, k]),
            "embedding": vectors,
        }

    signature = tf.TensorSpec([None, height, width, 3], tf.float32, name=INPUT_NAME)
    module.serve = tf.function(serve, input_signature=[signature])
    return module


def _metadata(base: ModelSpec, name: str, dim: int, names: list[str]) -> dict[str, Any]:
    height, width = base.input_size
    return {
        "name": name,
        "base_model": {"name": base.name, "handle": base.handle},
        "input_size": [height, width],
        "signature": "serving_default",
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [None, height, width, 3],
            "description": (
                f"RGB images resized to {height}x{width}, float32 in [0, 1] (pixels / 255)"
            ),
        },
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, len(names)]},
            "embedding": {"dtype": "float32", "shape": [None, dim]},
        },
        "labels": names,
        "labels_file": f"assets/{LABELS_FILE}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def export_head(
    base: ModelSpec,
    weights: np.ndarray,
    bias: np.ndarray,
    labels: Sequence[str],
    out: Path,
    *,
    hub_cache_dir: Path | None = None,
    name: str = "",
) -> Path:
    """Save ``base`` (an embedding model) with the head ``softmax(v @ weights + bias)``
    as one SavedModel in ``out`` (a new or empty folder); returns ``out``.

    ``weights`` is ``(D, K)``, ``bias`` ``(K,)``, ``labels`` K names; ``name`` (e.g.
    ``"dogs@2"``) is recorded in ``imgq_export.json``. Raises ExportError, one line,
    when the head does not fit the model or ``out`` is taken.
    """
    out = Path(out).expanduser()
    _check_destination(out)
    w, b, names = _check_head(base, weights, bias, labels)

    import tensorflow as tf

    from workers.runtimes.base import ModelLoadError

    try:
        backbone = load_savedmodel(base, hub_cache_dir or DEFAULT_HUB_CACHE_DIR)
    except (ModelLoadError, OSError, ValueError, tf.errors.OpError) as exc:
        raise ExportError(
            f"model {base.name!r} could not be loaded from {base.handle!r}: {_one_line(exc)}"
        ) from exc

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    try:
        labels_txt = staging / "labels" / LABELS_FILE
        labels_txt.parent.mkdir()
        labels_txt.write_text("".join(f"{label}\n" for label in names), encoding="utf-8")
        try:
            module = _build_module(base, backbone, w, b, names, labels_txt)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"model {base.name!r} failed on a test batch: {_one_line(exc)}"
            ) from exc
        saved = staging / "model"
        try:
            tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
        except OSError:
            raise
        except Exception as exc:
            raise ExportError(
                f"model {base.name!r} could not be saved with the head: {_one_line(exc)}"
            ) from exc
        metadata = _metadata(base, name, int(w.shape[0]), names)
        (saved / METADATA_FILE).write_text(
            json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _check_destination(out)  # nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()  # empty: the rename takes its place
        saved.rename(out)
    except OSError as exc:
        raise ExportError(f"could not write the export to {out}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

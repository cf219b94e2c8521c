"""The model registry: built-ins, a user's TOML file, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.registry import (
    BUILTIN_MODELS,
    Activation,
    RegistryError,
    get_model,
    load_registry,
    model_from_queue,
    queue_for,
)
from shared.settings import BATCH_SIZE_BOUNDS, MAX_BATCH_DELAY_MS_BOUNDS, Settings


def test_builtins_match_the_model_cards() -> None:
    resnet = BUILTIN_MODELS["resnet50"]
    assert resnet.handle == "https://tfhub.dev/tensorflow/resnet_50/classification/1"
    assert resnet.input_size == (224, 224)
    assert resnet.activation is Activation.SOFTMAX
    assert resnet.labels == "imagenet1k-background"
    bit = BUILTIN_MODELS["bit_m_r152x4"]
    assert bit.handle == "https://tfhub.dev/google/bit/m-r152x4/imagenet21k_classification/1"
    assert bit.activation is Activation.SIGMOID
    assert bit.labels == "imagenet21k"
    assert load_registry(None) == BUILTIN_MODELS


def test_bit_has_its_own_batch_size_unless_one_is_set(tmp_path: Path) -> None:
    from workers.runtime import batch_size_of

    bit, resnet = BUILTIN_MODELS["bit_m_r152x4"], BUILTIN_MODELS["resnet50"]
    assert batch_size_of(bit, Settings()) == 16
    assert batch_size_of(resnet, Settings()) == 32
    assert batch_size_of(bit, Settings(batch_size=32)) == 32  # IMGQ_BATCH_SIZE, --batch-size
    models = tmp_path / "models.toml"
    models.write_text("[models.bit_m_r152x4]\nbatch_size = 8\n", encoding="utf-8")
    from_file = load_registry(models)["bit_m_r152x4"]
    assert batch_size_of(from_file, Settings(batch_size=32)) == 8  # the models file first


def test_queues_per_model() -> None:
    assert queue_for("resnet50") == "imgq.resnet50"
    assert model_from_queue("imgq.resnet50") == "resnet50"
    assert model_from_queue("celery") is None
    assert model_from_queue("imgq.") is None


def test_models_file_adds_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "models.toml"
    f.write_text(
        """
[models.my_model]
handle = "sub/saved"
input_size = [192, 256]
activation = "none"
labels = "my-labels.txt"

[models.resnet50]
handle = "/models/resnet50"
""",
        encoding="utf-8",
    )
    reg = load_registry(f)
    mine = reg["my_model"]
    assert mine.handle == str((tmp_path / "sub" / "saved").resolve())
    assert mine.input_size == (192, 256)
    assert mine.activation is Activation.NONE
    assert mine.labels == "my-labels.txt"
    assert mine.labels_base_dir == tmp_path.resolve()
    # An override keeps what it does not change.
    assert reg["resnet50"].handle == "/models/resnet50"
    assert reg["resnet50"].labels == "imagenet1k-background"
    assert reg["resnet50"].activation is Activation.SOFTMAX
    assert reg["bit_m_r152x4"] == BUILTIN_MODELS["bit_m_r152x4"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[models.x]\nlabels = "imagenet1k"\n', "missing required keys ['handle']"),
        ('[models.x]\nhandle = "/m"\nlabels = "imagenet1k"\nactivation = "relu"\n', "activation"),
        (
            '[models.x]\nhandle = "/m"\nlabels = "imagenet1k"\ninput_size = [1, 2, 3]\n',
            "input_size",
        ),
        ('[models.x]\nhandle = "/m"\nlabels = "imagenet1k"\ncolour = 1\n', "unknown keys"),
        ('[models.Bad-Name]\nhandle = "/m"\nlabels = "imagenet1k"\n', "lower-case"),
        ("[models.x\n", "not valid TOML"),
        ("[other]\nx = 1\n", "only [models.NAME]"),
        ("[models]\nx = 1\n", "[models.x] must be a table"),
        (
            '[models.x]\nhandle = "/m"\nlabels = "imagenet1k"\ninput_size = [true, 9]\n',
            "input_size",
        ),
        ('[models.x]\nhandle = ""\nlabels = "imagenet1k"\n', "handle must be a non-empty"),
        ("[models.resnet50]\nbatch_size = true\n", "batch_size must be an integer in 1..4096"),
        ("[models.resnet50]\nmax_batch_delay_ms = -1\n", "max_batch_delay_ms must be in 0..10000"),
    ],
)
def test_models_file_errors(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "models.toml"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(RegistryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_registry(f)


def test_overrides_share_the_settings_bounds(tmp_path: Path) -> None:
    f = tmp_path / "models.toml"
    for field, low, high in (
        ("batch_size", *BATCH_SIZE_BOUNDS),
        ("max_batch_delay_ms", *MAX_BATCH_DELAY_MS_BOUNDS),
    ):
        for value, valid in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
            f.write_text(f"[models.resnet50]\n{field} = {value}\n", encoding="utf-8")
            if valid:
                assert getattr(load_registry(f)["resnet50"], field) == value
                assert getattr(Settings(**{field: value}), field) == value
            else:
                with pytest.raises(RegistryError, match=field):
                    load_registry(f)
                with pytest.raises(ValidationError):
                    Settings(**{field: value})


def test_missing_models_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="IMGQ_MODELS_FILE"):
        load_registry(tmp_path / "nope.toml")


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(
        RegistryError,
        match="known models: bit_m_r152x4, bit_m_r152x4_features, resnet50, resnet50_features",
    ):
        get_model(BUILTIN_MODELS, "vgg")

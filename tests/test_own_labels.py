"""Your own labels end to end: real workers, a real PostgreSQL with pgvector, real
photos. ``imgq train`` on a few crops per label, a held-out set classified through the
queue at the accuracy the command printed; a worker started before the training
serves the new model; ``NAME@1`` answers the same after ``NAME@2`` exists; two heads on
one job; the export gives the worker's probabilities; every refusal has its message."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from producer.api import Client
from shared.settings import Settings
from tests.conftest import WorkerProcess, run_cli
from tests.savedmodels import build_embedder

pytest_plugins = ["tests.vectors_pg"]
pytestmark = pytest.mark.slow

BASE = "townlab"
DIM = 64
# Label names as users write them: spaces, non-ASCII letters, HTML's special characters.
PHOTOS = {
    "astronaut": "astronaute à l'espace",
    "coffee": "café <latte>",
    "rocket": "rocket & launch",
    "chelsea": "Katze Chelsea",
}


def crops(photo: np.ndarray, n: int, seed: int) -> list[Image.Image]:
    """``n`` random crops (half the photo's side or more), some flipped: a label's images."""
    rng = random.Random(seed)
    image = Image.fromarray(photo[..., :3]).convert("RGB")
    out = []
    for _ in range(n):
        w, h = image.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((x, y, x + cw, y + ch)).resize((96, 96))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def write_set(folder: Path, per_label: int, seed: int, photos: dict[str, str] = PHOTOS) -> Path:
    """A folder of label folders, ``per_label`` crops of each photo."""
    from skimage import data

    for k, (photo, label) in enumerate(photos.items()):
        sub = folder / label
        sub.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(crops(getattr(data, photo)(), per_label, seed * 100 + k)):
            crop.save(sub / f"{photo}-{seed}-{i}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def own_env(
    imgq_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, vectors_url: str
) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("own-labels-models")
    build_embedder(folder / BASE, DIM, seed=5)
    (folder / "models.toml").write_text(
        f'[models.{BASE}]\nkind = "embedding"\nhandle = "{BASE}"\ninput_size = 32\n'
    )
    return {
        **imgq_env,
        "IMGQ_MODELS_FILE": str(folder / "models.toml"),
        "IMGQ_RESULTS_URL": vectors_url,
        "IMGQ_CHUNK_SIZE": "4",
    }


@pytest.fixture(scope="module")
def base_worker(start_worker: Any, own_env: dict[str, str]) -> Iterator[WorkerProcess]:
    """Started before any model of the module is trained."""
    worker = start_worker(BASE, name="own-labels", env=own_env)
    worker.module_owned = True
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def client(own_env: dict[str, str], base_worker: WorkerProcess) -> Iterator[Client]:
    c = Client(
        Settings(
            broker_url=own_env["IMGQ_BROKER_URL"],
            models_file=Path(own_env["IMGQ_MODELS_FILE"]),
            results_url=own_env["IMGQ_RESULTS_URL"],
            chunk_size=4,
        )
    )
    yield c
    c.app.close()


def train(env: dict[str, str], data: Path, name: str, *extra: str) -> dict[str, Any]:
    done = run_cli(
        ["train", str(data), "--base", BASE, "--name", name, "--json", "--no-progress", *extra],
        env,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def classify(client: Client, folder: Path, model: str) -> dict[str, Any]:
    """Records of every image of ``folder`` with ``model``, by path."""
    job = client.submit([str(folder)], models=[model])
    job.wait(progress=False, timeout=120)
    return {r.image: r for r in job.iter_results()}


@pytest.fixture(scope="module")
def trained(
    own_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, base_worker: WorkerProcess
) -> dict[str, Any]:
    """pets@1: 6 crops per label (few-shot: cross-validated), trained after the worker
    started."""
    data = write_set(tmp_path_factory.mktemp("pets-train"), 6, seed=1)
    return train(own_env, data, "pets")


def test_trained_model_classifies_held_out_images_at_the_printed_accuracy(
    trained: dict[str, Any], client: Client, tmp_path: Path
) -> None:
    assert trained["model"] == "pets@1"
    metrics = trained["metrics"]
    assert metrics["evaluation"] == "cross-validation"  # under 10 images per label
    assert sorted(trained["labels"]) == sorted(PHOTOS.values())
    assert metrics["accuracy"] >= 0.8
    held_out = write_set(tmp_path / "held-out", 5, seed=7)
    records = classify(client, held_out, "pets")  # the latest version: pets@1
    assert len(records) == 5 * len(PHOTOS)
    right = 0
    for path, record in records.items():
        assert record.error is None and record.model == "pets@1"
        assert len(record.top5) == len(PHOTOS)  # top-5 of 4 labels: all of them
        assert abs(sum(p.score for p in record.top5) - 1.0) < 1e-5  # softmax
        right += record.top5[0].label == Path(path).parent.name
    accuracy = right / len(records)
    assert accuracy >= 0.8
    assert abs(accuracy - metrics["accuracy"]) <= 0.25


def test_a_version_keeps_answering_the_same_after_the_next_exists(
    trained: dict[str, Any], own_env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    probe = write_set(tmp_path / "probe", 2, seed=9)
    before = classify(client, probe, "pets@1")
    data = write_set(tmp_path / "more", 12, seed=3)  # 12 per label: a validation split
    second = train(own_env, data, "pets")
    assert second["model"] == "pets@2"
    assert second["metrics"]["evaluation"] == "validation"
    assert second["metrics"]["n_validation"] > 0
    after = classify(client, probe, "pets@1")
    assert {p: [(x.label, x.score) for x in r.top5] for p, r in before.items()} == {
        p: [(x.label, x.score) for x in r.top5] for p, r in after.items()
    }
    assert {r.model for r in classify(client, probe, "pets").values()} == {"pets@2"}
    listing = run_cli(["models", "--json"], own_env)
    assert listing.returncode == 0, listing.stderr
    models = json.loads(listing.stdout)
    assert {"pets@1", "pets@2"} <= set(models)
    assert models["pets@2"]["metrics"]["accuracy"] == second["metrics"]["accuracy"]
    assert models["pets@1"]["base"] == BASE and models["pets@1"]["n_train"] == 24
    text = run_cli(["models"], own_env)
    assert "pets@2  (latest: pets)" in text.stdout


def test_two_heads_on_one_job_and_a_deleted_version(
    trained: dict[str, Any], own_env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    two = {k: PHOTOS[k] for k in ("coffee", "rocket")}
    train(own_env, write_set(tmp_path / "drinks", 5, seed=4, photos=two), "drinks")
    probe = write_set(tmp_path / "probe", 2, seed=11, photos=two)
    job = client.submit([str(probe)], models=["pets@1", "drinks"])
    job.wait(progress=False, timeout=120)
    records = list(job.iter_results())
    assert sorted({r.model for r in records}) == ["drinks@1", "pets@1"]
    assert all(r.error is None for r in records) and len(records) == 8
    # Deleted: new jobs cannot name it; the number is not given again.
    gone = run_cli(["models", "delete", "drinks@1"], own_env)
    assert gone.returncode == 0, gone.stderr
    refused = run_cli(["submit", str(probe), "--model", "drinks@1"], own_env)
    assert refused.returncode != 0
    assert "no model named 'drinks'" in refused.stderr
    again = train(own_env, write_set(tmp_path / "drinks2", 5, seed=5, photos=two), "drinks")
    assert again["model"] == "drinks@2"


def test_export_gives_the_workers_probabilities(
    trained: dict[str, Any], own_env: dict[str, str], client: Client, tmp_path: Path
) -> None:
    import tensorflow as tf

    from workers.inputs import ReadLimits, load_image

    probe = write_set(tmp_path / "probe", 2, seed=13)
    records = classify(client, probe, "pets@1")
    out = tmp_path / "export"
    done = run_cli(["export", "pets@1", "--out", str(out)], own_env)
    assert done.returncode == 0, done.stderr
    model = tf.saved_model.load(str(out))
    labels = (out / "assets" / "labels.txt").read_text(encoding="utf-8").splitlines()
    limits = ReadLimits.from_settings(Settings())
    paths = sorted(records)
    pixels = np.stack([load_image(p, (32, 32), limits) for p in paths])
    batch = tf.constant(pixels.astype(np.float32) / np.float32(255.0))
    probs = model.signatures["serving_default"](images=batch)["probabilities"].numpy()
    for row, path in zip(probs, paths, strict=True):
        for pred in records[path].top5:
            assert abs(row[labels.index(pred.label)] - pred.score) < 1e-5


@pytest.mark.parametrize(
    "case, message",
    [
        ("one label", "only one label"),
        ("one image", "at least 2 images"),
        ("unreadable", "none of the"),
        ("classifier base", "is a classifier"),
        ("registry name", "is a model of the registry"),
    ],
)
def test_training_sets_that_cannot_make_a_model_are_refused(
    case: str, message: str, own_env: dict[str, str], base_worker: WorkerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    args = ["--base", BASE, "--name", "refused"]
    if case == "one label":
        write_set(data, 3, seed=1, photos={"coffee": "coffee"})
    elif case == "one image":
        write_set(data, 3, seed=1, photos={"coffee": "coffee"})
        write_set(data, 1, seed=1, photos={"rocket": "rocket"})
    elif case == "unreadable":
        for label in ("a", "b"):
            (data / label).mkdir(parents=True)
            for i in range(2):
                (data / label / f"x{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    else:
        write_set(data, 3, seed=1, photos={"coffee": "coffee", "rocket": "rocket"})
        args = (
            ["--base", "resnet50", "--name", "refused"]
            if case == "classifier base"
            else ["--base", BASE, "--name", BASE]
        )
    done = run_cli(["train", str(data), *args, "--no-progress"], own_env)
    # A wrong --base or --name is a usage error (2); a training set that cannot make
    # a model, a failure (1).
    assert done.returncode == (2 if case in ("classifier base", "registry name") else 1), (
        done.stderr
    )
    assert message in done.stderr.lower(), done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 400
    listing = json.loads(run_cli(["models", "--json"], own_env).stdout)
    assert not any(ref.startswith("refused@") for ref in listing)


def test_an_unreadable_image_is_reported_and_left_out(
    own_env: dict[str, str], base_worker: WorkerProcess, tmp_path: Path
) -> None:
    data = write_set(tmp_path / "data", 3, seed=2, photos={"coffee": "coffee", "rocket": "rocket"})
    (data / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    done = run_cli(
        ["train", str(data), "--base", BASE, "--name", "leftout", "--json", "--no-progress"],
        own_env,
    )
    assert done.returncode == 0, done.stderr
    assert "broken.jpg" in done.stderr and "not_an_image" in done.stderr
    out = json.loads(done.stdout)
    assert out["n_images"] == 6
    assert [Path(x["image"]).name for x in out["left_out"]] == ["broken.jpg"]

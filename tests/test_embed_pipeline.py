"""Embedding jobs end to end: real workers, a real PostgreSQL with pgvector, real
photos. Vectors equal a direct SavedModel call on the same preprocessing; a bad file
gets its error record; similar images and near-duplicates find a photo's rotated and
recompressed copies; exports in Parquet and NumPy; the result cache serves a
resubmitted job with the same records, and a changed model file misses it; the Redis
results store refuses an embedding job at submit."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from producer.api import Client, EmbeddingsNeedPostgres
from shared.settings import Settings
from tests.conftest import WorkerProcess, free_port, run_cli
from tests.savedmodels import build_embedder

pytest_plugins = ["tests.vectors_pg"]
pytestmark = pytest.mark.slow

MODEL = "temb"
DIM = 64
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six photos, a rotated and recompressed copy of chelsea, a smaller recompressed
    copy of coffee, and a file that is not an image."""
    from skimage import data

    folder = tmp_path_factory.mktemp("embed-photos")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()[..., :3]).convert("RGB").save(
            folder / f"{name}.jpg", quality=95
        )
    Image.open(folder / "chelsea.jpg").rotate(90, expand=True).save(
        folder / "chelsea-copy.jpg", quality=70
    )
    coffee = Image.open(folder / "coffee.jpg")
    coffee.resize((coffee.width * 3 // 4, coffee.height * 3 // 4)).save(
        folder / "coffee-copy.jpg", quality=60
    )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    return folder


@pytest.fixture(scope="module")
def embed_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedding test model and a models file naming it."""
    folder = tmp_path_factory.mktemp("embed-models")
    build_embedder(folder / MODEL, DIM, seed=3)
    (folder / "models.toml").write_text(
        f'[models.{MODEL}]\nkind = "embedding"\nhandle = "{MODEL}"\ninput_size = 32\n'
    )
    return folder


@pytest.fixture(scope="module")
def embed_env(imgq_env: dict[str, str], embed_models: Path, vectors_url: str) -> dict[str, str]:
    return {
        **imgq_env,
        "IMGQ_MODELS_FILE": str(embed_models / "models.toml"),
        "IMGQ_RESULTS_URL": vectors_url,
        "IMGQ_CHUNK_SIZE": "3",
    }


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def embed_worker(
    start_worker: Any, embed_env: dict[str, str], metrics_port: int
) -> Iterator[WorkerProcess]:
    worker = start_worker(
        MODEL,
        name="embed",
        env={**embed_env, "IMGQ_WORKER_METRICS_PORT": str(metrics_port)},
    )
    worker.module_owned = True
    yield worker
    worker.stop()


@pytest.fixture
def embed_client(embed_env: dict[str, str], embed_worker: WorkerProcess) -> Iterator[Client]:
    settings = Settings(
        broker_url=embed_env["IMGQ_BROKER_URL"],
        models_file=Path(embed_env["IMGQ_MODELS_FILE"]),
        results_url=embed_env["IMGQ_RESULTS_URL"],
        chunk_size=3,
    )
    client = Client(settings)
    yield client
    client.app.close()


def cache_hits(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'imgq_worker_cache_hits_total{{model="{MODEL}"}}'):
            return float(line.split()[-1])
    return 0.0


def direct_vectors(model_dir: Path, files: list[Path]) -> np.ndarray:
    """The SavedModel called directly on the worker's own preprocessing of the files."""
    import tensorflow as tf

    from workers.inputs import ReadLimits, load_image

    limits = ReadLimits.from_settings(Settings())
    pixels = np.stack([load_image(str(f), (32, 32), limits) for f in files])  # uint8
    batch = pixels.astype(np.float32) / np.float32(255.0)  # [0, 1], as TF Hub models take
    return tf.saved_model.load(str(model_dir))(tf.constant(batch)).numpy()


def test_vectors_equal_a_direct_call_and_a_bad_file_gets_its_error(
    embed_client: Client, corpus: Path, embed_models: Path
) -> None:
    job = embed_client.submit([str(corpus)], models=[MODEL])
    status = job.wait(timeout=120, progress=False)
    assert status.finished
    records = list(job.iter_results())
    assert len(records) == len(PHOTOS) + 3
    bad = [r for r in records if r.error is not None]
    assert [(Path(r.image).name, r.error.code.value) for r in bad if r.error] == [
        ("broken.jpg", "not_an_image")
    ]
    assert bad[0].embedding is None
    good = [r for r in records if r.error is None]
    assert all(r.dim == DIM and r.top5 == [] for r in good)
    want = direct_vectors(embed_models / MODEL, [Path(r.image) for r in good])
    got = np.array([r.embedding for r in good], np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Job.embeddings(): the same vectors, in submission order, failures left out.
    matrix, names = job.embeddings()
    assert names == [r.image for r in good]
    assert np.array_equal(matrix, got)
    # The worker that recorded the last task built the search index.
    vectors = embed_client.vector_store(MODEL)
    deadline = time.monotonic() + 30
    while (vset := vectors.get_set(job.job_id, MODEL)) is None or vset.indexed_at is None:
        assert time.monotonic() < deadline, "no index 30 s after the job finished"
        time.sleep(0.2)
    assert vset.method == "halfvec"


def test_similar_finds_the_copy_first_and_duplicates_group_the_copies(
    embed_client: Client, corpus: Path
) -> None:
    job = embed_client.submit([str(corpus)], models=[MODEL])
    job.wait(timeout=120, progress=False)
    chelsea = str(corpus / "chelsea.jpg")
    near = job.similar(chelsea, k=3)
    assert Path(near[0].image).name == "chelsea-copy.jpg"
    assert near[0].similarity > 0.99 > near[1].similarity
    # A file that is not in the job is embedded through the queue first.
    outside = corpus.parent / "outside.png"
    Image.open(corpus / "coffee.jpg").rotate(180).save(outside)
    near = job.similar(str(outside), k=2)
    assert {Path(n.image).name for n in near} == {"coffee.jpg", "coffee-copy.jpg"}
    groups = job.duplicates(threshold=0.95)
    # Each group in submission order (a folder's files sorted by name).
    assert [[Path(i).name for i in g.images] for g in groups] == [
        ["chelsea-copy.jpg", "chelsea.jpg"],
        ["coffee-copy.jpg", "coffee.jpg"],
    ]


def test_resubmitted_images_come_from_the_cache_unchanged(
    embed_client: Client, corpus: Path, metrics_port: int
) -> None:
    files = sorted(str(p) for p in corpus.glob("*.jpg"))
    first = embed_client.submit(files, models=[MODEL])
    first.wait(timeout=120, progress=False)
    before = cache_hits(metrics_port)
    second = embed_client.submit(files, models=[MODEL])
    second.wait(timeout=120, progress=False)
    # Every readable image was a hit (the broken one is never cached).
    assert cache_hits(metrics_port) - before == len(files) - 1

    def strip(records: Any) -> list[dict[str, Any]]:
        return [{**r.to_json_dict(), "job_id": None} for r in records]

    assert strip(second.iter_results()) == strip(first.iter_results())


def test_an_embedding_job_with_the_redis_store_is_refused_in_one_line(
    embed_env: dict[str, str], corpus: Path
) -> None:
    client = Client(
        Settings(
            broker_url=embed_env["IMGQ_BROKER_URL"],
            models_file=Path(embed_env["IMGQ_MODELS_FILE"]),
            results_url="redis",
        )
    )
    with pytest.raises(EmbeddingsNeedPostgres) as info:
        client.submit([str(corpus)], models=[MODEL])
    assert "IMGQ_RESULTS_URL" in str(info.value) and "\n" not in str(info.value)
    env = {**embed_env, "IMGQ_RESULTS_URL": "redis"}
    done = run_cli(["submit", str(corpus), "--model", MODEL], env)
    assert done.returncode != 0
    assert "IMGQ_RESULTS_URL" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_exports_parquet_and_npy_and_finds_similar_and_duplicates(
    embed_env: dict[str, str], embed_worker: WorkerProcess, corpus: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "v.parquet"
    done = run_cli(
        ["submit", str(corpus), "--model", MODEL, "--wait", "--out", str(out)], embed_env
    )
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.schema.field("embedding").type.list_size == DIM
    job_id = table.column("job_id")[0].as_py()
    npy = tmp_path / "v.npy"
    done = run_cli(["results", job_id, "--format", "npy", "--out", str(npy)], embed_env)
    assert done.returncode == 0, done.stderr
    matrix = np.load(npy)
    names = (tmp_path / "v.names.txt").read_text().splitlines()
    assert matrix.shape == (len(PHOTOS) + 2, DIM) and len(names) == len(PHOTOS) + 2
    column = table.column("embedding").to_pylist()
    kept = [v for v in column if v is not None]
    assert np.array_equal(matrix, np.array(kept, np.float32))
    done = run_cli(
        ["similar", str(corpus / "chelsea.jpg"), "--job", job_id, "--model", MODEL, "--json"],
        embed_env,
    )
    assert done.returncode == 0, done.stderr
    near = json.loads(done.stdout)
    assert Path(near[0]["image"]).name == "chelsea-copy.jpg" and near[0]["similarity"] > 0.99
    done = run_cli(["duplicates", job_id, "--model", MODEL, "--json"], embed_env)
    assert done.returncode == 0, done.stderr
    groups = [[Path(i).name for i in g] for g in json.loads(done.stdout)]
    assert groups == [["chelsea-copy.jpg", "chelsea.jpg"], ["coffee-copy.jpg", "coffee.jpg"]]
    report = tmp_path / "r.html"
    done = run_cli(["report", job_id, "--out", str(report)], embed_env)
    assert done.returncode == 0, done.stderr
    page = report.read_text(encoding="utf-8")
    assert f"Near-duplicates: {MODEL}" in page and "2 groups of 4 images" in page


def test_imgq_run_starts_an_embedded_postgresql_for_an_embedding_model(
    imgq_env: dict[str, str], embed_models: Path, corpus: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    env = {k: v for k, v in imgq_env.items() if k != "IMGQ_BROKER_URL"}
    env["IMGQ_MODELS_FILE"] = str(embed_models / "models.toml")
    out = tmp_path / "vectors.parquet"
    done = run_cli(["run", str(corpus), "--model", MODEL, "--out", str(out)], env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "embedded PostgreSQL" in done.stderr
    table = pq.read_table(out)
    assert table.num_rows == len(PHOTOS) + 3
    assert table.column("embedding").null_count == 1  # broken.jpg

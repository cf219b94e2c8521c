"""Images in buckets: s3:// sources listed by the producer, objects read by workers,
results exported to a bucket, against a real S3-protocol server (moto's standalone
server on loopback) behind a proxy that answers 503 SlowDown or redirects on demand."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.conftest import WorkerProcess, run_cli
from tests.s3server import DUMMY_CREDENTIALS, FaultyProxy, MotoServer, moto_server, start_moto

boto3 = pytest.importorskip("boto3")

from producer.s3_output import PART_SIZE, S3Writer  # noqa: E402
from producer.s3_sources import expand_s3, glob_regex  # noqa: E402
from producer.sources import SourceError, expand_sources  # noqa: E402
from shared.schemas import ErrorCode  # noqa: E402
from shared.settings import Settings, SettingsError, get_settings, load_settings  # noqa: E402
from workers.inputs import ImageError, ReadLimits, load_image, read_source  # noqa: E402

BUCKET = "photos"
SECRET = "s3cret-never-stored-anywhere"
MODEL = "tsolo"  # served by this module's own worker alone


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(moto: MotoServer) -> Iterator[FaultyProxy]:
    p = FaultyProxy(moto.endpoint).start()
    yield p
    p.stop()


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()
    return saved


@pytest.fixture(scope="module")
def s3_env(proxy: FaultyProxy) -> Iterator[dict[str, str]]:
    """The environment of the producer and workers of this module: the proxy as the
    endpoint, loopback allowed, dummy credentials, three tries per request."""
    env = {
        **DUMMY_CREDENTIALS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "IMGQ_S3_ENDPOINT_URL": proxy.endpoint,
        "IMGQ_ALLOW_PRIVATE_URLS": "true",
        "IMGQ_S3_MAX_ATTEMPTS": "3",
        "IMGQ_FETCH_TIMEOUT": "20",
    }
    saved = _set_env(dict(env))
    yield env
    _set_env(saved)


@pytest.fixture(scope="module")
def bucket(s3_env: dict[str, str], photos: Path, moto: MotoServer) -> dict[str, bytes]:
    """The bucket's objects: three photos at two depths, a PNG, an HTML page under an
    image name and a text file."""
    client = boto3.client("s3", endpoint_url=moto.endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket="results")
    jpegs = sorted(photos.glob("*.jpg"))
    objects = {
        "animals/cat.jpg": jpegs[0].read_bytes(),
        "animals/deep/coffee.jpg": jpegs[1].read_bytes(),
        "people/astronaut.jpg": jpegs[2].read_bytes(),
        "people/small.png": _png(),
        "people/login.jpg": b"<html><body>please log in</body></html>",
        "notes.txt": b"not an image",
    }
    for key, data in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return objects


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def limits(**overrides: Any) -> ReadLimits:
    base = ReadLimits.from_settings(get_settings())
    values = {**base.__dict__, **overrides}
    return ReadLimits(**values)


def _code(ref: str, **kw: Any) -> ErrorCode:
    with pytest.raises(ImageError) as info:
        load_image(ref, (32, 32), limits(**kw))
    return info.value.code


# --- workers read objects -------------------------------------------------------------


def test_an_object_is_read_and_decoded(bucket: dict[str, bytes], proxy: FaultyProxy) -> None:
    assert read_source(f"s3://{BUCKET}/animals/cat.jpg", limits()) == bucket["animals/cat.jpg"]
    pixels = load_image(f"s3://{BUCKET}/people/small.png", (32, 32), limits())
    assert pixels.shape == (32, 32, 3)


def test_missing_key_bucket_and_not_an_image_get_their_codes(bucket: dict[str, bytes]) -> None:
    assert _code(f"s3://{BUCKET}/animals/nope.jpg") is ErrorCode.NO_SUCH_KEY
    assert _code("s3://no-such-bucket/cat.jpg") is ErrorCode.NO_SUCH_BUCKET
    assert _code(f"s3://{BUCKET}/people/login.jpg") is ErrorCode.NOT_AN_IMAGE
    assert _code(f"s3://{BUCKET}/animals/") is ErrorCode.UNSUPPORTED_SOURCE


def test_an_oversized_object_is_refused_by_its_size_before_reading(
    bucket: dict[str, bytes], proxy: FaultyProxy
) -> None:
    size = len(bucket["animals/cat.jpg"])
    with pytest.raises(ImageError) as info:
        read_source(f"s3://{BUCKET}/animals/cat.jpg", limits(max_bytes=size - 1))
    assert info.value.code is ErrorCode.TOO_LARGE
    assert "IMGQ_MAX_IMAGE_BYTES" in info.value.message


def test_throttling_is_retried_with_backoff(bucket: dict[str, bytes], proxy: FaultyProxy) -> None:
    proxy.reset()
    proxy.throttle(2)
    data = read_source(f"s3://{BUCKET}/animals/cat.jpg", limits())
    assert data == bucket["animals/cat.jpg"]
    gets = [r for r in proxy.requests if r[1] == "GET"]
    assert len(gets) == 3 and proxy.forwarded == 1  # two 503 SlowDown, then the object


def test_throttling_on_every_try_is_a_throttled_record(
    bucket: dict[str, bytes], proxy: FaultyProxy
) -> None:
    proxy.reset()
    proxy.throttle(100)
    try:
        with pytest.raises(ImageError) as info:
            read_source(f"s3://{BUCKET}/animals/cat.jpg", limits())
        asked = len(proxy.requests)
    finally:
        proxy.reset()
    assert info.value.code is ErrorCode.THROTTLED
    assert "SlowDown" in info.value.message and "after 2 retries" in info.value.message
    assert asked == 3, info.value.message  # IMGQ_S3_MAX_ATTEMPTS


class _Counter(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_redirect_is_not_followed_to_another_host(
    bucket: dict[str, bytes], proxy: FaultyProxy
) -> None:
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    proxy.reset()
    proxy.redirect(f"http://127.0.0.1:{other.server_address[1]}")
    try:
        with pytest.raises(ImageError) as info:
            read_source(f"s3://{BUCKET}/animals/cat.jpg", limits())
        asked = list(proxy.requests)
    finally:
        proxy.reset()
        other.shutdown()
        other.server_close()
    assert info.value.code is ErrorCode.FETCH_FAILED
    assert "a redirect, which imgq does not follow" in info.value.message
    assert _Counter.hits == [] and len(asked) == 1  # not re-sent either


def test_a_loopback_endpoint_is_refused_unless_allowed(bucket: dict[str, bytes]) -> None:
    saved = _set_env({"IMGQ_ALLOW_PRIVATE_URLS": None})
    try:
        assert _code(f"s3://{BUCKET}/animals/cat.jpg") is ErrorCode.URL_REFUSED
        with pytest.raises(SourceError, match="IMGQ_ALLOW_PRIVATE_URLS=true"):
            list(expand_s3(f"s3://{BUCKET}/"))
    finally:
        _set_env(saved)


def test_the_endpoint_is_resolved_once_per_client_not_per_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shared.s3

    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host == "store.internal":
            raise shared.s3.AddressRefused(f"{host} (10.0.0.7 is a private address)")
        return ["192.0.2.10"]

    monkeypatch.setattr(shared.s3, "public_addresses", resolve)
    public = Settings(s3_endpoint_url="http://store.example:9000", allow_private_urls=False)
    assert shared.s3.s3_client(public) is shared.s3.s3_client(public)
    assert asked == ["store.example"]
    # A refusal builds no client: the next call is checked again, and refused again.
    private = Settings(s3_endpoint_url="http://store.internal:9000", allow_private_urls=False)
    for _ in range(2):
        with pytest.raises(shared.s3.S3Error, match="IMGQ_ALLOW_PRIVATE_URLS=true"):
            shared.s3.s3_client(private)
    assert asked == ["store.example", "store.internal", "store.internal"]


def test_wrong_credentials_are_access_denied(bucket: dict[str, bytes]) -> None:
    # A server that checks signatures: moto with IAM authentication from the first call.
    strict = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    saved = _set_env({"IMGQ_S3_ENDPOINT_URL": strict.endpoint})
    try:
        assert _code(f"s3://{BUCKET}/animals/cat.jpg") is ErrorCode.ACCESS_DENIED
        with pytest.raises(SourceError, match="InvalidAccessKeyId"):
            list(expand_s3(f"s3://{BUCKET}/"))
    finally:
        _set_env(saved)
        strict.stop()


def test_endpoint_setting_must_be_http_and_is_redacted() -> None:
    saved = _set_env({"IMGQ_S3_ENDPOINT_URL": "ftp://user:hunter2@store:21"})
    try:
        with pytest.raises(SettingsError) as info:
            load_settings()
    finally:
        _set_env(saved)
    assert "IMGQ_S3_ENDPOINT_URL" in str(info.value) and "hunter2" not in str(info.value)
    assert Settings(s3_endpoint_url="http://minio:9000").s3_endpoint_url == "http://minio:9000"


# --- the producer lists -------------------------------------------------------------


def _refs(*sources: str) -> list[str]:
    return [r.ref for r in expand_sources(list(sources))]


def test_a_prefix_is_listed_recursively_by_image_extension(bucket: dict[str, bytes]) -> None:
    assert _refs(f"s3://{BUCKET}/") == [
        f"s3://{BUCKET}/{k}" for k in sorted(bucket) if not k.endswith(".txt")
    ]
    assert _refs(f"s3://{BUCKET}/animals") == [
        f"s3://{BUCKET}/animals/cat.jpg",
        f"s3://{BUCKET}/animals/deep/coffee.jpg",
    ]
    # A key with an image extension is taken as it is, without a request.
    assert _refs(f"s3://{BUCKET}/people/none.jpg") == [f"s3://{BUCKET}/people/none.jpg"]


def test_globs_match_keys(bucket: dict[str, bytes]) -> None:
    assert _refs(f"s3://{BUCKET}/**/*.jpg") == [
        f"s3://{BUCKET}/{k}" for k in sorted(bucket) if k.endswith(".jpg")
    ]
    assert _refs(f"s3://{BUCKET}/animals/*.jpg") == [f"s3://{BUCKET}/animals/cat.jpg"]
    assert _refs(f"s3://{BUCKET}/people/*.[pj]ng") == [f"s3://{BUCKET}/people/small.png"]
    with pytest.raises(SourceError, match="no image object matches"):
        _refs(f"s3://{BUCKET}/**/*.gif")
    assert glob_regex("a/**/b.jpg").fullmatch("a/b.jpg")
    assert not glob_regex("a/*.jpg").fullmatch("a/x/b.jpg")


def test_manifest_entries_may_name_objects(bucket: dict[str, bytes], tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"s3://{BUCKET}/people/\ns3://{BUCKET}/animals/cat.jpg\n")
    assert _refs(f"@{manifest}") == [
        f"s3://{BUCKET}/people/astronaut.jpg",
        f"s3://{BUCKET}/people/login.jpg",
        f"s3://{BUCKET}/people/small.png",
        f"s3://{BUCKET}/animals/cat.jpg",
    ]


def test_a_missing_bucket_is_one_line(bucket: dict[str, bytes]) -> None:
    with pytest.raises(SourceError, match=r"NoSuchBucket.*check the bucket's name"):
        _refs("s3://no-such-bucket/")


def test_a_listing_streams_page_by_page(bucket: dict[str, bytes], proxy: FaultyProxy) -> None:
    proxy.reset()
    refs = expand_s3(f"s3://{BUCKET}/", page_size=2)
    first = next(refs)
    assert first.ref == f"s3://{BUCKET}/animals/cat.jpg"
    assert len(proxy.requests) == 1  # one page asked for, not the whole listing
    rest = list(refs)
    assert len(rest) == 4
    assert len(proxy.requests) == 3  # 6 objects, 2 a page


# --- results to a bucket --------------------------------------------------------------


def test_a_large_export_is_a_multipart_upload(bucket: dict[str, bytes], moto: MotoServer) -> None:
    data = os.urandom(1024) * (PART_SIZE // 1024 * 2 + 3)
    with S3Writer("s3://results/big.bin") as sink:
        for i in range(0, len(data), 1_000_003):
            sink.write(data[i : i + 1_000_003])
    client = boto3.client("s3", endpoint_url=moto.endpoint)
    got = client.get_object(Bucket="results", Key="big.bin")
    assert got["Body"].read() == data
    assert got["ETag"].strip('"').endswith("-3")  # three parts


def test_a_failed_export_leaves_no_object_and_no_parts(
    bucket: dict[str, bytes], moto: MotoServer
) -> None:
    with pytest.raises(RuntimeError), S3Writer("s3://results/broken.bin") as sink:
        sink.write(b"x" * (PART_SIZE + 10))
        raise RuntimeError("the export failed half-way")
    client = boto3.client("s3", endpoint_url=moto.endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="results").get("Contents", [])]
    assert "broken.bin" not in keys
    assert not client.list_multipart_uploads(Bucket="results").get("Uploads")


# --- end to end: a worker reads the bucket, the results go to one ------------------------


@pytest.fixture(scope="module")
def s3_worker(
    start_worker: Callable[..., WorkerProcess], s3_env: dict[str, str], bucket: dict[str, bytes]
) -> Iterator[WorkerProcess]:
    w = start_worker(MODEL, name="s3", env=s3_env)
    w.module_owned = True
    yield w
    w.stop()


def test_submit_a_prefix_and_export_the_results_to_a_bucket(
    s3_worker: WorkerProcess,
    imgq_env: dict[str, str],
    s3_env: dict[str, str],
    moto: MotoServer,
    tmp_path: Path,
    redis_url: str,
) -> None:
    env = {**imgq_env, **s3_env}
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"s3://{BUCKET}/animals/\ns3://{BUCKET}/animals/gone.jpg\n")
    job_id = "s3-job-1"
    sources = [f"s3://{BUCKET}/people/", f"@{manifest}"]
    submitted = run_cli(
        ["submit", *sources, "-m", MODEL, "--job-id", job_id, "--wait", "--no-progress"], env
    )
    assert submitted.returncode == 0, submitted.stderr
    for fmt in ("parquet", "jsonl", "csv"):
        out = run_cli(["results", job_id, "--out", f"s3://results/{job_id}.{fmt}"], env)
        assert out.returncode == 0, out.stderr
    client = boto3.client("s3", endpoint_url=moto.endpoint)
    body = client.get_object(Bucket="results", Key=f"{job_id}.jsonl")["Body"].read()
    records = {r["image"]: r for r in map(json.loads, body.decode().splitlines())}
    assert set(records) == {
        f"s3://{BUCKET}/people/astronaut.jpg",
        f"s3://{BUCKET}/people/login.jpg",
        f"s3://{BUCKET}/people/small.png",
        f"s3://{BUCKET}/animals/cat.jpg",
        f"s3://{BUCKET}/animals/deep/coffee.jpg",
        f"s3://{BUCKET}/animals/gone.jpg",
    }
    errors = {k: (r["error"] or {}).get("code") for k, r in records.items()}
    assert errors[f"s3://{BUCKET}/animals/gone.jpg"] == "no_such_key"
    assert errors[f"s3://{BUCKET}/people/login.jpg"] == "not_an_image"
    assert sum(code is None for code in errors.values()) == 4  # one bad object fails no chunk
    import pyarrow.parquet as pq

    parquet = client.get_object(Bucket="results", Key=f"{job_id}.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(parquet)).num_rows == 6
    csv_text = client.get_object(Bucket="results", Key=f"{job_id}.csv")["Body"].read().decode()
    assert len(csv_text.strip().splitlines()) == 7
    # No credential is in the job record: only s3:// URLs travel.
    import zlib

    import redis

    r = redis.Redis.from_url(redis_url)

    def plain(element: bytes) -> bytes:  # chunks are kept zlib-compressed
        return element if element[:1] == b"[" else zlib.decompress(element)

    stored = b"".join(
        b"".join(str(v).encode() for v in (r.hgetall(k) if r.type(k) == b"hash" else {}).values())
        + b"".join(plain(e) for e in (r.lrange(k, 0, -1) if r.type(k) == b"list" else []))
        for k in r.scan_iter(f"*{job_id}*")
    )
    assert b"s3://photos/" in stored and SECRET.encode() not in stored


def test_an_s3_output_whose_bucket_is_missing_is_refused_before_work(
    imgq_env: dict[str, str], s3_env: dict[str, str], bucket: dict[str, bytes]
) -> None:
    env = {**imgq_env, **s3_env}
    result = run_cli(["results", "0" * 32, "--out", "s3://no-such-bucket/out.jsonl"], env)
    assert result.returncode == 2, result.stderr
    assert "does not exist" in result.stderr
    result = run_cli(["results", "0" * 32, "--out", "s3://results/"], env)
    assert result.returncode == 2 and "names no object" in result.stderr


def test_compose_has_an_optional_local_s3_store() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text("utf-8"))
    minio = compose["services"]["minio"]
    assert minio["profiles"] == ["s3"]  # only when asked for
    assert all(port.startswith("${MINIO_BIND:-127.0.0.1}:") for port in minio["ports"])
    assert minio["volumes"] == ["minio-data:/data"] and "minio-data" in compose["volumes"]
    env = compose["services"]["worker-resnet"]["environment"]
    assert env["IMGQ_S3_ENDPOINT_URL"] == "${IMGQ_S3_ENDPOINT_URL:-}"
    assert env["IMGQ_ALLOW_PRIVATE_URLS"] == "${IMGQ_ALLOW_PRIVATE_URLS:-false}"
    dockerfile = (root / "Dockerfile").read_text("utf-8")
    assert 'ARG IMAGE_EXTRAS="report postgres s3"' in dockerfile

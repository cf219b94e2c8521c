"""Redis with a password and TLS, from the URL alone (``rediss://``), end to end."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.api import Client
from shared.settings import Settings
from tests.conftest import WorkerProcess, free_port, run_cli

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pass_word"


def tls_redis_available() -> bool:
    binary = shutil.which("redis-server")
    if not binary or not shutil.which("openssl"):
        return False
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "1"], capture_output=True, text=True, timeout=10
    )
    return "tls-cert-file" in out.stdout + out.stderr  # built with TLS: asks for a cert


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, signed by it."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=imgq test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.pem",
    )
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.fixture
def tls_url(tmp_path: Path) -> Iterator[str]:
    if not tls_redis_available():
        pytest.skip("needs a redis-server built with TLS, and openssl")
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "TLS Redis did not start"
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_job_over_tls_with_a_password(
    tls_url: str,
    imgq_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    photos: Path,
) -> None:
    worker = start_worker("tfault", name="tls", env={"IMGQ_BROKER_URL": tls_url})
    client = Client(Settings(broker_url=tls_url, models_file=imgq_env["IMGQ_MODELS_FILE"]))
    sources = sorted(str(p) for p in photos.glob("*.jpg"))
    job = client.submit(sources, models=["tfault"])
    job.wait(progress=False, timeout=120)
    assert [r.error for r in job.results()] == [None, None, None]
    worker.stop()

    # The same server without the password, or without trusting its CA, is refused.
    wrong = tls_url.replace(PASSWORD, "wrong")
    proc = run_cli(["status", job.job_id], {**imgq_env, "IMGQ_BROKER_URL": wrong})
    assert proc.returncode == 1 and "cannot reach Redis" in proc.stderr
    assert PASSWORD not in proc.stderr and "wrong" not in proc.stderr  # no secret in errors
    untrusted = tls_url.split("&ssl_ca_certs=")[0]
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(untrusted).ping()

"""Fixtures on real parts: a real Redis, real SavedModels, real worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.browser import Browser, chromium_binary

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("IMGQ_TEST_ARTIFACTS", ROOT / "test-artifacts"))

# The models the end-to-end tests serve: name -> (classes, output kind, activation, labels).
TEST_MODELS: dict[str, tuple[int, str, str, str]] = {
    "t1001": (1001, "logits", "softmax", "imagenet1k-background"),
    "t21k": (21843, "logits", "sigmoid", "imagenet21k"),
    "tprobs": (1000, "probs", "none", "imagenet1k"),
    "tcustom": (7, "dict", "softmax", "custom-labels.txt"),
    "tpoison": (1000, "logits", "softmax", "imagenet1k"),
}
# Served by no shared worker: tests that start workers of their own use these.
SOLO_MODELS: dict[str, tuple[int, str, str, str]] = {
    "tsolo": (7, "dict", "softmax", "custom-labels.txt"),
    "tfault": (1000, "logits", "softmax", "imagenet1k"),
    "tabort": (1000, "logits", "softmax", "imagenet1k"),
}
CUSTOM_LABELS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """A redis-server: the one on PATH (built with TLS on Debian), else the one that
    ``imgq run`` embeds."""
    from producer.embedded import redis_server_binary as embedded_binary

    return shutil.which("redis-server") or embedded_binary()


class RedisServer:
    """A throwaway Redis on a free loopback port, data in its own folder."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """IMGQ_TEST_REDIS_URL when set (its database is flushed), else a throwaway server."""
    url = os.environ.get("IMGQ_TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test SavedModels and a models TOML file naming them."""
    from tests.savedmodels import build_classifier

    base = tmp_path_factory.mktemp("models")
    (base / "custom-labels.txt").write_text("\n".join(CUSTOM_LABELS) + "\n", encoding="utf-8")
    lines = []
    all_models = {**TEST_MODELS, **SOLO_MODELS}
    for seed, (name, (classes, output, activation, labels)) in enumerate(all_models.items()):
        build_classifier(
            base / name,
            classes,
            output=output,
            seed=seed,
            fail_on_bright=name == "tpoison",
            abort_on_bright=name == "tabort",
        )
        lines += [
            f"[models.{name}]",
            f'handle = "{name}"',
            "input_size = 32",
            f'activation = "{activation}"',
            f'labels = "{labels}"',
            "",
        ]
    (base / "models.toml").write_text("\n".join(lines), encoding="utf-8")
    return base


@pytest.fixture(scope="session")
def imgq_env(redis_url: str, models_dir: Path) -> dict[str, str]:
    """The environment a producer or worker of the tests runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    env.update(
        IMGQ_BROKER_URL=redis_url,
        IMGQ_MODELS_FILE=str(models_dir / "models.toml"),
        IMGQ_BATCH_SIZE="8",
        IMGQ_CHUNK_SIZE="4",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """A real ``imgq worker`` process, logging to a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, name: str) -> None:
        self.proc = proc
        self.log = log
        self.name = name

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def wait_ready(worker: WorkerProcess, timeout: float = 120) -> None:
    """Wait until the worker logs that it is ready (models loaded, consuming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in worker.output():
            return
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.proc.returncode}):\n{worker.output()}")
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready after {timeout} s:\n{worker.output()}")


@pytest.fixture(scope="session")
def start_worker(
    imgq_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``imgq worker`` processes; all are stopped at the end of the session."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(
        *models: str,
        name: str | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        node = name or f"w{len(started)}-{'-'.join(models)}"
        log = logs / f"{node}.log"
        cmd = [sys.executable, "-m", "producer.cli", "worker", "--hostname", f"{node}@%h", *args]
        for m in models:
            cmd += ["--model", m]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**imgq_env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(proc, log, node)
        started.append(worker)
        if wait:
            wait_ready(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def shared_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    """One worker serving every test model, for the tests that need just one."""
    return start_worker(*TEST_MODELS, name="shared")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photos (scikit-image's samples) as JPEG files."""
    from tests.corpus import build_good_photos

    folder = tmp_path_factory.mktemp("photos")
    build_good_photos(folder)
    return folder


@pytest.fixture
def client(imgq_env: dict[str, str]) -> Iterator[object]:
    """A producer Client configured like the tests' workers."""
    from producer.api import Client
    from shared.settings import Settings

    saved = {k: os.environ.get(k) for k in imgq_env}
    os.environ.update(imgq_env)
    try:
        yield Client(Settings())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def run_cli(
    args: list[str], env: dict[str, str], *, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``imgq`` command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium with a page attached."""
    binary = chromium_binary()
    b = Browser(binary, tmp_path / "chromium-profile")
    try:
        b.open_page()
        yield b
    finally:
        b.close()

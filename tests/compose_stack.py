"""The deployment test's parts: a Docker Engine, the images it builds, and one compose
project of docker-compose.yml with the test's override (``deploy/test/``).

Nothing here is a stand-in for imgq: the image is the project's Dockerfile, the
stack is the project's compose file. Only the third-party images (Redis,
PostgreSQL, Prometheus) are replaced, by images of Debian's own servers built from
a Debian base that ``deploy/test/debian-base.sh`` makes with debootstrap, because
the test may run where no image registry can be reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_TEST = ROOT / "deploy" / "test"
BASE_IMAGE = "imgq-debian-base:bookworm"
STANDINS = {
    "redis": "imgq-standin-redis:latest",
    "postgres": "imgq-standin-postgres:latest",
    "prometheus": "imgq-standin-prometheus:latest",
}
IMGQ_IMAGE = "imgq-deploy-test:latest"
# The compose files of the two layouts: one Redis, and Redis with Sentinel.
SINGLE = ("docker-compose.yml", "deploy/test/compose.override.yml")
SENTINEL = (
    "docker-compose.yml",
    "deploy/docker-compose.sentinel.yml",
    "deploy/test/compose.override.yml",
    "deploy/test/sentinel.override.yml",
)


class EngineUnavailable(RuntimeError):
    """No Docker Engine (or no Compose v2) here; the message says why."""


def docker(
    *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS``; CalledProcessError (with its output) when it fails and ``check``."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, result.args, result.stdout, result.stderr
        )
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def docker_engine(log: Path) -> Iterator[None]:
    """A Docker Engine that answers, with Compose v2: the running one, else ``dockerd``
    started here (as root) and stopped on exit. EngineUnavailable says why there is none.
    """
    if shutil.which("docker") is None:
        raise EngineUnavailable("no docker CLI (deploy/test/install-engine.sh installs it)")
    proc: subprocess.Popen[bytes] | None = None
    if not _engine_answers():
        if os.environ.get("DOCKER_HOST"):
            raise EngineUnavailable(
                f"the engine at DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer"
            )
        if shutil.which("dockerd") is None:
            raise EngineUnavailable(
                "no Docker Engine answers and dockerd is not installed "
                "(deploy/test/install-engine.sh installs it)"
            )
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker Engine answers, and starting dockerd needs root")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                proc.wait(30)
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise EngineUnavailable("dockerd did not start: " + " | ".join(tail))
            time.sleep(0.5)
    try:
        version = docker("compose", "version", "--short", check=False)
        if version.returncode != 0:
            raise EngineUnavailable(
                "no Docker Compose v2 plugin (`docker compose`); "
                "deploy/test/install-engine.sh installs it"
            )
        major, minor = (int(p) for p in version.stdout.strip().lstrip("v").split(".")[:2])
        if (major, minor) < (2, 24):
            raise EngineUnavailable(f"Compose {version.stdout.strip()} lacks !reset (2.24+)")
        yield
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


@dataclass
class BuildFigures:
    """What building the images cost, for the deployment notes."""

    base_seconds: float = 0.0
    standins_seconds: float = 0.0
    imgq_seconds: float = 0.0
    imgq_size_bytes: int = 0
    imgq_cached: bool = False


def build_images(figures: BuildFigures) -> None:
    """The Debian base (once per host), the stand-ins and the imgq image, in that order.

    Every build uses the host network (the only way out to the package registries)
    and Docker's layer cache: after the first run only changed layers are rebuilt.
    """
    start = time.monotonic()
    subprocess.run(
        [str(DEPLOY_TEST / "debian-base.sh"), BASE_IMAGE], check=True, capture_output=True
    )
    figures.base_seconds = time.monotonic() - start
    start = time.monotonic()
    for target, tag in STANDINS.items():
        docker(
            "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "-f", str(DEPLOY_TEST / "standins.Dockerfile"), "--target", target,
            "-t", tag, str(DEPLOY_TEST), timeout=900,
        )  # fmt: skip
    figures.standins_seconds = time.monotonic() - start
    start = time.monotonic()
    built = docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-t", IMGQ_IMAGE, str(ROOT), timeout=1800,
    )  # fmt: skip
    figures.imgq_seconds = time.monotonic() - start
    figures.imgq_cached = step_was_cached(built.stdout, "pip install -r")
    figures.imgq_size_bytes = int(
        docker("image", "inspect", "--format", "{{.Size}}", IMGQ_IMAGE).stdout.strip()
    )


def step_was_cached(build_output: str, step: str) -> bool:
    """Whether the build step whose instruction contains ``step`` came from the layer
    cache (the builder prints "Using cache" right after such a step)."""
    lines = build_output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Step ") and step in line:
            return i + 1 < len(lines) and "Using cache" in lines[i + 1]
    return False


@dataclass
class Compose:
    """One compose project: its name, its environment file, and the files it layers."""

    workdir: Path
    env: dict[str, str]
    project: str = field(default_factory=lambda: f"imgqdeploy{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.env_file = self.workdir / "compose.env"
        self.env_file.write_text(
            "".join(f"{key}={value}\n" for key, value in self.env.items()), encoding="utf-8"
        )

    def run(
        self,
        *args: str,
        files: Sequence[str] = SINGLE,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``docker compose`` on this project with ``files`` layered in order."""
        argv = ["compose", "-p", self.project, "--project-directory", str(ROOT)]
        for name in files:
            argv += ["-f", str(ROOT / name)]
        argv += ["--env-file", str(self.env_file), *args]
        # A variable of the caller's shell would win over the env file: none is passed.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
        return docker(*argv, timeout=timeout, check=check, env=env)

    def containers(self, service: str | None = None, *, every: bool = False) -> list[str]:
        """Ids of the project's containers (of one service), running or ``every`` one."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = docker("ps", "-q", "--no-trunc", *(["-a"] if every else []), *filters).stdout
        return out.split()

    def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, networks and volumes that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.containers(every=True),
            "networks": docker("network", "ls", "-q", "--filter", label).stdout.split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).stdout.split(),
        }

    def down(self) -> None:
        """Remove every container, network and volume of the project, whichever layout
        and profiles started them."""
        for files in (SENTINEL, SINGLE):
            self.run(
                "--profile", "*", "down", "--volumes", "--remove-orphans", "--timeout", "10",
                files=files, timeout=300, check=False,
            )  # fmt: skip

    def logs(self) -> str:
        """Every service's log so far (for a failing test's report)."""
        return self.run("--profile", "*", "logs", "--no-color", files=SENTINEL, check=False).stdout


@dataclass
class Flower:
    """Flower's HTTP API on the published port, with its basic-auth login."""

    url: str
    auth: tuple[str, str]

    def get(self, path: str, **params: Any) -> Any:
        resp = httpx.get(self.url + path, auth=self.auth, params=params, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def online_workers(self) -> set[str]:
        """Node names of the workers Flower sees online."""
        try:
            workers = self.get("/api/workers", refresh=1, status=1)
        except (httpx.HTTPError, json.JSONDecodeError):
            return set()
        return {name for name, up in workers.items() if up}

    def job_tasks(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Flower's tasks whose arguments name ``job_id``."""
        try:
            tasks: dict[str, dict[str, Any]] = self.get("/api/tasks", search=job_id)
        except (httpx.HTTPError, json.JSONDecodeError):
            return {}
        return tasks

"""The deployment files: docker-compose.yml as a real compose implementation
resolves it, every command a service runs as the CLI it names parses it, and the
Kubernetes manifests for the GPU workers and their KEDA autoscaling."""

from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from shared.priority import queue_lists
from shared.registry import BUILTIN_MODELS, queue_for
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"

IMGQ_SERVICES = ("flower", "metrics", "worker-resnet", "worker-bit", "producer")
WORKERS = ("worker-resnet", "worker-bit")
REQUIRED_VARIABLES = ("REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")


# --- helpers -------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def compose_binary() -> str:
    """Debian's docker-compose; skipped where it is missing, except under CI."""
    found = shutil.which("docker-compose")
    if found:
        return found
    message = "docker-compose is not installed (apt-get install -y docker-compose)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the compose checks")
    pytest.skip(message)


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on the project's compose file with only ``env_file``.

    The command runs with a bare environment: a variable set in the shell would
    override the env file and hide a missing one.
    """
    return subprocess.run(
        [
            compose_binary(),
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "config",
        ],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def argv_of(command: str | list[str]) -> list[str]:
    """A service's command as an argument list (compose may keep it a string)."""
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, published port, container port) of each published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # long syntax
            out.append(
                (str(port.get("host_ip", "")), str(port.get("published")), str(port["target"]))
            )
        else:
            parts = str(port).split("/")[0].split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            out.append((host_ip, parts[-2], parts[-1]))
    return out


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's volumes."""
    out: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):  # long syntax
            out[volume["target"]] = (str(volume.get("source")), bool(volume.get("read_only")))
        else:
            source, target, *mode = str(volume).split(":")
            out[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return out


def seconds(duration: str | int | float) -> float:
    """A compose duration ('5m', '1m30s', '90s') in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _remaining_args(ctx: click.Context) -> list[str]:
    # Click 8.2+ deprecates protected_args (Click 9 leaves every token in args).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [*getattr(ctx, "protected_args", []), *ctx.args]


def parse_imgq(argv: list[str]) -> tuple[str, click.Context]:
    """Parse an ``imgq ...`` command line as the CLI would, without running it.

    Raises click.UsageError (NoSuchOption, BadParameter, MissingParameter, ...)
    for anything the CLI would refuse.
    """
    from producer.cli import main

    assert argv and argv[0] == "imgq", argv
    assert not {"-h", "--help", "--version"} & set(argv), "eager options would exit"
    group_ctx = main.make_context("imgq", argv[1:])
    name, command, rest = main.resolve_command(group_ctx, _remaining_args(group_ctx))
    assert name is not None and command is not None
    return name, command.make_context(name, rest, parent=group_ctx)


def flower_options() -> Any:
    """Tornado's option registry with Flower's options defined in it."""
    importlib.import_module("flower.options")
    from tornado.options import options

    return options


def check_flower_args(args: list[str]) -> None:
    """Every Flower argument is a real Flower option with a value its type accepts.

    Flower silently drops arguments that are not its options, so a misspelled
    one would be ignored at run time, not refused: this is the only check.
    """
    options = flower_options()
    for arg in args:
        assert arg.startswith("--"), f"flower takes --name=value options only, got {arg!r}"
        name, has_value, value = arg[2:].partition("=")
        key = name.replace("_", "-")
        if key not in options._options:
            raise AssertionError(f"flower has no option --{name}")
        option = copy.copy(options._options[key])
        if not has_value:
            # Tornado's parser takes no separate value: only a flag may stand alone.
            assert option.type is bool, f"--{name} needs --{name}=VALUE"
            continue
        try:
            option.parse(value)
        except Exception as exc:  # tornado raises ValueError, Error, ...
            raise AssertionError(f"flower --{name}={value}: {exc}") from exc


def check_celery_flower(argv: list[str]) -> list[str]:
    """Parse ``celery -A APP flower ...``; return Flower's own arguments."""
    from celery.bin.celery import celery

    assert argv[0] == "celery", argv
    ctx = celery.make_context("celery", argv[1:])
    name, _command, rest = celery.resolve_command(ctx, _remaining_args(ctx))
    assert name == "flower", argv
    app_path = ctx.params["app"]
    module_name, _, attr = app_path.partition(":")
    module = importlib.import_module(module_name)
    from celery import Celery

    assert isinstance(getattr(module, attr or "app"), Celery), app_path
    check_flower_args(rest)
    return rest


def check_command(argv: list[str]) -> None:
    """Check a command line of the one image: ``imgq ...`` or ``celery ... flower``."""
    if argv[0] == "imgq":
        _command, ctx = parse_imgq(argv)
        for model in ctx.params.get("models") or ():
            assert model in BUILTIN_MODELS, f"{argv}: {model!r} is not a built-in model"
    elif argv[0] == "celery":
        check_celery_flower(argv)
    else:
        raise AssertionError(f"a command the image has no check for: {argv}")


# --- docker-compose.yml ----------------------------------------------------------


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as resolved by docker-compose with .env.example."""
    env_file = tmp_path_factory.mktemp("compose") / "example.env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = run_compose_config(env_file)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def test_compose_has_every_service(services: dict[str, Any]) -> None:
    assert {"redis", *IMGQ_SERVICES} <= set(services)


def test_imgq_services_run_one_image_and_differ_by_command(services: dict[str, Any]) -> None:
    images = {services[name]["image"] for name in IMGQ_SERVICES}
    assert len(images) == 1, images
    for name in IMGQ_SERVICES:
        service = services[name]
        assert service["command"], name
        assert "entrypoint" not in service, name
        assert Path(service["build"]["context"]) == ROOT, name
        assert service["build"]["args"]["TF_PACKAGE"] == "tensorflow-cpu", name
        # Every imgq service waits for a healthy Redis.
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_imgq_services_use_the_password_protected_broker(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    password = env_example["REDIS_PASSWORD"]
    for name in IMGQ_SERVICES:
        env = environment_of(services[name])
        assert env["IMGQ_BROKER_URL"] == f"redis://:{password}@redis:6379/0", name


def test_imgq_environment_is_valid_settings(services: dict[str, Any]) -> None:
    known = {f"IMGQ_{field.upper()}" for field in Settings.model_fields}
    for name in IMGQ_SERVICES:
        env = {k: v for k, v in environment_of(services[name]).items() if k.startswith("IMGQ_")}
        assert set(env) <= known, f"{name}: unknown settings {sorted(set(env) - known)}"
        Settings.model_validate({k.removeprefix("IMGQ_").lower(): v for k, v in env.items()})


def test_workers_reserve_a_gpu_and_can_scale(services: dict[str, Any]) -> None:
    for name in WORKERS:
        service = services[name]
        # A fixed container_name would make `--scale` fail.
        assert "container_name" not in service, name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert device.get("count") == 1 or device.get("device_ids"), name


def test_workers_share_the_tfhub_cache_and_read_images_where_the_producer_does(
    services: dict[str, Any],
) -> None:
    match = re.search(r"TFHUB_CACHE_DIR=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert match, "the Dockerfile sets TFHUB_CACHE_DIR"
    cache_dir = match.group(1)
    assert cache_dir == "/cache/tfhub"
    producer_images = mounts(services["producer"])["/images"]
    cache_sources = set()
    for name in WORKERS:
        volumes = mounts(services[name])
        source, read_only = volumes[cache_dir]
        assert not source.startswith(("/", ".")), f"{name}: the cache is a named volume"
        assert not read_only, f"{name}: workers download models into the cache"
        cache_sources.add(source)
        assert volumes["/images"] == (producer_images[0], True), name
        env = environment_of(services[name])
        assert env["IMGQ_ALLOWED_ROOTS"] == "/images", name
        assert env.get("TFHUB_CACHE_DIR", cache_dir) == cache_dir, name
    assert len(cache_sources) == 1, cache_sources
    assert "tfhub-cache" in cache_sources


def test_workers_stop_with_time_to_finish_a_chunk(services: dict[str, Any]) -> None:
    for name in WORKERS:
        assert seconds(services[name]["stop_grace_period"]) >= 60, name


def test_worker_commands_use_a_thread_or_solo_pool(services: dict[str, Any]) -> None:
    for name in WORKERS:
        argv = argv_of(services[name]["command"])
        command, ctx = parse_imgq(argv)
        assert command == "worker", name
        assert ctx.params["pool"] in ("threads", "solo"), name
        assert ctx.params["models"], name


def test_redis_is_durable_password_protected_and_checked(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    redis = services["redis"]
    assert str(redis["image"]).split(":")[0] == "redis"
    argv = argv_of(redis["command"])
    assert argv[argv.index("--appendonly") + 1] == "yes"
    # Queued tasks compressed (docs/operations.md, "Sizing Redis").
    assert argv[argv.index("--list-compress-depth") + 1] == "1"
    password = env_example["REDIS_PASSWORD"]
    assert argv[argv.index("--requirepass") + 1] == password
    test = argv_of(redis["healthcheck"]["test"])
    joined = " ".join(test)
    assert "redis-cli" in joined and "ping" in joined
    # The check authenticates: REDISCLI_AUTH, or the password given to redis-cli.
    assert environment_of(redis).get("REDISCLI_AUTH") == password or password in joined
    # Without a password redis-cli still exits 0 ("NOAUTH ..."): look for PONG.
    assert "PONG" in joined
    source, _ = mounts(redis)["/data"]
    assert not source.startswith(("/", ".")), "Redis data is a named volume"
    for host_ip, _published, _target in published_ports(redis):
        assert host_ip == "127.0.0.1", "Redis is published on loopback only by default"


def test_flower_is_authenticated_persistent_and_local(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    flower = services["flower"]
    env = environment_of(flower)
    expected = f"{env_example['FLOWER_USER']}:{env_example['FLOWER_PASSWORD']}"
    assert env["FLOWER_BASIC_AUTH"] == expected
    from flower.command import is_flower_envvar

    for key in env:
        if key.startswith("FLOWER_"):
            assert is_flower_envvar(key), f"Flower does not read {key}"
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    args = check_celery_flower(argv_of(flower["command"]))
    values = dict(a[2:].partition("=")[::2] for a in args)
    assert values["persistent"] == "True"
    db_dir = str(Path(values["db"]).parent)
    source, read_only = mounts(flower)[db_dir]
    assert not read_only and not source.startswith(("/", ".")), "Flower state is a named volume"
    ports = published_ports(flower)
    assert ports == [("127.0.0.1", "5555", values.get("port", "5555"))]


def test_producer_runs_only_when_asked(services: dict[str, Any]) -> None:
    producer = services["producer"]
    assert "tools" in producer["profiles"]
    command, ctx = parse_imgq(argv_of(producer["command"]))
    assert command == "submit"
    assert ctx.params["wait"] and ctx.params["out"].startswith("/results/")
    assert "/results" in mounts(producer)
    # The sources it submits are under the images mount the workers share.
    assert all(src.startswith("/images") for src in ctx.params["sources"])


def test_every_command_is_accepted_by_its_cli(services: dict[str, Any]) -> None:
    checked = 0
    for name, service in services.items():
        if name == "redis" or "command" not in service:
            continue
        check_command(argv_of(service["command"]))
        checked += 1
    assert checked == len(IMGQ_SERVICES)


@pytest.mark.parametrize("variable", REQUIRED_VARIABLES)
def test_compose_refuses_a_missing_secret(tmp_path: Path, variable: str) -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not line.strip().startswith(f"{variable}=")]
    assert len(kept) == len(lines) - 1, f".env.example sets {variable} once"
    env_file = tmp_path / "missing.env"
    env_file.write_text("\n".join(kept) + "\n", encoding="utf-8")
    result = run_compose_config(env_file)
    assert result.returncode != 0, f"config succeeded without {variable}"
    assert variable in result.stderr


def test_env_example_lists_exactly_the_compose_variables() -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text("utf-8")))
    listed = set(read_env_file(ENV_EXAMPLE))
    assert used - listed == set(), "compose variables missing from .env.example"
    assert listed - used == set(), ".env.example variables that compose does not use"


def test_dockerfile_builds_one_non_root_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    # python:3.11-slim unless the build names another base.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.findall(r"^FROM\s+(.+)$", text, re.M) == ["${BASE_IMAGE}"]
    assert re.search(r"^ARG TF_PACKAGE=tensorflow-cpu$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not re.search(r"^ENTRYPOINT", text, re.M), "services choose their command"
    # The build swaps tensorflow-cpu out of the worker extra; it must be there.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    worker = project["optional-dependencies"]["worker"]
    assert sum(req.startswith("tensorflow-cpu") for req in worker) == 1
    assert ".env" in (ROOT / ".dockerignore").read_text("utf-8").split()


# --- the checkers themselves ---------------------------------------------------


def test_imgq_check_refuses_a_misspelled_option() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_imgq(["imgq", "worker", "--modle", "resnet50"])
    with pytest.raises(click.BadParameter):
        parse_imgq(["imgq", "worker", "--model", "resnet50", "--pool", "prefork"])
    with pytest.raises(click.UsageError):
        parse_imgq(["imgq", "wroker", "--model", "resnet50"])
    with pytest.raises(AssertionError, match="not a built-in model"):
        check_command(["imgq", "worker", "--model", "resnet5O"])


def test_flower_check_refuses_unknown_options_and_bad_values() -> None:
    check_celery_flower(["celery", "-A", "workers.app", "flower", "--port=5555"])
    with pytest.raises(AssertionError, match="no option --persistant"):
        check_flower_args(["--persistant=True"])
    with pytest.raises(AssertionError, match="needs --port=VALUE"):
        check_flower_args(["--port", "5555"])
    with pytest.raises(AssertionError, match="--port=fifty"):
        check_flower_args(["--port=fifty"])


# --- deploy/k8s ------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    files = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))
    assert files, "deploy/k8s has manifests"
    docs = []
    for path in files:
        docs += [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def container_argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in (*container.get("command", []), *container.get("args", []))]


def test_k8s_gpu_worker_deployment(k8s_docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(k8s_docs, "Deployment")
    assert deployments
    for deployment in deployments:
        assert deployment["apiVersion"] == "apps/v1"
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = worker_container(deployment)
        argv = container_argv(container)
        check_command(argv)
        command, ctx = parse_imgq(argv)
        assert command == "worker" and ctx.params["pool"] in ("threads", "solo")
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        env = {e["name"]: e for e in container["env"]}
        secret = env["IMGQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]
        assert secret["name"] and secret["key"]
        assert env["IMGQ_ALLOWED_ROOTS"]["value"] == "/images"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/cache/tfhub" in mounted
        assert mounted["/images"].get("readOnly") is True
        for mount in mounted.values():
            assert mount["name"] in volumes
        # Not Ready (a rollout waits) until the models are loaded and warm; a GPU
        # that is not usable stops the pod instead of running on the CPU.
        probe = container["startupProbe"]
        assert probe["exec"]["command"] == ["test", "-f", env["IMGQ_READY_FILE"]["value"]]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
        assert env["IMGQ_REQUIRE_GPU"]["value"] == "true"
        # CUDA's kernel cache survives the pod (H100/H200 kernels compiled once).
        cuda_cache = env["CUDA_CACHE_PATH"]["value"]
        assert any(cuda_cache.startswith(path + "/") for path in mounted if path != "/images")


def test_keda_scales_the_worker_on_its_queue(k8s_docs: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(k8s_docs, "Deployment")}
    auths = {d["metadata"]["name"] for d in of_kind(k8s_docs, "TriggerAuthentication")}
    scaled = of_kind(k8s_docs, "ScaledObject")
    assert scaled
    queues = set()
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments, f"{target} is not a Deployment here"
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        _, ctx = parse_imgq(container_argv(worker_container(deployments[target])))
        (model,) = ctx.params["models"]
        # Celery's Redis transport keeps the queue as one list per priority level:
        # a trigger for each, so that every job's backlog counts.
        lists = [t["metadata"]["listName"] for t in spec["triggers"]]
        assert sorted(lists) == sorted(queue_lists(queue_for(model)))
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            metadata = trigger["metadata"]
            assert int(metadata["listLength"]) >= 1
            assert re.fullmatch(r"[\w.-]+:\d+", metadata["address"])
            auth = trigger.get("authenticationRef", {}).get("name")
            assert auth in auths or "passwordFromEnv" in metadata
        queues.add(queue_for(model))
    assert "imgq.resnet50" in queues


def test_postgres_service_is_optional_local_and_keeps_its_data() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text("utf-8"))
    pg = raw["services"]["postgres"]
    assert pg["profiles"] == ["postgres"]  # only with IMGQ_RESULTS_URL pointing at it
    assert pg["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    assert pg["ports"] == ["${POSTGRES_BIND:-127.0.0.1}:${POSTGRES_PORT:-5432}:5432"]
    volume = pg["volumes"][0].split(":")
    assert volume == ["postgres-data", "/var/lib/postgresql/data"]
    assert "postgres-data" in raw["volumes"]
    for name in WORKERS:
        assert raw["services"][name]["environment"]["IMGQ_RESULTS_URL"] == (
            "${IMGQ_RESULTS_URL:-redis}"
        )
    env = read_env_file(ENV_EXAMPLE)
    assert env["IMGQ_RESULTS_URL"] == "redis" and env["POSTGRES_BIND"] == "127.0.0.1"

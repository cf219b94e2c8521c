"""The compose `monitoring` profile: Prometheus scrapes every exporter, Grafana gets the
dashboard, both on loopback; the dashboard JSON is valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import (
    ENV_EXAMPLE,
    ROOT,
    WORKERS,
    environment_of,
    mounts,
    published_ports,
    run_compose_config,
)

MONITORING = ROOT / "deploy" / "monitoring"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / "example.env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = run_compose_config(env_file)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"])


def test_monitoring_services_are_a_profile_on_loopback(services: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert {host for host, _, _ in published_ports(services[name])} == {"127.0.0.1"}, name
        for target, (source, read_only) in mounts(services[name]).items():
            if source.startswith(str(ROOT)):  # the project's files, mounted read-only
                assert Path(source).is_file() and read_only, (name, target)


def test_prometheus_scrapes_every_exporter(services: dict[str, Any]) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["imgq-flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    assert jobs["imgq-queues"]["static_configs"][0]["targets"] == ["metrics:9808"]
    (dns,) = jobs["imgq-workers"]["dns_sd_configs"]
    assert set(dns["names"]) == set(WORKERS)
    for name in WORKERS:
        env = environment_of(services[name])
        assert env["IMGQ_WORKER_METRICS_PORT"] == str(dns["port"]), name
        assert env["IMGQ_WORKER_METRICS_ADDR"] == "0.0.0.0", name


def test_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    board = json.loads((MONITORING / "grafana" / "imgq.json").read_text(encoding="utf-8"))
    source = yaml.safe_load((MONITORING / "grafana" / "datasource.yml").read_text("utf-8"))
    uid = source["datasources"][0]["uid"]
    assert board["panels"]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]

"""docker-compose.yml, checked without a Docker engine: every command is one this project
has, every environment variable is one the settings know, Flower stays on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from common.redis import die_with_parent, free_port
from common.settings import (
    ApiSettings,
    FlowerSettings,
    MetricsSettings,
    NodeSettings,
    ScalerSettings,
    ServingSettings,
    WorkerSettings,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def known_variables() -> set[str]:
    names = set()
    for cls in (
        ServingSettings, WorkerSettings, ScalerSettings, FlowerSettings, MetricsSettings,
        ApiSettings, NodeSettings,
    ):  # fmt: skip
        prefix = cls.model_config.get("env_prefix", "")
        names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_every_service_runs_a_command_of_this_project(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "beat", "flower", "api", "prometheus"} <= set(services)
    assert any(name.startswith("worker") for name in services)
    for name, service in services.items():
        if "build" not in service:
            continue
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            module = ROOT / command[2]
            assert (module / "__main__.py").is_file() or module.with_suffix(".py").is_file()
            continue
        assert command[:3] == ["celery", "-A", "workers"], name
        assert command[3] in {"worker", "beat", "flower"}, name
    assert (ROOT / "workers.py").is_file() and (ROOT / "flowerconfig.py").is_file()
    assert (ROOT / "Dockerfile").is_file()
    # Prometheus scrapes the API service by its compose name and port.
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"api:{ApiSettings().port}"
    for volume in services["prometheus"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).exists()


def test_every_environment_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = known_variables()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            assert variable in known, f"{name}: {variable} is not a setting"


def test_redis_persists_workers_reserve_a_gpu_flower_is_protected(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "--appendonly" in services["redis"]["command"]
    for name, service in services.items():
        if name.startswith("worker"):
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"]
    flower = services["flower"]
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    api = services["api"]
    assert all(str(port).startswith("127.0.0.1:") for port in api["ports"])
    assert "API_TOKEN" in api["environment"]


def test_flower_listens_on_loopback_by_default(redis_server: Any, tmp_path: Path) -> None:
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 45
        listening: list[str] = []
        while not listening and time.monotonic() < deadline:
            assert flower.poll() is None, "flower exited"
            listening = [
                c.laddr.ip for c in psutil.Process(flower.pid).net_connections()
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]  # fmt: skip
            time.sleep(0.1)
        assert listening and set(listening) <= {"127.0.0.1"}, listening
    finally:
        flower.terminate()
        flower.wait(10)


def test_the_gpu_host_compose_runs_the_node_agent_with_every_gpu() -> None:
    node_compose = yaml.safe_load((ROOT / "deploy" / "node-compose.yml").read_text())
    node = node_compose["services"]["node"]
    assert node["command"][:4] == ["celery", "-A", "workers", "node"]
    assert (ROOT / node["build"].replace("..", ".") / "Dockerfile").is_file()
    known = known_variables()
    for variable in node["environment"]:
        assert variable in known, f"node: {variable} is not a setting"
    assert "REDIS_URL" in node["environment"] and ":?" in node["environment"]["REDIS_URL"]
    devices = node["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == "all" and devices[0]["capabilities"] == ["gpu"]
    assert node["volumes"][0].split(":")[0] == "../model_repository"
    # The agent is a Celery sub-command this install registers.
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "node", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "node agent" in out.stdout, out.stderr
    unit = (ROOT / "deploy" / "inference-node.service").read_text()
    assert "celery -A workers node" in unit and "KillSignal=SIGTERM" in unit

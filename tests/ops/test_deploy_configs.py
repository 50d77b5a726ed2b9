"""Every gateway config the deployment artifacts ship is one the gateway accepts.

The compose stack's config file, the sidecar example's ConfigMap and the Helm chart's `config`
for its defaults and each values-*.yaml go through the gateway's own loader, with the
environment those deployments set (listen ports, admin listener, Redis URL), so that a chart or
manifest can never ship a config the process would refuse at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "liutong-gateway"
SIDECAR_EXAMPLE = REPO / "deploy" / "kubernetes" / "sidecar-example.yaml"
COMPOSE = REPO / "deploy" / "docker-compose.yml"


def coalesce(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the chart's values: maps merge, the rest is replaced."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = coalesce(merged[key], value)
        else:
            merged[key] = value
    return merged


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def load(tmp_path: Path, config: Mapping[str, Any] | str, env: dict[str, str]) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(dict(config)))
    return load_settings(str(path), env=env)


def test_compose_config(tmp_path: Path) -> None:
    gateway = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]
    env = {k: str(v) for k, v in gateway["environment"].items() if k != "LIUTONG_CONFIG"}
    settings = load(tmp_path, (REPO / "deploy" / "compose" / "gateway.yaml").read_text(), env)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.admin_listen is not None and settings.admin_listen.port == 8081
    assert set(settings.models) == {"crimson-falcon-4", "indigo-owl-4", "amber-phoenix-4"}


def test_sidecar_example_config(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(SIDECAR_EXAMPLE.read_text()) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    env = container_env(containers["gateway"]) | {"LIUTONG_REDIS_URL": "redis://redis:6379/0"}
    settings = load(
        tmp_path, config_map["data"]["gateway.yaml"], {k: v for k, v in env.items() if k != "LIUTONG_CONFIG"}
    )
    model_port = containers["model-server"]["ports"][0]["containerPort"]
    for route in settings.models.values():
        assert [urlsplit(u).netloc for u in route.upstreams] == [f"127.0.0.1:{model_port}"]
    assert settings.admin_listen is not None and settings.admin_listen.port == 8081
    # The grace period covers the preStop sleep and the drain.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5 + settings.drain_grace_seconds


@pytest.mark.parametrize("values_file", [None, *sorted(p.name for p in CHART.glob("values-*.yaml"))])
def test_helm_chart_config(tmp_path: Path, values_file: str | None) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        values = coalesce(values, yaml.safe_load((CHART / values_file).read_text()))
    ports = values["ports"]
    # What templates/deployment.yaml sets; LIUTONG_REDIS_URL comes from the Secret.
    env = {
        "LIUTONG_LISTEN_HOST": "0.0.0.0",
        "LIUTONG_LISTEN_PORT": str(ports["http"]),
        "LIUTONG_ADMIN_LISTEN_HOST": "0.0.0.0",
        "LIUTONG_ADMIN_LISTEN_PORT": str(ports["admin"]),
        "LIUTONG_REDIS_URL": "rediss://redis.liutong.svc.cluster.local:6379/0",
    } | {k: str(v) for k, v in values.get("env", {}).items()}
    settings = load(tmp_path, values["config"], env)
    assert settings.admin_listen is not None and settings.admin_listen.port == ports["admin"]
    assert settings.listen.port == ports["http"]
    if values["mode"] == "sidecar":
        assert settings.models
        for route in settings.models.values():
            assert all(urlsplit(u).hostname == "127.0.0.1" for u in route.upstreams)
            assert all(urlsplit(u).port == values["modelServer"]["port"] for u in route.upstreams)

"""Check that the compose stack is wired together, beyond `docker-compose config -q`.

Usage: python deploy/checks/check_compose.py   (from the repository root)

- Prometheus scrapes the gateway's admin port, as set in deploy/compose/gateway.yaml, and loads
  rules.yml from where the compose file mounts it;
- the gateway's upstreams are the mock-upstream service on the port it is started with;
- Grafana's provisioned datasource points at the prometheus service, and the dashboard
  provider's path is where the compose file mounts grafana/dashboards;
- every dashboard JSON file has a unique uid.
Exit status 1 on any problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

COMPOSE = Path("deploy/docker-compose.yml")
GATEWAY_CONFIG = Path("deploy/compose/gateway.yaml")
PROMETHEUS_CONFIG = Path("deploy/prometheus/prometheus.yml")
DATASOURCES = Path("grafana/provisioning/datasources")
DASHBOARD_PROVIDERS = Path("grafana/provisioning/dashboards")
DASHBOARDS = Path("grafana/dashboards")


def _mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Host path (resolved from the compose file's directory) → container path."""
    mounts: dict[Path, str] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[(COMPOSE.parent / source).resolve()] = target
    return mounts


def _flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> int:
    problems: list[str] = []
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    gateway_config = yaml.safe_load(GATEWAY_CONFIG.read_text())
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())

    # Gateway ← compose: config mounted where LIUTONG_CONFIG says, ports published.
    gateway = services["gateway"]
    config_path = gateway["environment"]["LIUTONG_CONFIG"]
    if _mounts(gateway).get(GATEWAY_CONFIG.resolve()) != config_path:
        problems.append(f"{GATEWAY_CONFIG} is not mounted at LIUTONG_CONFIG={config_path}")
    admin_port = gateway_config["admin_listen"]["port"]
    published = {str(p).rsplit(":", 1)[-1] for p in gateway.get("ports", [])}
    for port in (gateway_config["listen"]["port"], admin_port):
        if str(port) not in published:
            problems.append(f"gateway port {port} is not published")

    # Gateway → mock upstream.
    mock_port = _flag(services["mock-upstream"]["command"], "--port")
    for model, route in gateway_config["models"].items():
        for upstream in route["upstreams"]:
            url = urlsplit(upstream)
            if url.hostname != "mock-upstream" or str(url.port) != mock_port:
                problems.append(f"models.{model}: upstream {upstream} is not the mock-upstream service on {mock_port}")

    # Prometheus → gateway admin port; rules mounted beside its config.
    targets = [t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    if f"gateway:{admin_port}" not in targets:
        problems.append(f"prometheus.yml does not scrape gateway:{admin_port} (the admin listener)")
    prom_mounts = _mounts(services["prometheus"])
    config_file = _flag(services["prometheus"]["command"], "--config.file") or ""
    config_dir = config_file.rsplit("/", 1)[0]
    for rule_file in prometheus.get("rule_files", []):
        host = (PROMETHEUS_CONFIG.parent / rule_file).resolve()
        if prom_mounts.get(host) != f"{config_dir}/{rule_file}":
            problems.append(f"rule file {rule_file} is not mounted next to {config_file}")
    if prom_mounts.get(PROMETHEUS_CONFIG.resolve()) != config_file:
        problems.append(f"{PROMETHEUS_CONFIG} is not mounted at --config.file={config_file}")

    # Grafana → Prometheus, and the dashboards where the provider looks.
    grafana_mounts = _mounts(services["grafana"])
    if grafana_mounts.get(Path("grafana/provisioning").resolve()) != "/etc/grafana/provisioning":
        problems.append("grafana/provisioning is not mounted at /etc/grafana/provisioning")
    prometheus_port = str(services["prometheus"]["ports"][0]).rsplit(":", 1)[-1]
    for path in sorted(DATASOURCES.glob("*.yml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            if source["type"] == "prometheus" and source["url"] != f"http://prometheus:{prometheus_port}":
                problems.append(f"{path}: datasource url {source['url']} is not http://prometheus:{prometheus_port}")
    for path in sorted(DASHBOARD_PROVIDERS.glob("*.yml")):
        for provider in yaml.safe_load(path.read_text())["providers"]:
            if grafana_mounts.get(DASHBOARDS.resolve()) != provider["options"]["path"]:
                problems.append(
                    f"{path}: provider path {provider['options']['path']} is not where grafana/dashboards is mounted"
                )
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    mounted_dashboards = {f"{grafana_mounts.get(DASHBOARDS.resolve())}/{p.name}" for p in DASHBOARDS.glob("*.json")}
    if home and home not in mounted_dashboards:
        problems.append(f"Grafana's home dashboard {home} is not a mounted dashboard")

    uids = [json.loads(p.read_text())["uid"] for p in sorted(DASHBOARDS.glob("*.json"))]
    if len(uids) != len(set(uids)):
        problems.append(f"dashboard uids are not unique: {uids}")

    if problems:
        print(f"  FAIL compose stack wiring: {len(problems)} problem(s)")
        for problem in problems:
            print(f"    - {problem}")
        return 1
    print(
        "  ok   gateway ← config → mock upstream; Prometheus → gateway:admin + rules; Grafana → Prometheus + dashboards"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lint and render the Helm chart for each documented values file, and cross-check the output.

Usage: python deploy/checks/check_chart.py CHART_DIR OUT_DIR

With helm-python-sdk (Helm's own Go SDK, no helm binary), for the chart's defaults and each
values-*.yaml beside them:

- `helm lint --strict` (schema included) must report no warning or error;
- the chart renders offline; the manifests go to OUT_DIR/manifests/<values>.yaml for
  kubernetes-validate, the PrometheusRule's groups to OUT_DIR/rules/<values>.yml for promtool,
  and the gateway config from the ConfigMap to OUT_DIR/config/<values>.yaml;
- the objects agree with each other: Services, PDB, NetworkPolicy and ServiceMonitor select the
  pods and name ports that exist, probes hit /healthz and /readyz, the HPA targets the
  Deployment, the grace period covers preStop + drain, the root filesystem is read-only, and in
  sidecar mode every upstream is the model server on 127.0.0.1.

Then values that must be refused are rendered and must fail, with the expected message.
Exit status 1 on any problem.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import yaml

KUBE_VERSION = "v1.30.0"  # the chart's kubeVersion floor

# Values the chart must refuse: (description, values, text the error must contain).
MUST_FAIL: list[tuple[str, dict[str, Any], str]] = [
    ("several replicas on the embedded store", {"replicaCount": 3}, "shared store"),
    (
        "autoscaling on the embedded store",
        {"autoscaling": {"enabled": True, "maxReplicas": 5}},
        "shared store",
    ),
    ("the chart's listeners overridden in config", {"config": {"listen": {"port": 1}}}, "config.listen"),
    ("redis_url in the ConfigMap", {"config": {"redis_url": "redis://r:6379/0"}}, "config.redis_url"),
    (
        "sidecar without a model server",
        {"mode": "sidecar", "config": {"models": {"m": {"upstreams": ["http://127.0.0.1:8000"]}}}},
        "modelServer",
    ),
    (
        "sidecar without models",
        {"mode": "sidecar", "modelServer": {"image": {"repository": "m", "tag": "1"}}},
        "config.models",
    ),
    ("an unknown value (typo)", {"replicas": 2}, "replicas"),
    ("an unknown mode", {"mode": "ingress"}, "mode"),
    ("a bad store policy", {"config": {"store_outage_policy": "fail_soft"}}, "store_outage_policy"),
    ("both PDB bounds", {"podDisruptionBudget": {"minAvailable": 1}}, "exactly one"),
    (
        "ServiceMonitor without the admin Service",
        {"serviceMonitor": {"enabled": True}, "adminService": {"enabled": False}},
        "adminService",
    ),
]


def _documents(manifests: dict[str, str]) -> Iterator[dict[str, Any]]:
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield doc


def _subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def cross_check(docs: list[dict[str, Any]], values: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    gateway = containers.get("gateway")
    if gateway is None:
        return ["the Deployment has no container named gateway"]
    gateway_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    if not _subset(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pod labels")

    # Probes: liveness on /healthz, readiness on /readyz, both on the client port.
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = gateway.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in gateway_ports:
            problems.append(f"gateway {probe} must GET {path} on a named container port, got {get}")

    # Draining: grace period ≥ preStop sleep + drain_grace_seconds.
    config = yaml.safe_load(
        next(c for c in by_kind["ConfigMap"] if "gateway.yaml" in c["data"])["data"]["gateway.yaml"]
    )
    pre_stop = gateway.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre_stop[:1] != ["sleep"]:
        problems.append("gateway has no preStop sleep")
    else:
        needed = float(pre_stop[1]) + float(config.get("drain_grace_seconds", 30))
        if spec["terminationGracePeriodSeconds"] <= needed:
            problems.append(
                f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} ≤ preStop + drain {needed}"
            )

    # Hardening.
    security = gateway.get("securityContext", {})
    if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation") is not False:
        problems.append("gateway must run with a read-only root filesystem and no privilege escalation")
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("pod must run as non-root")
    mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
    for path in ("/etc/liutong", "/tmp", "/var/lib/liutong"):
        if path not in mounts:
            problems.append(f"gateway has no volume at {path}")
    env = {e["name"]: e.get("value") for e in gateway.get("env", [])}
    if env.get("LIUTONG_ADMIN_LISTEN_PORT") != str(gateway_ports.get("admin")):
        problems.append("LIUTONG_ADMIN_LISTEN_PORT does not match the admin container port")
    if env.get("LIUTONG_LISTEN_PORT") != str(gateway_ports.get("http")):
        problems.append("LIUTONG_LISTEN_PORT does not match the http container port")

    # Referenced objects exist.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for volume in spec["volumes"]:
        if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
            problems.append(f"volume {volume['name']} names a ConfigMap the chart does not create")
    for source in gateway.get("envFrom", []):
        secret = source.get("secretRef", {}).get("name")
        if secret and ("Secret", secret) not in names and secret != values.get("secret", {}).get("existingSecret"):
            problems.append(f"envFrom names Secret {secret}, which is neither created nor existingSecret")
    if ("ServiceAccount", spec["serviceAccountName"]) not in names:
        problems.append("serviceAccountName names a ServiceAccount the chart does not create")

    # Services: select the pods; target ports exist. The client Service never exposes admin.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for name, service in services.items():
        if not _subset(service["spec"]["selector"], pod_labels):
            problems.append(f"Service {name} does not select the pods")
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in gateway_ports:
                problems.append(f"Service {name} targets unknown port {port['targetPort']}")
        component = service["metadata"]["labels"].get("app.kubernetes.io/component")
        if component == "gateway" and any(p["targetPort"] == "admin" for p in service["spec"]["ports"]):
            problems.append(f"client Service {name} exposes the admin port")

    for monitor in by_kind.get("ServiceMonitor", []):
        selected = [
            s for s in services.values() if _subset(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
        if not selected:
            problems.append("ServiceMonitor selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in ports or endpoint.get("path") != "/metrics":
                problems.append(f"ServiceMonitor endpoint {endpoint} is not /metrics on a selected Service port")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
            problems.append("HPA does not target the Deployment")
        if "replicas" in deployment["spec"]:
            problems.append("Deployment sets replicas although an HPA owns them")
        for metric in hpa["spec"]["metrics"]:
            container = metric.get("containerResource", {}).get("container")
            if container and container not in containers:
                problems.append(f"HPA metric names unknown container {container}")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not _subset(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            problems.append("PodDisruptionBudget does not select the pods")

    for policy in by_kind.get("NetworkPolicy", []):
        if not _subset(policy["spec"]["podSelector"]["matchLabels"], pod_labels):
            problems.append("NetworkPolicy does not select the pods")
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if port["port"] not in gateway_ports:
                    problems.append(f"NetworkPolicy opens {port['port']}, which is not a gateway port")

    for rule in by_kind.get("PrometheusRule", []):
        if not rule["spec"].get("groups"):
            problems.append("PrometheusRule has no groups")

    # Sidecar mode: the model server runs beside the gateway, reached on loopback only.
    if values.get("mode") == "sidecar":
        model = containers.get(values.get("modelServer", {}).get("name", "model-server"))
        if model is None:
            problems.append("sidecar mode renders no model server container")
        else:
            port = model["ports"][0]["containerPort"]
            if model.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0) < float(
                config.get("drain_grace_seconds", 30)
            ):
                problems.append("the model server's preStop must outlast the gateway's drain")
            for model_id, route in config["models"].items():
                for upstream in route["upstreams"]:
                    parts = urlsplit(upstream)
                    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port != port:
                        problems.append(f"sidecar upstream {upstream} of {model_id} is not http://127.0.0.1:{port}")
        for service in services.values():
            if any(p["targetPort"] not in gateway_ports for p in service["spec"]["ports"]):
                problems.append("a Service exposes the model server")
    return problems


def check_values_file(chart_dir: Path, values_file: Path | None, out_dir: Path) -> list[str]:
    label = values_file.stem if values_file else "values-defaults"
    problems, summary = _check_values_file(chart_dir, values_file, label, out_dir)
    print(f"  FAIL {label}" if problems else f"  ok   {label}: {summary}")
    return [f"{label}: {problem}" for problem in problems]


def _check_values_file(chart_dir: Path, values_file: Path | None, label: str, out_dir: Path) -> tuple[list[str], str]:
    values: dict[str, Any] = yaml.safe_load(values_file.read_text()) if values_file else {}
    problems: list[str] = []

    report = helm.lint(str(chart_dir), values, strict=True, kube_version=KUBE_VERSION)
    for message in report["messages"]:
        if message["severity"] >= 2:
            problems.append(f"helm lint: {message['path']}: {message['error']}")
    problems += [f"helm lint: {error}" for error in report["errors"]]

    with helm.Chart.load(str(chart_dir)) as chart:
        try:
            merged = chart.merge_values(values)
            chart.validate_schema(merged)
            manifests = chart.render(values, name="liutong-gateway", namespace="liutong", is_install=True)
        except helm.HelmError as exc:
            return problems + [f"render: {exc}"], ""

    docs = list(_documents(manifests))
    (out_dir / "manifests" / f"{label}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            rules = yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False)
            (out_dir / "rules" / f"{label}.yml").write_text(rules)
        if doc["kind"] == "ConfigMap" and "gateway.yaml" in doc.get("data", {}):
            (out_dir / "config" / f"{label}.yaml").write_text(doc["data"]["gateway.yaml"])
    problems += cross_check(docs, merged)
    kinds = ", ".join(sorted({d["kind"] for d in docs}))
    return problems, f"lint clean, schema valid, {len(docs)} objects that agree ({kinds})"


def check_refusals(chart_dir: Path) -> list[str]:
    problems: list[str] = []
    with helm.Chart.load(str(chart_dir)) as chart:
        for description, values, expected in MUST_FAIL:
            try:
                chart.validate_schema(chart.merge_values(values))
                chart.render(values, name="liutong-gateway", namespace="liutong", is_install=True)
            except helm.HelmError as exc:
                if expected not in str(exc):
                    problems.append(f"{description}: refused, but the message does not name {expected!r}: {exc}")
                continue
            problems.append(f"{description}: rendered, but must be refused")
    print(f"  {'FAIL' if problems else 'ok  '} {len(MUST_FAIL)} kinds of bad values are refused, naming the cause")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    chart_dir, out_dir = Path(argv[0]), Path(argv[1])
    for sub in ("manifests", "rules", "config"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    helm.disable_logging()  # it logs every symlink it follows (files/ links to deploy/ and grafana/)
    problems: list[str] = []
    for values_file in [None, *sorted(chart_dir.glob("values-*.yaml"))]:
        problems += check_values_file(chart_dir, values_file, out_dir)
    problems += check_refusals(chart_dir)
    for problem in problems:
        print(f"    - {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

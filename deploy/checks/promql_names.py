"""The metric catalogue and a PromQL checker shared by the dashboard and rules checks.

`METRICS` is every series the gateway exports (CONTRACT §7 plus its health gauges), with the
labels each carries. `check_expr` parses one expression with promql-parser and reports every
metric it selects that is neither in the catalogue nor a recording rule, every label a selector,
`by (…)` or `on (…)` names that the selected metrics do not have, and parse errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import promql_parser as pp
import yaml

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# name → (type, labels). Histograms export name_bucket (plus `le`), name_sum and name_count.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "liutong_requests_total": (COUNTER, frozenset({"model", "status"})),
    "liutong_request_duration_seconds": (HISTOGRAM, frozenset({"model", "stream"})),
    "liutong_upstream_ttft_seconds": (HISTOGRAM, frozenset({"model"})),
    "liutong_gateway_overhead_seconds": (HISTOGRAM, frozenset()),
    "liutong_tokens_total": (COUNTER, frozenset({"model", "kind"})),
    "liutong_ratelimited_total": (COUNTER, frozenset({"model", "limit"})),
    "liutong_inflight_requests": (GAUGE, frozenset({"model"})),
    "liutong_upstream_errors_total": (COUNTER, frozenset({"model", "reason"})),
    "liutong_store_up": (GAUGE, frozenset()),
    "liutong_store_degraded": (GAUGE, frozenset()),
    "liutong_upstream_healthy": (GAUGE, frozenset({"model", "upstream"})),
    "liutong_usage_spool_records": (GAUGE, frozenset()),
    "liutong_draining": (GAUGE, frozenset()),
    # key_id / org only when the operator turns per-key/per-org labels on.
    "liutong_ratelimited_by_scope_total": (COUNTER, frozenset({"scope", "limit", "key_id", "org"})),
}

# Labels Prometheus attaches to every scraped series (static config, ServiceMonitor, pod SD).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "endpoint", "container"})


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a scrape can return, with its labels (target labels included)."""
    series: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in METRICS.items():
        labels = labels | TARGET_LABELS
        if kind == HISTOGRAM:
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


def recording_rules(rules_file: Path) -> dict[str, frozenset[str]]:
    """Recording rules of a rules file, with their labels.

    Rule names follow `level:metric:operations`, where `level` is the aggregation's labels
    joined by `_` (e.g. `model_stream:…`), so the name tells which labels the result keeps.
    """
    doc = yaml.safe_load(rules_file.read_text(encoding="utf-8"))
    rules: dict[str, frozenset[str]] = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                level = rule["record"].split(":")[0]
                rules[rule["record"]] = frozenset(level.split("_")) if level else frozenset()
    return rules


def _selector_name(node: pp.VectorSelector) -> str | None:
    if node.name:
        return node.name
    for matcher in node.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == pp.MatchOp.Equal:
            return matcher.value
    return None


def _selectors(expr: pp.Expr) -> list[pp.VectorSelector]:
    found: list[pp.VectorSelector] = []

    def visit(node: pp.Expr) -> None:
        if isinstance(node, pp.VectorSelector):
            found.append(node)

    pp.walk(expr, visit)
    return found


def check_expr(expr_text: str, known: Mapping[str, frozenset[str]]) -> list[str]:
    """Problems with one PromQL expression; `known` maps allowed series names to their labels."""
    try:
        expr = pp.parse(expr_text)
    except Exception as exc:  # promql-parser raises a plain ValueError/RuntimeError
        return [f"does not parse: {exc}"]
    problems: list[str] = []

    def labels_under(node: pp.Expr) -> frozenset[str]:
        names = (_selector_name(s) for s in _selectors(node))
        return frozenset().union(*(known.get(n or "", frozenset()) for n in names))

    def visit(node: pp.Expr) -> None:
        if isinstance(node, pp.VectorSelector):
            name = _selector_name(node)
            if name is None:
                problems.append(f"selector {node} names no metric")
                return
            if name not in known:
                problems.append(f"unknown metric {name!r}")
                return
            for matcher in node.matchers.matchers:
                if matcher.name != "__name__" and matcher.name not in known[name]:
                    problems.append(f"{name} has no label {matcher.name!r}")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == pp.AggModifierType.By:
                missing = set(node.modifier.labels) - labels_under(node.expr)
                if missing:
                    problems.append(f"by ({', '.join(sorted(missing))}): no selected metric has it")
        elif isinstance(node, pp.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            if matching is not None and matching.type == pp.LabelModifierType.Include:
                missing = set(matching.labels) - (labels_under(node.lhs) | labels_under(node.rhs))
                if missing:
                    problems.append(f"on ({', '.join(sorted(missing))}): no selected metric has it")

    pp.walk(expr, visit)
    return problems


# Grafana's built-in interval variables become a duration, template variables a regex.
_INTERVALS = {"__rate_interval", "__interval", "__range"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def grafana_variables(expr_text: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr_text)]


def substitute_grafana(expr_text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return "5m" if name in _INTERVALS else ".*"

    return _VARIABLE.sub(replace, expr_text)


def allowed_names(rules_files: Iterable[Path]) -> dict[str, frozenset[str]]:
    known = exported_series()
    for path in rules_files:
        known.update(recording_rules(path))
    return known

"""Check the Grafana dashboards: every expression parses and uses only exported metrics.

Usage: python deploy/checks/check_dashboards.py RULES_FILE DASHBOARD.json...

For each panel target and each `label_values(…)` variable query, Grafana variables are
substituted ($__rate_interval → 5m, $model → .*), the expression is parsed with promql-parser,
and every metric and label it names must be one the gateway exports (promql_names.METRICS) or a
recording rule of RULES_FILE. Also checked: panel ids are unique, every variable an expression
uses is defined, and every panel with queries has at least one. Exit status 1 on any problem.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql_names import allowed_names, check_expr, grafana_variables, substitute_grafana  # noqa: E402

_BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*$")
_PANELS_WITHOUT_QUERIES = {"row", "text", "news", "dashlist", "alertlist"}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    return str(query or variable.get("definition", ""))


def check_dashboard(path: Path, known: dict[str, frozenset[str]]) -> tuple[int, list[str]]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    checked = 0
    for key in ("uid", "title", "panels", "templating"):
        if key not in dashboard:
            problems.append(f"missing top-level {key!r}")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}

    def check(where: str, expr: str) -> None:
        nonlocal checked
        checked += 1
        for name in grafana_variables(expr):
            if name not in variables and name not in _BUILTIN_VARIABLES:
                problems.append(f"{where}: undefined variable ${name}")
        for problem in check_expr(substitute_grafana(expr), known):
            problems.append(f"{where}: {problem}\n      expr: {expr}")

    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        where = f"variable ${variable['name']}"
        match = _LABEL_VALUES.match(_variable_query(variable))
        if match is None:
            problems.append(f"{where}: only label_values(metric, label) queries are supported")
            continue
        selector, label = match.groups()
        if selector is None:
            problems.append(f"{where}: label_values without a metric scans every series")
            continue
        # `by (label)` makes the checker verify that the selected metric carries the label.
        check(where, f"count by ({label}) ({selector})")

    ids: set[int] = set()
    for panel in _panels(dashboard.get("panels", [])):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if not isinstance(panel.get("id"), int):
            problems.append(f"{where}: no integer id")
        elif panel["id"] in ids:
            problems.append(f"{where}: duplicate panel id")
        else:
            ids.add(panel["id"])
        targets = panel.get("targets", [])
        if panel.get("type") not in _PANELS_WITHOUT_QUERIES and not targets:
            problems.append(f"{where}: no queries")
        for target in targets:
            expr = target.get("expr")
            if not expr:
                problems.append(f"{where} target {target.get('refId')}: no expr")
                continue
            check(f"{where} target {target.get('refId')}", expr)
    return checked, problems


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    known = allowed_names([Path(argv[0])])
    failed = False
    for name in argv[1:]:
        checked, problems = check_dashboard(Path(name), known)
        if problems:
            failed = True
            print(f"  FAIL {name}: {len(problems)} problem(s) in {checked} expressions")
            for problem in problems:
                print(f"    - {problem}")
        else:
            print(f"  ok   {name}: {checked} expressions parse and use only exported metrics and labels")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

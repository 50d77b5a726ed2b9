"""Check the Prometheus rules beyond what promtool does.

Usage: python deploy/checks/check_rules.py RULES_FILE RULES_TEST_FILE

- every rule expression uses only metrics and labels the gateway exports, or recording rules;
- every alert has an `alert_rule_test` where it fires and one where it must stay silent;
- every alert carries a severity label and summary/description annotations.
Exit status 1 on any problem.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql_names import allowed_names, check_expr  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rules_path, tests_path = Path(argv[0]), Path(argv[1])
    known = allowed_names([rules_path])
    problems: list[str] = []

    alerts: list[str] = []
    rules = [r for g in yaml.safe_load(rules_path.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        problems += [f"{name}: {p}" for p in check_expr(rule["expr"], known)]
        if "alert" in rule:
            alerts.append(rule["alert"])
            if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problems.append(f"{name}: severity label must be critical, warning or info")
            for key in ("summary", "description"):
                if not rule.get("annotations", {}).get(key):
                    problems.append(f"{name}: no {key} annotation")

    fires: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(tests_path.read_text()).get("tests", []):
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    for alert in alerts:
        if alert not in fires:
            problems.append(f"{alert}: no test where it fires")
        if alert not in silent:
            problems.append(f"{alert}: no test where it stays silent")
    for name in (fires | silent) - set(alerts):
        problems.append(f"{tests_path}: tests an alert that does not exist: {name}")

    if problems:
        print(f"  FAIL {rules_path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"    - {problem}")
        return 1
    print(
        f"  ok   {len(rules)} rules use only exported metrics and labels; "
        f"all {len(alerts)} alerts are tested firing and silent"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

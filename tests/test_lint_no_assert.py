"""No `assert` guards input or state in gateway/ (python -O strips them; bad input gets the contract's error).

An `assert` is allowed only where it narrows a type for the checker on something the code itself
guarantees, and says so: a `# type narrowing: <why>` comment on one of the statement's lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
MARK = "# type narrowing:"


def unjustified_asserts(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Assert):
                span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
                if not any(MARK in line for line in span):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_gateway_has_no_unjustified_assert() -> None:
    found = unjustified_asserts(GATEWAY)
    assert not found, "assert outside type narrowing (raise the contract's error instead):\n" + "\n".join(found)


def test_the_check_finds_an_assert_and_accepts_a_justified_one(tmp_path: Path) -> None:
    package = tmp_path / "gateway"
    package.mkdir()
    (package / "bad.py").write_text("def f(x):\n    assert x is not None\n    return x\n")
    (package / "good.py").write_text("def f(x):\n    assert x is not None  # type narrowing: set above\n")
    (package / "text.py").write_text('HELP = "assert x"  # not a statement\n')
    assert unjustified_asserts(package) == ["gateway/bad.py:2: assert x is not None"]

"""Rules the suite keeps about itself (issue 15, point 4): a dependency the install always has is
imported, never skipped on (a missing Flower must fail, not pass as skipped), and every remaining
skip or expected failure names a reason a user can act on."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def skip_calls(tree: ast.AST):
    """(line, what, the reason given or None) for every pytest skip, skipif, xfail and importorskip."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("skip", "skipif", "xfail", "importorskip"):
            continue
        reason = next((k.value for k in node.keywords if k.arg in ("reason", "msg")), None)
        if reason is None and name == "skip" and node.args:
            reason = node.args[0]
        text = reason.value if isinstance(reason, ast.Constant) else (ast.unparse(reason) if reason is not None else None)
        yield node.lineno, name, text


def test_no_test_skips_on_a_missing_dependency_or_without_a_reason():
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, name, reason in skip_calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(TESTS)}:{line}"
            if name == "importorskip":
                problems.append(f"{where}: importorskip (the project's install has its dependencies: import it)")
            elif not reason or len(reason.strip()) < 10:
                problems.append(f"{where}: {name} without a reason a user can act on")
    assert not problems, "\n".join(problems)


def test_the_rule_sees_what_it_forbids():
    code = "import pytest\npytest.importorskip('flwr')\n@pytest.mark.skipif(True)\ndef t(): pytest.skip()\n"
    found = [(name, reason) for _, name, reason in skip_calls(ast.parse(code))]
    assert sorted(found, key=str) == sorted([("importorskip", None), ("skipif", None), ("skip", None)], key=str)


def test_every_test_the_docs_name_exists():
    """README.md, ARCHITECTURE.md and docs/ back claims with test files (and test names after
    ``::``): each one named must exist, so a renamed or deleted test cannot leave a claim behind."""
    import re

    root = TESTS.parent
    documents = [root / "README.md", root / "ARCHITECTURE.md", *sorted((root / "docs").glob("*.md"))]
    named = {m for path in documents if path.is_file() for m in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", path.read_text())}
    assert named, "the docs name no test: the pattern no longer matches how they cite tests"
    missing = []
    for reference in sorted(named):
        file, _, function = reference.partition("::")
        if not (root / file).is_file() or (function and f"def {function}" not in (root / file).read_text()):
            missing.append(reference)
    assert not missing, f"named in the docs but not in the suite: {missing}"

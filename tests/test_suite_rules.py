"""Rules the suite keeps about itself (issue 15, points 4 and 6): a dependency the project's install
always has (pyproject's dependencies and the extras `make setup` installs) is imported, never
skipped on, so a missing Flower fails instead of passing as skipped; every remaining skip, expected
failure or import-or-skip names a reason a user can act on; every test the docs cite exists."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# the extras the Makefile's setup installs along with the dependencies
INSTALLED_EXTRAS = ("dev", "hub", "flower")
# distributions whose import name differs from their name
IMPORT_NAMES = {"pyyaml": "yaml", "pytest_xdist": "xdist"}


def always_installed() -> set[str]:
    """Import names of the project's dependencies and of the extras `make setup` installs."""
    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in INSTALLED_EXTRAS:
        requirements += project["optional-dependencies"].get(extra, [])
    names = {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("-", "_") for requirement in requirements}
    return {IMPORT_NAMES.get(name, name) for name in names}


def skip_calls(tree: ast.AST):
    """(line, what, the reason given or None, the module for importorskip) for every pytest skip,
    skipif, xfail and importorskip."""
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
        module = node.args[0].value if name == "importorskip" and node.args and isinstance(node.args[0], ast.Constant) else None
        if name == "importorskip":
            text = next((k.value.value for k in node.keywords if k.arg == "reason" and isinstance(k.value, ast.Constant)), None)
        yield node.lineno, name, text, module


def test_no_test_skips_on_a_missing_dependency_or_without_a_reason():
    installed = always_installed()
    assert {"flwr", "torch", "peft", "yaml"} <= installed, installed
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, name, reason, module in skip_calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(TESTS)}:{line}"
            if name == "importorskip" and (module or "").split(".")[0] in installed:
                problems.append(f"{where}: importorskip('{module}'): the project's install always has it, import it")
            elif not reason or len(reason.strip()) < 10:
                problems.append(f"{where}: {name} without a reason a user can act on")
    assert not problems, "\n".join(problems)


def test_the_rule_sees_what_it_forbids():
    code = "import pytest\npytest.importorskip('flwr.app')\n@pytest.mark.skipif(True)\ndef t(): pytest.skip()\n"
    found = [(name, reason, module) for _, name, reason, module in skip_calls(ast.parse(code))]
    expected = [("importorskip", None, "flwr.app"), ("skipif", None, None), ("skip", None, None)]
    assert sorted(found, key=str) == sorted(expected, key=str)


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

"""The house rules on imports: no import cycle anywhere inside src/atoll (module-level and
function-level imports alike: a late import hides a cycle, it does not remove it), and a config
error appears before torch is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import atoll

ROOT = Path(atoll.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the atoll modules it imports anywhere in its body (not under TYPE_CHECKING)."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import module` depends on that module; otherwise on the module named
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (None when the graph is acyclic)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_there_is_no_import_cycle_inside_atoll():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_config_error_appears_before_torch_is_imported(tmp_path):
    """A bad algorithm parameter, mixed ranks the algorithm refuses, Flower's SecAgg+ for SCAFFOLD
    and DP for an algorithm without a weighted mean are refused by the resolve step without torch
    or any algorithm module."""
    code = (
        "import sys\n"
        "from atoll.config import config_with\n"
        "from atoll.errors import ConfigError\n"
        "from atoll.resolve import resolve\n"
        "for overrides in (['algorithm.name=flora', 'algorithm.downlink=x'], ['model.lora.client_ranks={1: 4}'],\n"
        "                  ['algorithm.name=scaffold', 'engine=flower', 'flower.secagg.enabled=true'],\n"
        "                  ['algorithm.name=flexlora', 'privacy.dp.mode=fixed']):\n"
        "    try:\n"
        "        resolve(config_with(overrides))\n"
        "    except ConfigError as error:\n"
        "        print(error)\n"
        "    else:\n"
        "        raise SystemExit('accepted ' + repr(overrides))\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'flwr') if m in sys.modules]\n"
        "algorithms = [m for m in sys.modules if m.startswith('atoll.algorithms.') and m != 'atoll.algorithms.catalog']\n"
        "print('imported:', heavy, algorithms)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert "downlink" in lines[0] and "different LoRA ranks" in lines[1] and "SecAgg+" in lines[2] and "weighted mean" in lines[3]
    assert lines[-1] == "imported: [] []", lines[-1]


LAYER_RULES = [
    # (modules matching this prefix, may not import modules matching any of these prefixes)
    ("atoll.config", ["atoll.algorithms", "atoll.engines", "atoll.sim", "atoll.fl", "atoll.resolve", "atoll.models", "atoll.data"]),
    ("atoll.fl", ["atoll.sim", "atoll.engines", "atoll.dispatch", "atoll.cli", "atoll.experiment", "atoll.resolve"]),
    ("atoll.algorithms", ["atoll.sim", "atoll.engines", "atoll.dispatch", "atoll.cli", "atoll.experiment"]),
    ("atoll.sim", ["atoll.engines", "atoll.dispatch", "atoll.cli"]),
    ("atoll.engines", ["atoll.sim", "atoll.dispatch", "atoll.cli"]),
    # protections act through the federation's stages: they know no driver
    ("atoll.privacy", ["atoll.sim", "atoll.engines", "atoll.dispatch", "atoll.cli", "atoll.experiment"]),
    ("atoll.resolve", ["atoll.experiment", "atoll.sim.realistic.engine", "atoll.fl.federation", "atoll.fl.base"]),
    # pretraining knows no federation; the shared console helpers know no command
    ("atoll.lm", ["atoll.fl", "atoll.sim", "atoll.engines", "atoll.algorithms", "atoll.dispatch", "atoll.cli", "atoll.experiment"]),
    (
        "atoll.console",
        ["atoll.cli", "atoll.lm", "atoll.fl", "atoll.sim", "atoll.engines", "atoll.algorithms", "atoll.dispatch", "atoll.split"],
    ),
    # split learning reuses data, models, the training-loop helpers, the config helpers and the run
    # directory; it knows no federation, no driver and no algorithm, and nothing below it knows it
    ("atoll.split", ["atoll.fl.federation", "atoll.fl.base", "atoll.fl.stages", "atoll.sim", "atoll.engines", "atoll.algorithms"]),
    ("atoll.split", ["atoll.dispatch", "atoll.cli", "atoll.experiment", "atoll.resolve", "atoll.lm", "atoll.privacy"]),
    ("atoll.privacy", ["atoll.split"]),
    ("atoll.fl", ["atoll.split"]),
    ("atoll.algorithms", ["atoll.split"]),
    ("atoll.sim", ["atoll.split"]),
    ("atoll.engines", ["atoll.split"]),
    ("atoll.models", ["atoll.split"]),
    ("atoll.data", ["atoll.split"]),
    ("atoll.report", ["atoll.split"]),
    ("atoll.config", ["atoll.split"]),
    # hybrid inference sits on top: it builds an edge from a federated run (atoll.experiment) and
    # knows no driver, no algorithm and no other capability; nothing in the core knows it
    ("atoll.hybrid", ["atoll.sim", "atoll.engines", "atoll.algorithms", "atoll.dispatch", "atoll.cli", "atoll.split", "atoll.privacy"]),
    *[
        (layer, ["atoll.hybrid"])
        for layer in ["atoll.fl", "atoll.algorithms", "atoll.sim", "atoll.engines", "atoll.models", "atoll.data", "atoll.report"]
        + ["atoll.config", "atoll.privacy", "atoll.split", "atoll.lm", "atoll.console", "atoll.resolve", "atoll.experiment"]
    ],
]


def test_layers_depend_only_downwards():
    """The schema knows no engine; the federated core and the algorithms know no driver; the
    drivers know neither each other nor the dispatcher (only atoll.dispatch knows every driver)."""
    graph = import_graph()
    broken = []
    for module, targets in graph.items():
        for prefix, forbidden in LAYER_RULES:
            if module == prefix or module.startswith(prefix + "."):
                broken += [f"{module} -> {t}" for t in targets for f in forbidden if t == f or t.startswith(f + ".")]
    assert not broken, "\n".join(sorted(broken))

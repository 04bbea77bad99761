"""The house rules of the code: floors with imports only downward (experiments over ran over datamodules; in
ran, the CLI over the tools over training over the networks), the networks free of Lightning, no import circle
between modules, no module over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ran", "datamodules", "experiments")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project's modules that `name` imports, at any depth of its code (deferred imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


# Each name's floor; a module takes the floor of its longest listed prefix. `ran` itself re-exports `ran.nn`.
FLOORS = {
    "datamodules": 0,
    "ran": 1,
    "ran.nn": 1,
    "ran.train": 2,
    "ran.tools": 3,
    "ran.cli": 4,
    "ran.bench": 4,
    "experiments": 5,
}


def _floor(name: str) -> int:
    while name not in FLOORS:
        name = name.rpartition(".")[0]
    return FLOORS[name]


def test_the_layout_is_found():
    assert {"ran.nn.models", "ran.train.module", "ran.cli.app", "ran.tools.bench"} <= set(MODULES)
    assert "ran.nn.models" in GRAPH["ran.nn"]


def test_imports_go_only_downward():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets if _floor(b) > _floor(a)]
    assert not upward, f"modules importing a floor above their own: {upward}"


def test_the_networks_know_nothing_of_lightning():
    for name, path in MODULES.items():
        if name.startswith("ran.nn"):
            text = path.read_text()
            assert "lightning" not in text.replace("Lightning", ""), f"{name} imports Lightning"
            assert not any(t.startswith(("ran.train", "ran.cli", "ran.tools")) for t in GRAPH[name]), name


def test_no_import_circle():
    """Depth-first search over the module graph; a package importing its own submodules is a circle only
    when a submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}): split it by job"


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/ (conftest, datagen, fits, probes, standins), never in a test module:
    a test file that imports another works only when pytest happens to have put that folder on sys.path."""
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").rglob("test_*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            name.startswith("test_")
            for name in (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
        )
    ]
    assert not offenders, f"test modules importing test modules: {offenders}"

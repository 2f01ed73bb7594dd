"""The layering of the package, read from the source (no module is imported).

Every ``import`` and ``from ... import`` of every module under src/poisonreach, function-level and
guarded ones included, relative imports resolved, gives the import graph of the package's own
modules. It must have no cycle; ``poisonreach.cli`` may import only ``poisonreach.experiments``
modules (and a few standard modules to parse the command line); and no module outside
``poisonreach.experiments`` and ``poisonreach.cli`` may import ``poisonreach.experiments``: the
library does not know its experiments.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "poisonreach"
# what the command line may import besides poisonreach.experiments
CLI_EXTERNAL = {"__future__", "argparse", "json", "sys", "pathlib", "yaml"}


def module_names(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name → file for every module of the package (a package is its ``__init__.py``)."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str], package: str = PACKAGE) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level names of other modules) that ``name`` imports anywhere."""
    is_package = path.name == "__init__.py"
    internal, external = set(), set()

    def add(target: str) -> None:
        if target == package or target.startswith(package + "."):
            # the longest known prefix: ``poisonreach.experiments.run.RunConfig`` → its module
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                internal.add(target)
        else:
            external.add(target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # ``from . import defend`` imports the module ``defend``
                full = f"{module}.{alias.name}"
                add(full if full in known else module)
    return internal, external


def import_graph(src: Path = SRC, package: str = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The package's import graph (module → the package modules it imports) and each module's
    imports from outside the package."""
    names = module_names(src, package)
    graph, external = {}, {}
    for name, path in names.items():
        graph[name], external[name] = imports_of(name, path, set(names), package)
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(_closed_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the component's first module, staying inside the component (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover - a component has one


def listing(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m])) or '-'}" for m in sorted(graph))


def in_experiments(module: str) -> bool:
    return module == f"{PACKAGE}.experiments" or module.startswith(f"{PACKAGE}.experiments.")


GRAPH, EXTERNAL = import_graph()


def test_the_graph_is_read_from_every_module():
    assert f"{PACKAGE}.cli" in GRAPH and f"{PACKAGE}.experiments.run" in GRAPH and f"{PACKAGE}.attacks" in GRAPH
    assert f"{PACKAGE}.errors" in GRAPH[f"{PACKAGE}.io"]  # a relative import at the top level
    assert f"{PACKAGE}.errors" in GRAPH[f"{PACKAGE}.data.idx"]  # an absolute one


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found) + "\nthe graph:\n" + listing(GRAPH)


def test_the_command_line_imports_only_the_experiments():
    cli = f"{PACKAGE}.cli"
    library = sorted(m for m in GRAPH[cli] if not in_experiments(m))
    assert not library, f"{cli} imports {library}: reach them through {PACKAGE}.experiments"
    foreign = sorted(EXTERNAL[cli] - CLI_EXTERNAL)
    assert not foreign, f"{cli} imports {foreign}; it may import only {sorted(CLI_EXTERNAL)} besides {PACKAGE}.experiments"


def test_the_library_does_not_import_the_experiments():
    users = {m: sorted(filter(in_experiments, GRAPH[m])) for m in GRAPH if not in_experiments(m) and m != f"{PACKAGE}.cli"}
    users = {m: targets for m, targets in users.items() if targets}
    assert not users, f"modules outside {PACKAGE}.experiments import it: {users}"


# the checker itself, on a package written here


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    src = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import f\n",
        "pkg/b.py": "def f():\n    from . import a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import x\nimport pkg.sub\nimport numpy.linalg\n",
    })
    graph, external = import_graph(src, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub"} and external["pkg.sub.c"] == {"numpy"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"a"}}, [["a", "a"]]),
])
def test_cycles(graph, expected):
    assert cycles(graph) == expected

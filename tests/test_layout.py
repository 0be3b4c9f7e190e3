"""The package's layout: no import cycle, no hidden function-local imports, no private names
borrowed across modules."""

import ast
from pathlib import Path

import swd

PACKAGE = Path(swd.__file__).parent


def modules() -> dict[str, Path]:
    """``swd.x.y`` -> its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path) -> list[tuple[ast.stmt, str, list[str], bool]]:
    """(node, imported module, imported names, inside a function) for every import of a swd module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((child, target, [a.name for a in child.names], in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((child, alias.name, [], in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    """Edges between swd modules, function-local imports included (``from . import x`` -> ``swd.x``)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for _, target, names, _ in imports(name, path):
            if not target.startswith("swd"):
                continue
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in mods and candidate != name:
                    graph[name].add(candidate)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "swd.registry" in graph["swd.commands"] and "swd.student" in graph["swd.registry"]
    assert "swd.distill.stage" in graph["swd.bench"] and "swd.distill.stage" in graph["swd.distill.trainer"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_function_local_imports_say_why():
    """A function-local import is allowed only for a heavy or optional dependency, with its reason
    as a comment on the line, never to dodge a cycle between swd modules."""
    bad = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node, target, _, in_function in imports(name, path):
            if not in_function:
                continue
            if target.startswith("swd") and name not in ("swd", "swd.cli"):
                bad.append(f"{path.name}:{node.lineno} imports {target} inside a function")
            elif "#" not in lines[node.lineno - 1]:
                bad.append(f"{path.name}:{node.lineno} imports {target} inside a function without a reason")
    assert not bad, bad


def test_no_private_names_imported_across_modules():
    bad = [f"{name} imports {target}.{n}" for name, path in modules().items() for _, target, names, _ in imports(name, path)
           if target.startswith("swd") for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad

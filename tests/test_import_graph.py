"""The package's import graph has no cycles: every module can be understood from the ones below it.

Module-level and deferred imports (inside functions) alike are edges; imports under
``if TYPE_CHECKING:`` are not (they never run). Plugins are loaded by module name through
``importlib`` (``hubcache.plugins.builtin``, entry points), which is the plugin mechanism itself
and not an edge here.
"""

from __future__ import annotations

import ast
import os

import hubcache

SRC = os.path.dirname(os.path.dirname(os.path.abspath(hubcache.__file__)))


def _modules() -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(os.path.join(SRC, "hubcache")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                found[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: the hubcache modules it imports}``, deferred imports included."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def target(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) if parts else None

    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child)
                return
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "hubcache" and (found := target(alias.name)):
                        graph[module].add(found)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                if name.split(".")[0] == "hubcache":
                    for alias in node.names:
                        found = target(f"{name}.{alias.name}") or target(name)
                        if found:
                            graph[module].add(found)
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(tree)
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_graph_sees_deferred_imports_and_ignores_type_checking_ones():
    graph = import_graph()
    # CacheBackend.resolve_checked imports the cache machinery inside the method: a deferred edge.
    assert "hubcache.core.cache" in graph["hubcache.core.backend"]
    # backend.py imports ObjectStore only under TYPE_CHECKING at module level; its lazy import
    # inside store_class() is a real edge all the same.
    assert "hubcache.stores.objectstore" in graph["hubcache.core.backend"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles in src/hubcache: " + "; ".join(" <-> ".join(c) for c in found)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 1 for a module that imports nothing of hubcache, else one above the
    highest module it imports (the graph has no cycles)."""
    floor: dict[str, int] = {}

    def visit(module: str) -> int:
        if module not in floor:
            floor[module] = 1 + max((visit(m) for m in graph[module]), default=0)
        return floor[module]

    for module in graph:
        visit(module)
    return floor


def test_the_layers_stay_few():
    # 15 floors before the 0.4 restructure (emit and the locator plugin lived in core and pulled
    # the plugin registry under everything); 12 after it. A new floor needs a reason.
    floor = floors(import_graph())
    assert max(floor.values()) <= 12, sorted(floor.items(), key=lambda kv: -kv[1])[:5]
    # the hook markers and the event vocabulary are leaves: any module can use them
    assert floor["hubcache.plugins.markers"] == floor["hubcache.core.events"] == 1


def test_core_knows_no_backend_and_resolving_never_loads_maintenance():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("hubcache.core."):
            assert not {m for m in imports if m.startswith("hubcache.backends")}, module
    reach = _reachable(graph, "hubcache.core.resolver")
    assert not {m for m in reach if m.startswith("hubcache.maintenance")}

"""The project's import graph has no cycle, counting imports inside functions too (they
hide a cycle from Python, not from a reader)."""
import ast
from pathlib import Path

from configs import REPO_ROOT

PACKAGES = ["configs", "envs", "agent", "policy_server", "serving", "models", "rollout_workers", "learners", "prm_service", "reports",
            "bench", "tests"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from package import submodule` counts as
    the submodule)."""
    files = [p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")]
    files += [REPO_ROOT / "driver.py", REPO_ROOT / "stages.py", REPO_ROOT / "paths.py"]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                imported |= submodules if len(submodules) == len(node.names) else submodules | {node.module}
        # Importing a.b runs a/__init__.py first: a package's own imports count too.
        imported |= {".".join(m.split(".")[:i]) for m in imported for i in range(1, m.count(".") + 1)}
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_the_cycle_finder_finds_a_cycle_inside_functions_too():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert {"configs", "envs.data", "policy_server.models", "driver", "stages"} <= graph.keys()
    assert {"envs.data", "policy_server.models"} <= graph["configs"]  # the config check reads files through them
    assert cycles(graph) == []


def test_no_module_imports_the_driver():
    """The driver wires the stages; what a stage does lives in a package a test or bench imports."""
    graph = import_graph()
    assert [module for module, imported in graph.items() if "driver" in imported] == []

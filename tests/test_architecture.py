"""The layers of kltd (docs/architecture.md) hold: each package imports only the layers below it, only the
app layer imports Hydra, and no module imports itself back through others."""

import ast
from pathlib import Path

import kltd

ROOT = Path(kltd.__file__).parent
# package -> the kltd packages it may import (besides itself); "files" is kltd/files.py
ALLOWED = {
    "files": set(),
    "hub": set(),
    "spec": set(),
    "data": {"spec", "files", "hub"},
    "objectives": {"spec"},
    "fast": set(),
    "rollout": {"fast", "objectives", "spec"},
    "report": {"spec", "files"},
    "train": {"rollout", "objectives", "data", "spec", "report", "files", "hub"},
    "app": {"train", "rollout", "objectives", "fast", "data", "spec", "report", "files", "hub"},
}
HYDRA = ("hydra", "omegaconf")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth of the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_sits_in_a_layer():
    assert {layer(m) for m in modules() if m != "kltd"} <= set(ALLOWED)


def test_each_layer_imports_only_the_layers_below_it():
    known = modules()
    wrong = []
    for module, path in known.items():
        own = layer(module)
        if own is None:
            continue
        for name in imports(path):
            if name.startswith("kltd.") and name in known:
                other = layer(name)
                if other != own and other not in ALLOWED[own]:
                    wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_app_layer_imports_hydra():
    wrong = [f"{module} imports {name}" for module, path in modules().items() if layer(module) != "app"
             for name in imports(path) if name.split(".")[0] in HYDRA]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {m: {n for n in imports(p) if n in known and n != m} for m, p in known.items()}
    for module, edges in graph.items():  # a package's __init__ is not a real dependency of its modules
        graph[module] = {n for n in edges if not module.startswith(n + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module)

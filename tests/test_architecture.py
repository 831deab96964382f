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
    "matmul": set(),
    "schema": set(),
    "data": {"schema", "files", "hub"},
    "objectives": {"schema", "matmul"},
    "fast": {"matmul"},
    "rollout": {"fast", "objectives", "schema", "matmul"},
    "report": {"schema", "files"},
    "train": {"rollout", "objectives", "data", "schema", "report", "files", "hub"},
    "app": {"train", "rollout", "objectives", "fast", "data", "schema", "report", "files", "hub", "matmul"},
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


# The execution plan (kltd/rollout/plan.py) is the one place that decides how models run; these modules read it.
PLAN_READERS = ("train/trainer.py", "train/evaluation.py", "train/stages.py", "train/job.py", "train/teacher_cache.py",
                "train/eval_cache.py")
DECISION_KEYS = {"packed_forward", "lean_decoder", "fused_head", "backend"}  # the config's switches for paths
CAPABILITY_CHECKS = {"hasattr", "supports", "is_sharded", "sharded", "plain_output_layer"}


def test_the_trainer_and_the_evaluation_decide_no_path_themselves():
    """No switch of the config read, no model capability asked, no sampler inspected with hasattr: outside the
    plan, only the plan's own fields (self.plan.fused_head, plan.evaluation) are read."""
    wrong = []
    for relative in PLAN_READERS:
        path = ROOT / relative
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in DECISION_KEYS:
                base = ast.get_source_segment(source, node.value) or ""
                if not base.endswith("plan"):
                    wrong.append(f"{relative}:{node.lineno} reads {base}.{node.attr}")
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in CAPABILITY_CHECKS:
                    wrong.append(f"{relative}:{node.lineno} calls {name}()")
    assert not wrong, "\n".join(wrong)


def test_every_module_and_name_the_architecture_page_cites_exists():
    """docs/architecture.md names files (`kltd/train/stages.py`) and objects (`kltd.rollout.plan.plan_for`): each
    must be there, so the page cannot drift from the code unnoticed."""
    import importlib
    import re

    page = (ROOT.parent / "docs" / "architecture.md").read_text()
    spans = set(re.findall(r"`([^`\s]+)`", page))
    missing = []
    for span in spans:
        if span.startswith(("kltd/", "tests/", "conf/", "docs/")):
            if not (ROOT.parent / span.split("::")[0]).exists():
                missing.append(span)
        elif re.fullmatch(r"kltd(\.\w+)+", span):
            parts = span.split(".")
            for cut in range(len(parts), 1, -1):  # the longest importable module, then attributes
                try:
                    target = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for name in parts[cut:]:
                        target = getattr(target, name)
                except AttributeError:
                    missing.append(span)
                break
            else:
                missing.append(span)
    assert spans and not missing, f"docs/architecture.md cites what does not exist: {sorted(missing)}"

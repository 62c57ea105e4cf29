"""convlora's own import graph: no cycles, and every import points down the layers of the package.

The layers, bottom to top: private plumbing (``_io``, ``_compat``) -> ``tuner`` (the PEFT method) -> ``models``
(families) -> ``data`` / ``synthetic`` -> ``artifact`` (trained folders, methods) / ``prompting`` / ``evaluation``
-> ``training`` -> ``inference`` / ``recipes`` -> ``examples`` /
``bench`` / ``deploy`` -> ``cli`` -> the package's ``__init__``. Imports inside functions count as well:
hiding an import in a function is no way around a cycle.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "convlora"

LAYERS = {
    "_io": 0,
    "_compat": 0,
    "_version": 0,
    "_cli_spec": 0,
    "tuner": 1,
    "models": 2,
    "data": 3,
    "synthetic": 3,
    "artifact": 4,
    "prompting": 4,
    "evaluation": 4,
    "instances": 4,
    "training": 5,
    "inference": 6,
    "recipes": 6,
    "tradeoff": 6,
    "examples": 7,
    "bench": 7,
    "deploy": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def module_name(path: Path) -> str:
    parts = ["convlora", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every convlora module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("convlora")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("convlora"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found |= submodules or {target}
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[room]


def test_every_module_belongs_to_a_layer():
    assert {module for module in graph() if module.count(".") >= 1 and module.split(".")[1] not in LAYERS} == set()


def test_the_import_graph_has_no_cycle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == []


def test_imports_point_only_down_the_layers():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []


def test_the_tuner_imports_nothing_of_convlora_but_itself_and_private_plumbing():
    outside = sorted(
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module.startswith("convlora.tuner")
        for target in targets
        if not target.startswith(("convlora.tuner", "convlora._io", "convlora._compat"))
    )
    assert outside == []


def reachable(graph_: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through other modules."""
    seen, todo = set(), [start]
    while todo:
        for target in graph_[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_using_a_trained_model_never_reaches_the_training_engine():
    """inference.py and deploy.py import nothing of convlora.training, directly or through another module."""
    edges = graph()
    for module in ("convlora.inference", "convlora.deploy", "convlora.artifact", "convlora.evaluation"):
        assert sorted(m for m in reachable(edges, module) if m.startswith("convlora.training")) == [], module


def test_importing_inference_and_deploy_loads_no_training_module():
    """Also at run time, through the package's own __init__ (the engine's names load on first use)."""
    code = (
        "import sys, convlora.inference, convlora.deploy; "
        "print(sorted(m for m in sys.modules if m.startswith('convlora.training')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = "import convlora; print(convlora.train.__module__, convlora.TrainConfig.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["convlora.training.engine", "convlora.training.config"]

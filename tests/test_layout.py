"""The package's layering, read from its imports (module level and inside functions).

* dask, distributed and dask-kubernetes are imported only by the execution layer: ``graph.py`` (the task
  graphs) and ``cluster.py`` (the one client factory);
* the pure numerics (``kernels/``) and the models below them (``psf/``, ``masks``, ``errors``) never import a
  stage, the orchestration, the execution layer, the simulator or the CLI;
* the stages (``stages/``) never import the orchestration (``pipeline``, ``visit``, ``batch``), the execution
  layer or the CLI: a stage with tiled work is handed a runner (``stages/runner.py``).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffim_dag"
EXECUTION = {"diffim_dag.graph", "diffim_dag.cluster"}
DASK = ("dask", "distributed", "dask_kubernetes")
BASE = ("diffim_dag.kernels", "diffim_dag.psf", "diffim_dag.masks", "diffim_dag.errors")
ABOVE_BASE = ("diffim_dag.stages", "diffim_dag.pipeline", "diffim_dag.visit", "diffim_dag.visit_outputs",
              "diffim_dag.graph", "diffim_dag.cluster",
              "diffim_dag.batch", "diffim_dag.cli", "diffim_dag.sim")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _imports(name: str, path: Path):
    """Every module ``name`` imports, absolute, with the line."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def _under(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def test_only_the_execution_layer_imports_dask():
    offenders = [f"{name}:{line} imports {target}" for name, path in _modules() if name not in EXECUTION
                 for target, line in _imports(name, path) if _under(target, DASK)]
    assert not offenders, "\n".join(offenders)


def test_numerics_and_models_import_nothing_above_them():
    offenders = [f"{name}:{line} imports {target}" for name, path in _modules() if _under(name, BASE)
                 for target, line in _imports(name, path) if _under(target, ABOVE_BASE)]
    assert not offenders, "\n".join(offenders)


ABOVE_STAGES = ("diffim_dag.pipeline", "diffim_dag.visit", "diffim_dag.visit_outputs", "diffim_dag.batch", "diffim_dag.graph",
                "diffim_dag.cluster", "diffim_dag.cli")


def test_stages_import_neither_orchestration_nor_execution():
    offenders = [f"{name}:{line} imports {target}" for name, path in _modules() if _under(name, ("diffim_dag.stages",))
                 for target, line in _imports(name, path) if _under(target, ABOVE_STAGES)]
    assert not offenders, "\n".join(offenders)


def test_the_rule_sees_function_local_imports(tmp_path):
    """The checker itself: an import inside a function counts (as the ones that once kept a cycle alive)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from distributed import Client\n    from ..graph import compute\n")
    found = dict(_imports("diffim_dag.stages.m", f))
    assert "distributed" in found and "diffim_dag.graph" in found


def test_no_import_cycle():
    """Module imports (inside functions too; ``if TYPE_CHECKING`` ones as well) form no cycle."""
    modules = dict(_modules())
    edges = {name: {t for t, _ in _imports(name, path) if t in modules and t != name} for name, path in modules.items()}
    # a package imports its own modules (``from .models import *``): those edges are its surface, not a layer
    edges = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in edges.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for name in sorted(modules):
        if state.get(name) is None and visit(name, []):
            break
    assert not cycle, " -> ".join(cycle)

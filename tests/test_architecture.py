"""The package's floors, checked from its source: imports (function-local ones included) run
one way, down the floors, and there is no import cycle.

Floors, bottom to top (docs/architecture.md draws them):
errors, paths < config, data < parallel < weights < kernels-using model < engine < runtime, analysis
< the workflows (train, api, evaluate, export, ...) < dashboard < cli. ``spmd_lora.kernels``
imports nothing of the package.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS = {            # module prefix -> floor; the longest matching prefix wins
    "spmd_lora.errors": 0,
    "spmd_lora.paths": 0,
    "spmd_lora.kernels": 0,
    "spmd_lora.config": 1,
    "spmd_lora.data": 1,
    "spmd_lora.tokenizer": 1,
    "spmd_lora.parallel": 2,
    "spmd_lora.weights": 3,
    "spmd_lora.model": 4,
    "spmd_lora.engine": 5,
    "spmd_lora.runtime": 6,
    "spmd_lora.analysis": 6,
    "spmd_lora": 7,                    # the workflows at the top of the package
    "spmd_lora.dashboard": 8,
    "spmd_lora.cli": 9,
    "spmd_lora.__main__": 10,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "spmd_lora").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def _imports(module: str, path: Path) -> set[str]:
    """Every package module ``module`` imports, at the top or inside a function."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            subs = [n for n in names if n in MODULES]
            out.update(subs)
            if len(subs) < len(names) and target in MODULES:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
    out.discard(module)
    return {m for m in out if m.startswith("spmd_lora")}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_imports_run_down_the_floors():
    upward = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
              for m, targets in GRAPH.items() for t in sorted(targets)
              if _floor(t) > _floor(m) and not _is_package_face(m, t)]
    assert not upward, "\n".join(upward)


def _is_package_face(module: str, target: str) -> bool:
    """A package's __init__ re-exporting its own modules is not an upward import."""
    return MODULES[module].stem == "__init__" and target.startswith(module + ".")


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(m):                                   # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for t in GRAPH.get(m, ()):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in on_stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            component = []
            while True:
                t = stack.pop()
                on_stack.discard(t)
                component.append(t)
                if t == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in GRAPH:
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_the_checker_sees_function_local_imports(tmp_path):
    """The checker itself: an import inside a function counts."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from .parallel import mesh\n    return mesh\n")
    assert _imports("spmd_lora.mod", src) == {"spmd_lora.parallel.mesh"}

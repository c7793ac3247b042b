"""A fingerprint of the code a digits-benchmark row ran through: the modules of the preset's objectives
(a hybrid's base and terms too) with every ``stepdistill`` module they import, directly or not, and the
student's sampling path (``generator``, ``sampling``, ``export.scheduler``: how its samples are drawn at
evaluation), each read as its syntax tree without docstrings, so comments and docs do not count.

The benchmark records it with each row and names the rows whose code has changed since they were
measured (a change of sampling times, say, leaves the preset's values as they were). The trainer,
data and evaluation code are left out: they serve every row alike, and a change there is a reason to
re-measure the table, not one row.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

#: modules every row's student samples through at evaluation
SAMPLING = ("stepdistill.generator", "stepdistill.sampling", "stepdistill.export.scheduler")


def objective_names(spec) -> list[str]:
    """The objective names in a preset's ``objective`` section: its own, and its parts' (a hybrid's base
    and terms), in order of appearance."""
    found = []
    if isinstance(spec, dict):
        if isinstance(spec.get("name"), str):
            found.append(spec["name"])
        for v in spec.values():
            found += objective_names(v)
    elif isinstance(spec, list):
        for v in spec:
            found += objective_names(v)
    return found


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), None if there is none."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # an attribute imported from a module, not a module
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imports(name: str, tree: ast.AST) -> set[str]:
    """The ``stepdistill`` modules a (non-package) module imports anywhere in its body (function-level
    imports too)."""
    out = set()
    package = name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "stepdistill"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "stepdistill":
                continue
            out.add(mod)
            if _is_package(mod):  # `from . import sampling` names a module, not an attribute
                out |= {f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}") is not None}
    return out


def _is_package(name: str) -> bool:
    f = module_file(name)
    return f is not None and f.name == "__init__.py"


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def closure(modules) -> dict[str, str]:
    """{module: its docstring-free syntax tree, dumped} for ``modules`` and every stepdistill module they
    import, transitively; packages' ``__init__`` files are left out (they gather names, and their list of
    objective families changes with every new family)."""
    seen, todo = {}, list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = module_file(name)
        if f is None or f.name == "__init__.py":  # packages re-export: their list of families is not a row's code
            continue
        tree = ast.parse(f.read_text(), filename=str(f))
        todo += sorted(_imports(name, tree) - set(seen))
        seen[name] = ast.dump(_without_docstrings(tree), include_attributes=False)
    return seen


def code_id(objective_spec) -> str:
    """12 hex digits over the code of the preset's objectives and the sampling path (module docstring)."""
    from stepdistill.objectives.base import get_objective

    from stepdistill.objectives import load_all

    known = load_all()
    roots = [get_objective(n).__module__ for n in objective_names(objective_spec) if n in known] + list(SAMPLING)
    h = hashlib.sha256()
    for name, dump in sorted(closure(roots).items()):
        h.update(name.encode() + b"\0" + dump.encode() + b"\0")
    return h.hexdigest()[:12]


__all__ = ["code_id", "closure", "objective_names"]

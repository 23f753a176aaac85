"""The layering of docs/design.md §1: moe_core imports no ray/deepspeed/megablocks/transformers nor the packages above
it; upcycle, moe_train and serve import moe_core and never each other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("ray", "deepspeed", "megablocks", "upcycle", "moe_train", "serve", "transformers")
# Nor upward into the CLI dispatcher or the benchmarks, not even lazily (docs/design.md §1).
UPWARD = ("upmoe", "bench")
SIBLINGS = ("upcycle", "moe_train", "serve")

_PROBE = """
import importlib, json, pkgutil, sys
import moe_core
names = sorted(m.name for m in pkgutil.walk_packages(moe_core.__path__, "moe_core."))
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # reported, so a broken module cannot hide a forbidden import
        failed[name] = repr(e)
print(json.dumps({"modules": names, "failed": failed, "loaded": sorted(sys.modules)}))
"""


def _top_level(name: str) -> str:
    return name.split(".")[0]


def test_importing_moe_core_loads_no_forbidden_package() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "moe_core.model" in report["modules"] and "moe_core.loading" in report["modules"]
    assert report["failed"] == {}, report["failed"]
    loaded = {_top_level(m) for m in report["loaded"]}
    assert not loaded & {*FORBIDDEN_IN_CORE, *UPWARD}, sorted(loaded & {*FORBIDDEN_IN_CORE, *UPWARD})


def _py_files(package: str) -> list[Path]:
    root = ROOT / package
    return sorted(root.rglob("*.py")) if root.is_dir() else []


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, path: Path) -> list[str]:
    """Absolute module names an ImportFrom refers to (relative imports resolved against ``path``)."""
    if node.level == 0:
        base = node.module or ""
    else:
        package = _module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    if node.module is None:  # "from . import x": the names are modules
        return [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
    return [base]


def _imports(path: Path, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, imported module) pairs; with ``module_level_only`` imports inside functions are skipped (lazy
    imports run only when called), but class bodies and if/try blocks at module level count."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((child.lineno, name) for name in _resolve(child, path))
            visit(child)

    visit(tree)
    return found


def test_static_moe_core_has_no_forbidden_module_level_imports() -> None:
    """ray/deepspeed/megablocks/transformers may be imported lazily (megablocks backend); the packages above
    moe_core may not be imported at all."""
    files = _py_files("moe_core")
    assert files, "moe_core has no Python files?"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in files
        for line, name in _imports(path, module_level_only=True)
        if _top_level(name) in FORBIDDEN_IN_CORE
    ]
    offenders += [
        f"{path.relative_to(ROOT)}:{line}: import {name} (even lazily)"
        for path in files
        for line, name in _imports(path, module_level_only=False)
        if _top_level(name) in UPWARD or _top_level(name) in SIBLINGS
    ]
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize("package", SIBLINGS)
def test_static_sibling_packages_do_not_import_each_other(package: str) -> None:
    files = _py_files(package)
    if not files:
        pytest.skip(f"{package}/ has no Python files yet")
    others = set(SIBLINGS) - {package}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in files
        for line, name in _imports(path, module_level_only=False)  # not even lazily
        if _top_level(name) in others
    ]
    assert offenders == [], "\n".join(offenders)


def test_static_checker_sees_imports(tmp_path: Path) -> None:
    """The AST walk itself: module-level (also in if/try/class) counts, function bodies do not."""
    fake = ROOT / "moe_core" / "__probe_never_written__.py"
    source = (
        "import os\n"
        "try:\n    import ray.train\nexcept ImportError:\n    pass\n"
        "class A:\n    from serve import app\n"
        "def f():\n    import megablocks\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    module_level = [name for _, name in _imports(path, module_level_only=True)]
    assert "ray.train" in module_level and "serve" in module_level
    assert "megablocks" not in module_level
    assert "megablocks" in [name for _, name in _imports(path, module_level_only=False)]
    # Relative imports resolve against the file's package.
    node = ast.parse("from . import config\nfrom ..serve import app\n").body
    assert _resolve(node[0], fake) == ["moe_core.config"]
    assert _resolve(node[1], fake) == ["serve"]

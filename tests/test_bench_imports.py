"""The benchmark is a tool beside the runtime: its package has no import cycle, and nothing in
the runtime imports it (DESIGN.md, "Layout": arrows point down only).

The graph is read from the source (every import, also those inside functions, where a cycle
hides best) and checked again by importing, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import graphlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aiokvpipe"
BENCH = PACKAGE / "bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, anywhere in the file. ``from X import name``
    counts as X and, when it names one, the submodule X.name."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _bench_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(BENCH.glob("*.py"))}


def test_the_bench_package_has_no_import_cycle() -> None:
    modules = _bench_modules()
    assert len(modules) > 5, modules  # the glob found the package
    graph = {name: {m for m in _imports(path) if m in modules and m != name
                    and m != "aiokvpipe.bench"}
             for name, path in modules.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    # The package's docstring lists its modules so that each imports only those after it.
    listed = ["aiokvpipe.bench." + m for m in re.findall(
        r"^\* :mod:`\.(\w+)`", (BENCH / "__init__.py").read_text(), re.MULTILINE)]
    assert sorted(listed) == sorted(set(modules) - {"aiokvpipe.bench"})
    for i, name in enumerate(listed):
        assert graph[name] <= set(listed[i + 1:]), (name, graph[name] - set(listed[i + 1:]))


def test_no_runtime_module_imports_the_bench() -> None:
    runtime = [p for p in PACKAGE.rglob("*.py")
               if BENCH not in p.parents and p.name != "__main__.py"]
    assert len(runtime) > 10, runtime
    offenders = {_module_name(p): sorted(m for m in _imports(p)
                                         if m == "aiokvpipe.bench"
                                         or m.startswith("aiokvpipe.bench."))
                 for p in runtime}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_runtime_loads_no_bench_and_each_bench_module_imports_first() -> None:
    script = textwrap.dedent("""
        import importlib, pkgutil, sys

        def import_runtime(package):  # walk_packages would import aiokvpipe.bench itself
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if info.name not in ("aiokvpipe.__main__", "aiokvpipe.bench"):
                    module = importlib.import_module(info.name)
                    if info.ispkg:
                        import_runtime(module)

        import_runtime(importlib.import_module("aiokvpipe"))
        loaded = sorted(m for m in sys.modules if m.startswith("aiokvpipe.bench"))
        assert not loaded, f"the runtime loaded {loaded}"
        for name in sys.argv[1:]:
            for m in [m for m in sys.modules if m.startswith("aiokvpipe.bench")]:
                del sys.modules[m]
            importlib.import_module(name)  # first of its package: a cycle would break here
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, *_bench_modules()], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

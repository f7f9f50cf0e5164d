"""Start-up and structure: ``import medusa_kernels`` loads neither torch nor Triton (and is
fast), every lazy name resolves, and the package's import graph has no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import medusa_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "medusa_kernels")


def run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_is_lazy_and_fast():
    """No torch, no Triton, no kernel built at import; the time is `python -X importtime`'s
    cumulative figure for the package (measured 0.5-1 ms on a 2-core machine; the bound is
    generous for a loaded one: import torch alone takes about 1 s there)."""
    out = run("import sys, time\n"
              "t = time.perf_counter(); import medusa_kernels; t = time.perf_counter() - t\n"
              "heavy = sorted(m for m in ('torch', 'triton', 'numpy', 'tokenizers') "
              "if m in sys.modules)\n"
              "print(t, ','.join(heavy))")
    seconds, heavy = out.split()[0], out.split()[1:]
    assert heavy == [], heavy
    assert float(seconds) < 0.5, seconds
    from medusa_kernels.bench.__main__ import import_seconds

    measured = import_seconds("medusa_kernels")  # what the bench records in its meta
    assert measured is not None and 0 < measured < 0.5


def test_every_lazy_name_resolves():
    assert sorted(medusa_kernels.__all__) == sorted(medusa_kernels._EXPORTS)
    for name in medusa_kernels.__all__:
        value = getattr(medusa_kernels, name)
        module = sys.modules[f"medusa_kernels.{medusa_kernels._EXPORTS[name]}"]
        assert value is getattr(module, name), name
    for name in medusa_kernels._SUBMODULES:
        assert getattr(medusa_kernels, name).__name__ == f"medusa_kernels.{name}"
    assert set(medusa_kernels.__all__) <= set(dir(medusa_kernels))
    try:
        medusa_kernels.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_the_cli_module_does_not_shadow_the_function():
    """Importing the ``generate`` CLI module leaves ``medusa_kernels.generate`` the function."""
    out = run("from medusa_kernels.generate import main\n"
              "import medusa_kernels.generate\n"
              "import medusa_kernels as mk\n"
              "from medusa_kernels import generate\n"
              "from medusa_kernels.decoding import generate as g\n"
              "import sys\n"
              "print(mk.generate is g, generate is g, callable(main),\n"
              "      sys.modules['medusa_kernels.generate'].main is main)")
    assert out.split() == ["True"] * 4


def modules() -> dict[str, tuple[str, bool]]:
    """module name -> (file, is a package __init__) for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                is_pkg = name.endswith(".__init__")
                out[name.removesuffix(".__init__")] = (path, is_pkg)
    return out


def imports_of(name: str, path: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, at module level or inside functions (an import
    in a function is a dependency all the same), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for n in ast.walk(node)}
    base = name if is_pkg else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                full = ".".join(parts[: len(parts) - node.level + 1])
                full += f".{node.module}" if node.module else ""
            else:
                full = node.module or ""
            targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in known else full
                       for a in node.names]
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            # a module's own ancestors are imported before it anyway: no ordering to check
            if t in known and t != name and not name.startswith(t + "."):
                deps.add(t)
    return deps


def test_import_graph_has_no_cycle():
    mods = modules()
    known = set(mods)
    graph = {m: imports_of(m, path, is_pkg, known) for m, (path, is_pkg) in mods.items()}
    assert graph["medusa_kernels"] == set()  # the lazy facade imports nothing
    # the two cycles of issue 14 stay broken
    assert "medusa_kernels.demo.build" not in graph["medusa_kernels.training.data"]
    assert "medusa_kernels.calibrate" not in graph["medusa_kernels.bench.e2e"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])

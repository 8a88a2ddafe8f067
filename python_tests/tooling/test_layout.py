"""The layout rules of README.md's Layout section, read from the source tree:
imports inside ``rlhf_kernels`` run one way (no module-level import circle),
the float64 oracle ``reference.py`` is imported only by ``eager/`` (and the
tests and benchmarks), no Triton kernel sits under ``ops/``, and no module is
over 600 lines but the ones the README names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlhf_kernels"
# README.md, Layout: the modules over 600 lines, each one cohesive thing.
LONG_MODULES = {"rlhf_kernels.ops.ppo_loss", "rlhf_kernels.reference", "rlhf_kernels.trainer.ppo"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _module_level(tree: ast.Module):
    """The statements run at import: the module's own, and those of its
    top-level if / try blocks (not function or class bodies)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)


def _imports(name: str, path: Path, modules: dict[str, Path], module_level: bool) -> set[str]:
    """The rlhf_kernels modules `name` imports (at import time only with module_level)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = _module_level(tree) if module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_circle():
    modules = _modules()
    # A package's __init__ importing its own submodules is how a package is
    # assembled, not a circle; the edges that matter run between modules.
    graph = {name: {m for m in _imports(name, path, modules, True) if not name.startswith(m + ".")}
             for name, path in modules.items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_oracle_is_imported_only_by_the_eager_backend():
    modules = _modules()
    users = sorted(name for name, path in modules.items()
                   if "rlhf_kernels.reference" in _imports(name, path, modules, False))
    assert users and all(name.startswith("rlhf_kernels.eager") for name in users), users


def test_no_triton_kernel_under_ops():
    jitted = [str(p.relative_to(ROOT)) for p in (PACKAGE / "ops").rglob("*.py")
              if re.search(r"@triton\.jit|import triton\b", p.read_text())]
    assert not jitted, jitted


def test_long_modules_are_the_ones_the_readme_names():
    modules = _modules()
    long = {name for name, path in modules.items() if len(path.read_text().splitlines()) > 600}
    assert long <= LONG_MODULES, sorted(long - LONG_MODULES)
    readme = (ROOT / "README.md").read_text()
    for name in LONG_MODULES:
        assert "`" + str(modules[name].relative_to(PACKAGE)) + "`" in readme, name

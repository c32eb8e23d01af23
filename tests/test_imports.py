"""mlret's import structure, counting every import: top-level, function-local (which can hide a cycle from Python
until the function runs) and relative. No cycle; no module imports one of a higher layer (`LAYERS`, bottom up);
and the boundaries of the design hold (`BOUNDARIES`: losses know nothing of models, models nothing of data,
evaluators nothing of training). Reads the sources with `ast`; imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlret"

# mlret's layers, bottom up: a module imports modules of its own layer or of layers below, never above. A name
# stands for that module and, with ".*", for a package and everything in it; the most specific entry wins. A new
# module goes where its imports put it (the test names any module that has no layer).
LAYERS = (
    ("base", ("mlret", "mlret.errors", "mlret.registry", "mlret.hostmem", "mlret.cli", "mlret.supervise")),
    ("infrastructure", ("mlret.storage", "mlret.metrics_log", "mlret.parallel")),
    ("parts", ("mlret.data.*", "mlret.models.*", "mlret.losses.*", "mlret.gradcache", "mlret.loop", "mlret.flops")),
    ("evaluation", ("mlret.eval.*", "mlret.splits")),
    ("config", ("mlret.config", "mlret.preflight")),
    ("run parts", ("mlret.step", "mlret.checkpoint", "mlret.card", "mlret.console")),
    ("commands", ("mlret.export", "mlret.hooks", "mlret.train", "mlret.evaluate", "mlret.mine", "mlret.teacher",
                  "mlret.compile", "mlret.data.__main__", "mlret.testing.*")),
)
# Packages that must not import each other's modules, whatever their layers (docs/architecture.md).
BOUNDARIES = {
    "mlret.losses": ("mlret.models", "mlret.data", "mlret.eval"),  # losses: pure functions of embeddings
    "mlret.models": ("mlret.data", "mlret.losses", "mlret.eval"),
    "mlret.data": ("mlret.models", "mlret.losses", "mlret.eval"),
    "mlret.eval": ("mlret.losses", "mlret.gradcache", "mlret.step", "mlret.loop"),  # evaluators: nothing of training
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The mlret modules `path` (module `name`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import mlret.data.readers as r` -> mlret.data.readers
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def test_the_walker_sees_local_and_relative_imports():
    graph = import_graph()
    assert "mlret.data.units" in graph["mlret.data.readers"]  # a top-level from-import of a submodule
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_mlret_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `module`'s layer: an exact entry, else the longest "pkg.*" holding it."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry == module:
                return i
            if entry.endswith(".*"):
                pkg = entry[:-2]
                if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > best_len:
                    best, best_len = i, len(pkg)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as 'a (layer) imports b (layer)'."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]})")
    return out


def boundary_crossings(graph: dict[str, set[str]]) -> list[str]:
    inside = lambda m, pkg: m == pkg or m.startswith(pkg + ".")
    return [f"{a} imports {b}" for a in sorted(graph) for b in sorted(graph[a]) for pkg, banned in BOUNDARIES.items()
            if inside(a, pkg) and any(inside(b, x) for x in banned)]


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("mlret.data.pipeline") == layer_of("mlret.data") < layer_of("mlret.config")
    assert layer_of("mlret.data.__main__") == len(LAYERS) - 1  # the exact entry beats mlret.data.*
    assert upward_imports({"mlret.data.pipeline": {"mlret.config"}}) == [
        "mlret.data.pipeline (parts) imports mlret.config (config)"]
    assert boundary_crossings({"mlret.losses.x": {"mlret.models.y", "mlret.errors"}}) == [
        "mlret.losses.x imports mlret.models.y"]


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in tests/test_imports.py: {missing}"


def test_no_module_imports_a_higher_layer():
    bad = upward_imports(import_graph())
    assert not bad, "imports that reach up a layer:\n" + "\n".join(bad)


def test_the_design_boundaries_hold():
    bad = boundary_crossings(import_graph())
    assert not bad, "imports across a boundary of docs/architecture.md:\n" + "\n".join(bad)


# A function-level import says why it is not at the top of its module, on its own line: "# lazy: <reason>" (a
# command's jax-free start-up, jax only after JAX_PLATFORMS is set, an optional or heavy dependency such as scann,
# torch or gcsfs): docs/architecture.md, the rule for imports.
LAZY_MARK = "# lazy:"


def unexplained_local_imports(source: str, where: str = "<source>") -> list[str]:
    """Every import inside a function of `source` whose lines carry no "# lazy: <reason>" comment, as
    'where:line: statement'."""
    lines = source.splitlines()
    out: list[str] = []
    seen: set[int] = set()
    for fn in ast.walk(ast.parse(source, where)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in seen:
                continue
            seen.add(id(node))
            text = lines[node.lineno - 1: node.end_lineno]
            marks = [t.split(LAZY_MARK, 1)[1].strip() for t in text if LAZY_MARK in t]
            if not any(marks):
                out.append(f"{where}:{node.lineno}: {text[0].strip()}")
    return out


def test_the_lazy_import_check_sees_an_unexplained_local_import():
    source = ("import os\n\n\ndef f():\n    import json\n    from mlret import storage  # lazy: jax-free start-up\n"
              "    import numpy as np  # lazy:\n\n    def g():\n        from mlret import (\n"
              "            parallel,  # lazy: jax after JAX_PLATFORMS\n        )\n\n    class C:\n"
              "        def m(self):\n            import torch\n")
    assert unexplained_local_imports(source, "x.py") == [
        "x.py:5: import json", "x.py:7: import numpy as np  # lazy:", "x.py:16: import torch"]


def test_every_local_import_of_mlret_says_why_it_is_not_at_the_top():
    bad = [line for name, path in modules().items()
           for line in unexplained_local_imports(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not bad, ("imports inside functions without a '# lazy: <reason>' comment (move them to the top of the "
                     "module, or say why they cannot be there):\n" + "\n".join(bad))

"""The package's layering, checked on the source (``ast``; nothing is imported or run).

Every ``import`` under ``gist_jax/`` counts, function-local and ``TYPE_CHECKING`` ones included:
a lazy import is still a dependency, it only moves the failure to run time. Asserted:
  * no import cycle between modules;
  * no import cycle between packages (``gist_jax.<package>``; a top-level module and a front
    door are each their own unit);
  * no import from a lower layer to a higher one, per ``LAYERS``.
A front door (``python -m gist_jax.<package>.<module>``) sits in its package for the command's
name but is an entry point: its whole module (``FRONT_DOORS``) or its ``main()``
(``FRONT_DOOR_MAINS``: a library module that also has a command) counts as the top layer, and no
library module may import a front door. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "gist_jax"

# Lowest first; a module belongs to the longest prefix that names it. Every module must have a layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # gist_jax/__init__.py (the experiments mapping), ConfigError, leaf helpers (logging, progress bars)
    ("errors, utils", ("gist_jax.errors", "gist_jax", "gist_jax.utils")),
    ("model", ("gist_jax.model",)),
    ("families", ("gist_jax.families",)),  # each family's HF vocabulary around the family-agnostic model
    ("gist", ("gist_jax.gist",)),
    ("hf", ("gist_jax.hf",)),  # name tables, GGUF/safetensors readers, the HF directory writer
    ("data", ("gist_jax.data",)),
    ("train", ("gist_jax.train",)),
    # How every tool reads a run config (--config FILE.py[:VARIANTS], a checkpoint's stored run):
    # above train, whose config schema and checkpoints it reads; below every tool that uses it.
    ("cli support", ("gist_jax.cli_config", "gist_jax.console")),
    ("evaluate, inference", ("gist_jax.evaluate", "gist_jax.inference")),
    ("study, bench", ("gist_jax.study", "gist_jax.bench")),
    ("entry points", ("gist_jax.main", "gist_jax.demo", "gist_jax.demo_parity", "gist_jax.compare_hf",
                      "gist_jax.convert", "gist_jax.export_hf", "gist_jax.inspect_data")),
)
FRONT_DOORS = ("gist_jax.data.bench_input", "gist_jax.evaluate.__main__",
               "gist_jax.bench.__main__", "gist_jax.study.__main__", "gist_jax.bench.gpu_check")
FRONT_DOOR_MAINS = ("gist_jax.train.plan", "gist_jax.train.flops", "gist_jax.train.tie_precompute")


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # module, or "<module>:main" for a front door's main()
    target: str  # module (a ``from package import name`` that is not a module counts as the package)
    line: int


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _main_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def edges(known: dict[str, pathlib.Path]) -> list[Edge]:
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        mains = _main_lines(tree) if name in FRONT_DOOR_MAINS else set()
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            source = f"{name}:main" if getattr(node, "lineno", 0) in mains else name
            out += [Edge(source, t, node.lineno) for t in dict.fromkeys(targets)
                    if t.split(".")[0] == "gist_jax" and t in known]
    return out


def layer_of(module: str) -> int:
    if module.endswith(":main") or module in FRONT_DOORS:
        return len(LAYERS) - 1
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_import_graph.py:LAYERS")
    return best[1]


def unit_of(module: str) -> str:
    """A module's package for the package graph; top-level modules and front doors stand alone."""
    if module.endswith(":main") or module in FRONT_DOORS:
        return module
    parts = module.split(".")
    return module if len(parts) == 1 or (ROOT / f"{parts[1]}.py").is_file() else ".".join(parts[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.fixture(scope="module")
def graph() -> list[Edge]:
    return edges(modules())


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_cycle(graph):
    by_module: dict[str, set[str]] = {}
    for e in graph:
        by_module.setdefault(e.source.removesuffix(":main"), set()).add(e.target)
    by_module = {k: v - {k} for k, v in by_module.items()}  # `from pkg import sub` inside pkg/__init__
    assert find_cycle(by_module) is None, f"import cycle: {' -> '.join(find_cycle(by_module) or [])}"


def test_no_package_cycle(graph):
    by_unit: dict[str, set[str]] = {}
    for e in graph:
        a, b = unit_of(e.source), unit_of(e.target)
        if a != b:
            by_unit.setdefault(a, set()).add(b)
    assert find_cycle(by_unit) is None, f"package cycle: {' -> '.join(find_cycle(by_unit) or [])}"


def test_no_upward_import(graph):
    names = [n for n, _ in LAYERS]
    upward = [f"{e.source} (layer {names[layer_of(e.source)]}) imports {e.target} "
              f"(layer {names[layer_of(e.target)]}) at line {e.line}"
              for e in graph if layer_of(e.target) > layer_of(e.source)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_nothing_imports_a_front_door(graph):
    wrong = [f"{e.source} imports the front door {e.target}" for e in graph
             if e.target in FRONT_DOORS and layer_of(e.source) < len(LAYERS) - 1]
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path):
    """The test itself: an added ``data -> train`` import is found (and a cycle through it)."""
    known = {"gist_jax.data.x": tmp_path / "x.py", "gist_jax.train.y": tmp_path / "y.py"}
    known["gist_jax.data.x"].write_text("def f():\n    from gist_jax.train import y\n")
    known["gist_jax.train.y"].write_text("from gist_jax.data.x import f\n")
    found = edges(known)
    assert [(e.source, e.target) for e in found if layer_of(e.target) > layer_of(e.source)] == [
        ("gist_jax.data.x", "gist_jax.train.y")]
    assert find_cycle({e.source: {e.target} for e in found}) is not None


def shadowed_exports(root: pathlib.Path) -> list[str]:
    """``package.name`` for every name a package's ``__init__`` binds (imports, defs, ``__all__``)
    that is also one of its submodules: importing that submodule anywhere rebinds the package
    attribute to the module, so ``from package import name`` returns the module or the function
    depending on what ran first."""
    out = []
    for init in sorted(root.rglob("__init__.py")):
        submodules = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
        submodules |= {p.name for p in init.parent.iterdir() if (p / "__init__.py").exists()}
        bound: set[str] = set()
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                bound |= {a.asname or a.name for a in node.names
                          if not (node.level == 1 and node.module is None)}  # `from . import sub` is the module
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
        package = ".".join(init.parent.relative_to(root.parent).parts)
        out += [f"{package}.{name}" for name in sorted(bound & submodules)]
    return out


def test_no_package_export_is_shadowed_by_a_submodule(tmp_path):
    """``gist_jax.inference`` exported the function ``generate`` beside a module ``generate.py``:
    the evaluation suites got the module once any test had imported it. Checked on the tree, and
    the check itself on a package built to have the fault."""
    assert shadowed_exports(ROOT) == []
    pkg = tmp_path / "gist_jax" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.decode import generate\n")
    (pkg / "decode.py").write_text("def generate(): ...\n")
    (pkg / "generate.py").write_text("")
    assert shadowed_exports(tmp_path / "gist_jax") == ["gist_jax.pkg.generate"]

"""The size rules of the style guide, checked on the source (``ast``; nothing is imported): no
function in ``gist_jax/`` over 80 lines, no module over 500. ``hf/modeling_gist.py`` is the one
exception to the module rule: it is copied into every export and must stand alone."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "gist_jax"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
STANDALONE = ("hf/modeling_gist.py",)


def long_functions(root: pathlib.Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_80_lines(tmp_path):
    assert long_functions(ROOT, MAX_FUNCTION_LINES) == []
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)  # the check itself
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_module_is_over_500_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES and str(p.relative_to(ROOT)) not in STANDALONE]
    assert long == []

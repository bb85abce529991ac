"""Print the shape of the code base: files over 500 lines, functions over 80 lines, the longest
parameter lists. Used to measure a refactor before and after (quote its output in the change).

    python benchmarks/code_shape.py [uniperceiver upctl]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _n_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def main(roots: list[str]) -> None:
    files = sorted(p for r in roots for p in Path(r).rglob("*.py"))
    long_files, long_funcs, params = [], [], []
    for path in files:
        text = path.read_text()
        n = text.count("\n")
        if n > 500:
            long_files.append((n, str(path)))
        for fn in _functions(ast.parse(text)):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length > 80:
                long_funcs.append((length, f"{path}:{fn.lineno} {fn.name}"))
            params.append((_n_params(fn), f"{path}:{fn.lineno} {fn.name}"))
    print(f"python files: {len(files)}, lines: {sum(p.read_text().count(chr(10)) for p in files)}")
    print(f"files over 500 lines: {len(long_files)}")
    for n, p in sorted(long_files, reverse=True):
        print(f"  {n:5d} {p}")
    print(f"functions over 80 lines: {len(long_funcs)}")
    for n, p in sorted(long_funcs, reverse=True):
        print(f"  {n:5d} {p}")
    print("longest parameter lists (top 8):")
    for n, p in sorted(params, reverse=True)[:8]:
        print(f"  {n:5d} {p}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["uniperceiver", "upctl"])

"""The parameters of nlcl's own stream builders, read from their source without importing them.

`nlcl run` checks a config before it imports torch (a refused value should cost a second, not
the ten or more that torch and Lightning take to import on a loaded machine). Many task fields
default to null in their YAML file, so only the builder's annotation says what they accept
(`train_per_class: int | None`). This module reads those annotations with `ast` from the files
the STREAMS table in nlcl/streams/__init__.py points to; tests/test_cli_speed.py checks that they
equal what `inspect.signature` reports for every registered stream.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

STREAMS_DIR = Path(__file__).resolve().parent / "streams"


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None


@lru_cache(maxsize=None)
def _builders() -> dict[str, tuple[str, str]]:
    """stream name -> (module file stem, function name), from the STREAMS literal and its imports."""
    tree = _parse(STREAMS_DIR / "__init__.py")
    if tree is None:
        return {}
    module_of = {alias.asname or alias.name: node.module
                 for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
                 for alias in node.names}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "STREAMS" and isinstance(node.value, ast.Dict):
            return {k.value: (module_of[v.id], v.id) for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Name) and v.id in module_of}
    return {}


@lru_cache(maxsize=None)
def stream_parameters(stream: str) -> dict[str, str | None] | None:
    """{parameter: annotation text or None} of the builder of `stream`, or None when it is not one
    of nlcl's own (a plugin's stream, or source this reader cannot follow)."""
    where = _builders().get(str(stream))
    if where is None:
        return None
    tree = _parse(STREAMS_DIR / f"{where[0]}.py")
    fn = next((n for n in (tree.body if tree else []) if isinstance(n, ast.FunctionDef) and n.name == where[1]), None)
    if fn is None or fn.args.vararg or fn.args.kwarg:
        return None
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return {a.arg: ast.unparse(a.annotation) if a.annotation is not None else None for a in args}

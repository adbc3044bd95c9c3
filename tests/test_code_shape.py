"""Issue 17's rule of thumb for the code itself: short functions, each a named step."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60  # def line to last line, docstring included


def test_no_function_is_longer_than_60_lines():
    files = [*sorted((ROOT / "finetune").rglob("*.py")), ROOT / "app.py"]
    too_long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "split into named steps: " + ", ".join(too_long)

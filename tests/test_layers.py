"""The tree is the layers: no import circle, no import from a lower layer into a higher one.

`tools/import_graph.py` is the check (`make lint` runs it too); here it guards every
test run. The layer packages stay empty so that importing one module of a layer does
not import the rest of it (`inspect` starts in milliseconds because of that).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "shardkit"
LAYERS = ("format", "storage", "checkpoint", "plan", "engine", "checks", "commands", "cli")


def test_no_import_circle_and_no_upward_import() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_graph.py"), "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0 finding(s)")


def test_every_module_is_in_a_layer_or_shared_by_all() -> None:
    flat = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__", "__main__", "errors", "reports", "sizes", "synthetic", "version"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_layer_packages_import_nothing() -> None:
    for layer in ("format", "checkpoint", "plan", "engine", "checks", "commands"):
        tree = ast.parse((PACKAGE / layer / "__init__.py").read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{layer}/__init__.py imports: importing one module of a layer would load the others"

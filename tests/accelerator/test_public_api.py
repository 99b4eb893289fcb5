"""`accelerator`'s lazy names: each resolves at run time, and type checkers see the same definitions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import accelerator


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse(Path(accelerator.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    return {a.name: str(imp.module) for imp in block.body if isinstance(imp, ast.ImportFrom) for a in imp.names}


def test_every_lazy_name_is_typed_exported_and_resolves_to_its_definition() -> None:
    lazy = accelerator._LAZY
    assert _type_checking_imports() == lazy
    assert set(lazy) <= set(accelerator.__all__)
    for name, module in lazy.items():
        assert getattr(accelerator, name) is getattr(sys.modules[module], name)


def test_importing_accelerator_does_not_import_torch() -> None:
    code = "import sys, accelerator; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

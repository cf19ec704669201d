"""d2m_core knows nothing of Dagster; d2m_assets holds no model or tensor logic."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_dagster() -> None:
    assert "dagster" not in _imports("d2m_core")
    code = ("import sys, pkgutil, importlib, d2m_core\n"
            "for m in pkgutil.walk_packages(d2m_core.__path__, 'd2m_core.'): importlib.import_module(m.name)\n"
            "assert not [m for m in sys.modules if m.startswith('dagster')], 'dagster imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_assets_hold_no_tensor_code() -> None:
    assert not _imports("d2m_assets") & {"torch", "numpy", "open_clip", "PIL", "webdataset", "pyarrow"}

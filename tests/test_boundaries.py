"""d2m_core knows nothing of Dagster; d2m_assets holds no model or tensor logic."""

import ast
import os
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


def test_definitions_load_without_the_compute_stack(tmp_path: Path) -> None:
    """Code servers, the daemon and the webserver load the definitions: they never import torch, open_clip
    or torchvision (only a run's step does, when it computes)."""
    code = ("import sys, d2m_assets\n"
            "assert d2m_assets.defs.resolve_asset_graph().get_all_asset_keys()\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'open_clip', 'd2m_core.compute.pipeline') if m in sys.modules))\n")
    for yml in ("basic.yml", "datacomp.yml"):
        env = {**os.environ, "D2M_CONFIG": str(REPO / "configs" / yml), "DAGSTER_HOME": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, capture_output=True,
                             text=True).stdout
        assert out.strip().splitlines()[-1] == "[]", (yml, out)

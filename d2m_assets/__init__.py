"""d2m_assets: the Dagster asset graph over d2m_core (`dagster ... -m d2m_assets` loads `defs`).

`defs` is built on first access (PEP 562), so `d2m --help` and config errors do not import dagster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_definitions", "defs"]

if TYPE_CHECKING:
    from dagster import Definitions

    from d2m_assets.definitions import build_definitions

    defs: Definitions


def __getattr__(name: str) -> Any:
    if name == "build_definitions":
        from d2m_assets.definitions import build_definitions

        return build_definitions
    if name == "defs":
        from d2m_assets.definitions import build_definitions, config_paths

        value = globals()["defs"] = build_definitions(config_paths())
        return value
    raise AttributeError(f"module 'd2m_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""d2m_assets: the Dagster asset graph over d2m_core (`dagster ... -m d2m_assets` loads `defs`)."""

from d2m_assets.definitions import build_definitions, config_path

defs = build_definitions(config_path())

__all__ = ["build_definitions", "defs"]

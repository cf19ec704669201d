"""d2m_core: DataComp metadata computation as a plain library (no Dagster).

The public names load on first use (PEP 562), so `import d2m_core.config` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConfigError": "d2m_core.config",
    "D2MConfig": "d2m_core.config",
    "load_config": "d2m_core.config",
    "parse_config": "d2m_core.config",
    "create_model": "d2m_core.compute.models",
    "list_models": "d2m_core.compute.models",
    "ShardOutcome": "d2m_core.outputs.records",
    "process_shards": "d2m_core.compute.pipeline",
    "ShardRef": "d2m_core.reading.shards",
    "expand_shards": "d2m_core.reading.shards",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from d2m_core.compute.models import create_model, list_models
    from d2m_core.compute.pipeline import process_shards
    from d2m_core.config import ConfigError, D2MConfig, load_config, parse_config
    from d2m_core.outputs.records import ShardOutcome
    from d2m_core.reading.shards import ShardRef, expand_shards


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'd2m_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

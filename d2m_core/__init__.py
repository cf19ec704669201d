"""d2m_core: DataComp metadata computation as a plain library (no Dagster)."""

from d2m_core.config import ConfigError, D2MConfig, load_config, parse_config
from d2m_core.models import create_model, list_models
from d2m_core.pipeline import ShardOutcome, process_shards
from d2m_core.shards import ShardRef, expand_shards

__all__ = [
    "ConfigError",
    "D2MConfig",
    "ShardOutcome",
    "ShardRef",
    "create_model",
    "expand_shards",
    "list_models",
    "load_config",
    "parse_config",
    "process_shards",
]

"""d2m_core: DataComp metadata computation as a plain library (no Dagster)."""

from d2m_core.config import ConfigError, D2MConfig, load_config, parse_config
from d2m_core.models import create_model, list_models
from d2m_core.pipeline import ShardOutcome, compute_features, compute_scores, write_metadata
from d2m_core.shards import ShardRef, expand_shards

__all__ = [
    "ConfigError",
    "D2MConfig",
    "ShardOutcome",
    "ShardRef",
    "compute_features",
    "compute_scores",
    "create_model",
    "expand_shards",
    "list_models",
    "load_config",
    "parse_config",
    "write_metadata",
]

"""Where the stored dedup reference set lives in the artifacts, and its record (read by the scores and checks)."""

from __future__ import annotations

from typing import Any

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.outputs.records import WeightsRecord


def reference_url(config: D2MConfig) -> str:
    return storage.join(config.artifacts_root, catalog.REFERENCE_ASSET, "reference.npz")


def reference_info(config: D2MConfig) -> dict[str, Any]:
    """The stored dedup reference's record: weights fields, rows, unit_norm, min_norm, max_norm."""
    url = reference_url(config)
    return storage.read_json(url[: -len(".npz")] + ".json")


def reference_record(config: D2MConfig) -> WeightsRecord:
    fields = set(WeightsRecord.__dataclass_fields__)
    return WeightsRecord(**{k: v for k, v in reference_info(config).items() if k in fields})

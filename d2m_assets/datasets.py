"""A dataset's identity in Dagster: the one place that names its asset keys, partitions, groups and sensors.

Each yml is one dataset (its `dataset` field, else a name derived from its output location). Every
per-dataset definition is built from a `Dataset`: asset keys are prefixed with the dataset's name
(`AssetKey([dataset, "clip_b32_scores"])`), and each dataset has its own dynamic partitions
(`<dataset>__shards`, keyed by the tar's stem), so two datasets whose tars share names never share state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetKey, DynamicPartitionsDefinition

from d2m_assets.resources import D2MConfigResource
from d2m_assets.yml_paths import load_recorded_config
from d2m_core import D2MConfig

SEPARATOR = "__"  # between a dataset's name and what it names (dataset names never contain it)


@dataclass(frozen=True)
class Dataset:
    """One dataset: its name and the yml it comes from."""

    name: str
    config_path: str

    @classmethod
    def from_yml(cls, path: str | Path) -> Dataset:
        path = Path(path).resolve()
        return cls(name=load_recorded_config(path).dataset_name, config_path=str(path))

    def key(self, asset: str) -> AssetKey:
        """The asset key of a catalog asset (`clip_b32_scores`, `raw_shards`, ...) in this dataset."""
        return AssetKey([self.name, asset])

    def named(self, thing: str) -> str:
        """The name of a per-dataset sensor, schedule or job: `<dataset>__<thing>`."""
        return f"{self.name}{SEPARATOR}{thing}"

    @property
    def partitions_name(self) -> str:
        return self.named("shards")

    @functools.cached_property
    def partitions(self) -> DynamicPartitionsDefinition:
        """The dataset's shards: one dynamic partition per input tar, keyed by the tar's stem."""
        return DynamicPartitionsDefinition(name=self.partitions_name)

    @property
    def group(self) -> str:
        return self.name

    @functools.cached_property
    def source(self) -> D2MConfigResource:
        """The yml, read afresh at each use (asset bodies, sensors)."""
        return D2MConfigResource(config_path=self.config_path)

    def load(self) -> D2MConfig:
        return self.source.load()

"""The pipeline config as a Dagster resource: the seed-format yml at a path, read with d2m_core."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import ConfigurableResource

from d2m_assets.yml_paths import load_recorded_config
from d2m_core import D2MConfig, ShardRef, expand_shards


class PartitionNotInInputError(ValueError):
    """A partition key that the config's input_tars does not name."""


class D2MConfigResource(ConfigurableResource):
    """Where the yml lives; the same file `d2m run` takes and $D2M_CONFIG names."""

    config_path: str

    def load(self) -> D2MConfig:
        return load_recorded_config(self.config_path)

    def shards(self, config: D2MConfig, keys: Sequence[str]) -> list[ShardRef]:
        """The input tars of these partition keys, in the given order."""
        by_stem = {ref.stem: ref for ref in expand_shards(config.input_tars)}
        missing = [k for k in keys if k not in by_stem]
        if missing:
            raise PartitionNotInInputError(
                f"shard(s) {', '.join(missing)} not found in input_tars {config.input_tars!r} of {self.config_path}"
            )
        return [by_stem[k] for k in keys]

"""`d2m filter` and `d2m reshard`: DataComp's baselines.py and resharder.py on a yml's dataset.

`d2m filter` materializes the dataset's filter asset (in the instance at $DAGSTER_HOME, so the UI shows the run,
its counts and histogram) with the baseline the flags describe, and writes the uid file to --save_path.
`d2m reshard` writes the resharded shards straight from d2m_core (resumable: shards already written are kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dagster import materialize

from d2m_assets.assets.subsets import build_filter_asset
from d2m_assets.datasets import Dataset
from d2m_assets.runner import LOG_CONFIG, ensure_instance
from d2m_assets.recovery import owner_tags
from d2m_core.config import FilterSpec


@dataclass
class FilterRun:
    ok: bool
    run_id: str
    asset: str
    metadata: dict


def filter_config_file(yml: str | Path, spec: FilterSpec, *, echo: Callable[[str], None] = print) -> FilterRun:
    """Materialize the yml's dataset's filter asset `spec.asset_name` with this baseline; returns its metadata."""
    instance = ensure_instance(echo)  # first: it sets a default DAGSTER_HOME, where the yml's folder is recorded
    dataset = Dataset.from_yml(yml)
    config = dataset.load()
    known = next((f for f in config.filters if f.asset_name == spec.asset_name), None)
    if known is not None and not spec.data_files:
        spec = spec.model_copy(update={"data_files": known.data_files})
    asset = build_filter_asset(dataset, spec, config.filter_cron)
    key = dataset.key(spec.asset_name)
    echo(f"dataset {dataset.name}: {spec.name} over {config.output_metadata_dir} -> asset {key.to_user_string()}")
    result = materialize([asset], instance=instance, tags=owner_tags(), run_config=LOG_CONFIG, raise_on_error=False)
    events = [e for e in result.get_asset_materialization_events() if e.materialization.asset_key == key]
    metadata = {k: v.value for k, v in events[-1].materialization.metadata.items()} if events else {}
    return FilterRun(result.success, result.run_id, key.to_user_string(), metadata)

"""The single Definitions object: assets built from d2m_core's catalog, configured by the yml at $D2M_CONFIG."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from dagster import BackfillPolicy, Definitions
from dagster_aws.s3 import S3Resource

from d2m_assets.assets.reference import dedup_reference
from d2m_assets.assets.shards import RAW_SHARDS, build_shard_assets
from d2m_assets.automation import build_automation_sensor
from d2m_assets.resources import D2MConfigResource
from d2m_assets.schedules import discover_shards_job, discover_shards_schedule
from d2m_assets.sensors import new_shards_sensor
from d2m_assets.yml_paths import load_recorded_config
from d2m_core.pipeline import selected_assets

CONFIG_ENV = "D2M_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yml"
DEFAULT_TARS_PER_RUN = 8  # shards per Dagster run when the yml has no tars_per_wds (models load once per run)


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).resolve()


def build_definitions(path: str | Path) -> Definitions:
    """Definitions for one yml: its `tars_per_wds` sets how many shards a backfill run takes."""
    config = load_recorded_config(path)
    selected_assets(config)  # validates names; installs custom_pypath models so they appear as assets
    policy = BackfillPolicy.multi_run(max_partitions_per_run=config.tars_per_wds or DEFAULT_TARS_PER_RUN)
    with warnings.catch_warnings():  # backfill_policy on @asset is marked beta in 1.13; we rely on it knowingly
        warnings.filterwarnings("ignore", message=".*backfill_policy.*is currently in beta")
        assets = [RAW_SHARDS, dedup_reference, build_shard_assets(policy)]
    return Definitions(
        assets=assets,
        sensors=[new_shards_sensor, build_automation_sensor()],
        schedules=[discover_shards_schedule],
        jobs=[discover_shards_job],
        resources={"d2m": D2MConfigResource(config_path=str(path)), "s3": S3Resource()},
    )

"""The single Definitions object: one asset set per dataset, each built from a yml named by $D2M_CONFIG.

Why asset factories with a key prefix per dataset: it is Dagster's idiom for one pipeline over several
datasets; each dataset keeps its own partitions (`<dataset>__shards`) and materialization state, so
datasets whose tars share names (img2dataset names every dataset's shards 00000.tar, 00001.tar, ...)
never share state, and each asset stays within Dagster's recommended partition count.
"""

from __future__ import annotations

import atexit
import gc
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (AssetsDefinition, AssetSpec, BackfillPolicy, Definitions, JobDefinition, ScheduleDefinition,
                     SensorDefinition, in_process_executor)
from dagster_aws.s3 import S3Resource

from d2m_assets.assets.reference import build_reference_asset
from d2m_assets.assets.shards import build_shard_assets, raw_shards_spec
from d2m_assets.assets.subsets import RESHARD_PLAN, RESHARDED, build_subset_assets
from d2m_assets.daemon.automation import build_automation_sensor
from d2m_assets.datasets import Dataset
from d2m_assets.daemon.schedules import build_discovery
from d2m_assets.daemon.sensors import build_new_shards_sensor
from d2m_assets.yml_paths import load_recorded_config
from d2m_core import D2MConfig, catalog
from d2m_core.config import ConfigError
from d2m_core.selection import selected_assets

CONFIG_ENV = "D2M_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yml"
# A process that loads these definitions (a run worker, the code server, `d2m run`) holds torch's, open_clip's and
# dagster's millions of objects; at exit the interpreter's garbage collector traverses them again and again while it
# tears the modules down: 2-8 s after the run's last event. Frozen first, they are freed by reference counting
# alone (every atexit handler still runs, the exit status is the same; objects left in reference cycles are not
# finalized, as Python does not promise anyway).
atexit.register(gc.freeze)
DEFAULT_TARS_PER_RUN = 256  # shards per run when the yml has no tars_per_wds: a run's fixed cost under 5% (README)


def config_paths() -> list[Path]:
    """The ymls of $D2M_CONFIG (one, or several separated by ':'); default configs/demo.yml."""
    raw = os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p.strip()]


def config_path() -> Path:
    """The first yml of $D2M_CONFIG."""
    return config_paths()[0]


@dataclass
class DatasetDefinitions:
    """Everything one dataset adds to the definitions."""

    dataset: Dataset
    assets: list[AssetsDefinition | AssetSpec] = field(default_factory=list)
    sensors: list[SensorDefinition] = field(default_factory=list)
    schedules: list[ScheduleDefinition] = field(default_factory=list)
    jobs: list[JobDefinition] = field(default_factory=list)


def dataset_definitions(dataset: Dataset, config: D2MConfig) -> DatasetDefinitions:
    """The asset factory: a dataset's assets (only those its config needs), checks, sensors and schedule.

    Its `tars_per_wds` sets how many shards a backfill run takes.
    """
    names = selected_assets(config)  # validates names; installs custom_pypath models so they appear as assets
    policy = BackfillPolicy.multi_run(max_partitions_per_run=config.tars_per_wds or DEFAULT_TARS_PER_RUN)
    with warnings.catch_warnings():  # backfill_policy on @asset is marked beta in 1.13; we rely on it knowingly
        warnings.filterwarnings("ignore", message=".*backfill_policy.*is currently in beta")
        shard_assets = build_shard_assets(dataset, names, policy)
    assets: list[AssetsDefinition | AssetSpec] = [raw_shards_spec(dataset), shard_assets]
    if catalog.REFERENCE_ASSET in names:
        assets.append(build_reference_asset(dataset))
    targets = [k for a in assets[1:] for k in a.keys]
    subsets = build_subset_assets(dataset, config)  # filters (automated on filter_cron) and resharding (on request)
    assets += subsets
    targets += [k for a in subsets for k in a.keys if k.path[-1] not in (RESHARD_PLAN, RESHARDED)]
    job, schedule = build_discovery(dataset)
    return DatasetDefinitions(
        dataset=dataset,
        assets=assets,
        sensors=[build_new_shards_sensor(dataset), build_automation_sensor(dataset.named("shard_automation"), targets)],
        schedules=[schedule],
        jobs=[job],
    )


def load_datasets(paths: Sequence[str | Path]) -> list[tuple[Dataset, D2MConfig]]:
    """Each yml's dataset and config; two ymls naming one dataset, or sharing one output folder, are an error."""
    found: list[tuple[Dataset, D2MConfig]] = []
    for path in paths:
        config = load_recorded_config(path)
        dataset = Dataset(name=config.dataset_name, config_path=str(Path(path).resolve()))
        for other, other_config in found:
            if other.name == dataset.name:
                raise ConfigError(f"{path} and {other.config_path} both name dataset {dataset.name!r}: "
                                  "give one of them another `dataset`")
            if other_config.output_metadata_dir.rstrip("/") == config.output_metadata_dir.rstrip("/"):
                raise ConfigError(f"{path} and {other.config_path} both write to {config.output_metadata_dir}: "
                                  "each dataset needs its own output_metadata_dir")
        found.append((dataset, config))
    return found


def build_definitions(paths: str | Path | Sequence[str | Path]) -> Definitions:
    """Definitions for one yml or several (one asset set per dataset, in one code location).

    Every run executes its step in the run worker itself (in-process executor): a d2m run is one step (the
    shard multi-asset, or one subset asset), so Dagster's default multiprocess executor would only start a
    second process that imports torch, open_clip and dagster again (seconds per run). Each run still has its
    own process (the run worker the launcher starts: local, Slurm job or Kubernetes pod).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = [dataset_definitions(dataset, config) for dataset, config in load_datasets(paths)]
    return Definitions(
        assets=[a for p in parts for a in p.assets],
        sensors=[s for p in parts for s in p.sensors],
        schedules=[s for p in parts for s in p.schedules],
        jobs=[j for p in parts for j in p.jobs],
        resources={"s3": S3Resource()},
        executor=in_process_executor,
    )

"""The per-shard assets, as one subsettable multi-asset: features (one pass over each tar), scores (from
stored features), and shard_metadata (DataComp's files, with blocking checks).

Each shard is materialized as soon as its files are written, so a run that dies keeps its finished
shards, and a shard that fails does not fail the others of its run (the run fails after them, naming it).
"""

import warnings

from dagster import (AssetCheckSpec, AssetExecutionContext, AssetKey, AssetSpec, BackfillPolicy, Failure,
                     MetadataValue, multi_asset)

from d2m_assets.automation import SHARD_CONDITION
from d2m_assets.partitions import GPU_POOL, shard_partitions
from d2m_assets.progress import RunLogReporter
from d2m_assets.reporting import check_events, materializations
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog, process_shards
from d2m_core.gpus import claim_device
from d2m_core.validation import CHECKS

RAW_SHARDS = AssetSpec(
    "raw_shards",
    description="img2dataset webdataset tars (external): one partition per tar, reported complete by new_shards_sensor",
    group_name="raw",
    partitions_def=shard_partitions,
    kinds={"webdataset"},
)
METADATA_KEY = AssetKey(catalog.METADATA_ASSET)


def _specs() -> list[AssetSpec]:
    def spec(name: str, deps: list, group: str, description: str, kinds: set[str]) -> AssetSpec:
        return AssetSpec(name, deps=deps, description=description, group_name=group, partitions_def=shard_partitions,
                         kinds=kinds, skippable=True, automation_condition=SHARD_CONDITION)

    features = [spec(a.name, [RAW_SHARDS.key], "features", a.description, {"pytorch"})
                for a in catalog.FEATURE_ASSETS.values()]
    scores = [spec(a.name, list(a.parents), "scores", a.description, {"numpy"}) for a in catalog.SCORE_ASSETS.values()]
    metadata = spec(catalog.METADATA_ASSET, [*catalog.FEATURE_ASSETS, *catalog.SCORE_ASSETS], "metadata",
                    "DataComp's {shard}.parquet, {shard}.npz and {shard}.json in output_metadata_dir", {"parquet"})
    return [*features, *scores, metadata]


def _check_specs() -> list[AssetCheckSpec]:
    with warnings.catch_warnings():  # per-partition checks are a preview feature in 1.13
        warnings.simplefilter("ignore")
        return [AssetCheckSpec(name, asset=METADATA_KEY, partitions_def=shard_partitions, blocking=True) for name in CHECKS]


def build_shard_assets(backfill_policy: BackfillPolicy):
    @multi_asset(name="shard_pipeline", specs=_specs(), check_specs=_check_specs(), can_subset=True,
                 partitions_def=shard_partitions, backfill_policy=backfill_policy, pool=GPU_POOL)
    def shard_pipeline(context: AssetExecutionContext, d2m: D2MConfigResource):
        """Per shard: one pass over the tar for the selected features, then scores, then DataComp's files."""
        config = d2m.load()
        selected = [k.path[-1] for k in context.selected_asset_keys]
        shards = d2m.shards(config, context.partition_keys)
        progress = RunLogReporter(context.log.info)  # the run log, and `d2m run`'s display
        failed, checks = {}, {}
        with claim_device(config.device) as device:  # with several GPUs, each concurrent run its own
            for outcome in process_shards(config, shards, selected, progress, device, progress_every_s=1.0):
                if outcome.error is not None:
                    context.log.error(f"shard {outcome.stem} failed: {outcome.error}")
                    progress.failed(outcome.stem, outcome.error)
                    failed[outcome.stem] = outcome.error
                    continue
                for event in materializations(outcome, selected):
                    context.log_event(event)
                checks[outcome.stem] = outcome.checks
        if context.selected_asset_check_keys and checks:
            yield from check_events(METADATA_KEY, list(checks), checks)
        if failed:
            raise Failure(description=f"{len(failed)} of {len(shards)} shard(s) failed: {', '.join(failed)}",
                          metadata={"failed": MetadataValue.json(failed)})

    return shard_pipeline

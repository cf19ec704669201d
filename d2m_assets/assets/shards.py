"""The per-shard assets of one dataset, as one subsettable multi-asset: features (one pass over each tar),
scores (from stored features), and shard_metadata (DataComp's files, with blocking checks).

Each shard is materialized as soon as its files are written, so a run that dies keeps its finished
shards, and a shard that fails does not fail the others of its run (the run fails after them, naming it).
"""

import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from collections.abc import Sequence

from dagster import (AssetCheckSpec, AssetExecutionContext, AssetsDefinition, AssetSpec, BackfillPolicy, Failure,
                     MetadataValue, multi_asset)

from d2m_assets.daemon.automation import shard_condition
from d2m_assets.datasets import Dataset
from d2m_assets.partitions import GPU_POOL, RAW_SHARDS
from d2m_assets.assets.progress import RunLogReporter
from d2m_assets.assets.reporting import check_evaluations, hold_connections, materializations
from d2m_core import catalog
from d2m_core.compute.gpus import claim_device
from d2m_core.outputs.identity import asset_identity, tar_identities, weights_by_model
from d2m_core.outputs.validation import CHECKS
from d2m_core.selection import verify_weights


def raw_shards_spec(dataset: Dataset) -> AssetSpec:
    return AssetSpec(
        dataset.key(RAW_SHARDS),
        description="img2dataset webdataset tars (external): one partition per tar, reported complete by the "
                    "dataset's new_shards_sensor",
        group_name=dataset.group,
        partitions_def=dataset.partitions,
        kinds={"webdataset"},
    )


def _specs(dataset: Dataset, assets: Sequence[str]) -> list[AssetSpec]:
    """Specs of the config's per-shard assets only (`assets`: catalog names, parents first)."""

    condition = shard_condition(dataset)

    def spec(name: str, parents: Sequence[str], description: str, kinds: set[str]) -> AssetSpec:
        return AssetSpec(dataset.key(name), deps=[dataset.key(p) for p in parents], description=description,
                         group_name=dataset.group, partitions_def=dataset.partitions, kinds=kinds, skippable=True,
                         automation_condition=condition)

    specs = []
    for name in assets:
        if name in catalog.FEATURE_ASSETS:
            specs.append(spec(name, [RAW_SHARDS], catalog.FEATURE_ASSETS[name].description, {"pytorch"}))
        elif name in catalog.SCORE_ASSETS:
            score = catalog.SCORE_ASSETS[name]
            specs.append(spec(name, score.parents, score.description, {"numpy"}))
    parents = [a for a in assets if a in catalog.FEATURE_ASSETS or a in catalog.SCORE_ASSETS]
    specs.append(spec(catalog.METADATA_ASSET, parents,
                      "DataComp's {shard}.parquet, {shard}.npz and {shard}.json in output_metadata_dir", {"parquet"}))
    return specs


def _check_specs(dataset: Dataset) -> list[AssetCheckSpec]:
    with warnings.catch_warnings():  # per-partition checks are a preview feature in 1.13
        warnings.simplefilter("ignore")
        return [AssetCheckSpec(name, asset=dataset.key(catalog.METADATA_ASSET), partitions_def=dataset.partitions,
                               blocking=True) for name in CHECKS]


def build_shard_assets(dataset: Dataset, assets: Sequence[str], backfill_policy: BackfillPolicy) -> AssetsDefinition:
    metadata_key = dataset.key(catalog.METADATA_ASSET)

    @multi_asset(name=dataset.named("shard_pipeline"), specs=_specs(dataset, assets), check_specs=_check_specs(dataset),
                 can_subset=True, partitions_def=dataset.partitions, backfill_policy=backfill_policy, pool=GPU_POOL)
    def shard_pipeline(context: AssetExecutionContext):
        """Per shard: one pass over the tar for the selected features, then scores, then DataComp's files.
        Each shard's materializations and check results are recorded as soon as its files are written."""
        config = dataset.load()
        hold_connections(context.instance)  # each shard's events: one held connection, not 3 new ones per event
        selected = [a for a in assets if dataset.key(a) in context.selected_asset_keys]  # parents first
        shards = dataset.source.shards(config, context.partition_keys)
        tars = tar_identities(shards)  # what produced each shard, recorded with it
        with ThreadPoolExecutor(1) as pool:  # torch and the models' code load while the weights are hashed
            compute = pool.submit(import_module, "d2m_core.compute.pipeline")
            weights = weights_by_model(verify_weights(config))
            process_shards = compute.result().process_shards
        checked = bool(context.selected_asset_check_keys) and catalog.METADATA_ASSET in selected
        progress = RunLogReporter(context.log.info)  # the run log, and `d2m run`'s display
        failed: dict[str, str] = {}
        with claim_device(config.device) as device:  # with several GPUs, each concurrent run its own
            for outcome in process_shards(config, shards, selected, progress, device, progress_every_s=1.0):
                if outcome.error is not None:
                    context.log.error(f"shard {outcome.stem} failed: {outcome.error}")
                    progress.failed(outcome.stem, outcome.error)
                    failed[outcome.stem] = outcome.error
                    continue
                identities = {a: asset_identity(config, a, tars.get(outcome.stem), weights) for a in selected}
                yield from materializations(dataset, outcome, selected, identities)
                if checked:  # blocking: a failed one fails the step once every shard is done
                    yield from check_evaluations(context.instance, metadata_key, outcome.stem, outcome.checks)
        if failed:
            raise Failure(description=f"{len(failed)} of {len(shards)} shard(s) failed: {', '.join(failed)}",
                          metadata={"failed": MetadataValue.json(failed)})

    return shard_pipeline

"""The tar-reading assets: one subsettable multi-asset, one pass over each shard for all selected features."""


from dagster import AssetExecutionContext, AssetSpec, BackfillPolicy, MaterializeResult, multi_asset

from d2m_assets.automation import SHARD_CONDITION
from d2m_assets.partitions import GPU_POOL, shard_partitions
from d2m_assets.reporting import record_outcomes
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog, compute_features
from d2m_core.gpus import claim_device

RAW_SHARDS = AssetSpec(
    "raw_shards",
    description="img2dataset webdataset tars (external): one partition per tar",
    group_name="raw",
    partitions_def=shard_partitions,
    kinds={"webdataset"},
)


def build_feature_assets(backfill_policy: BackfillPolicy):
    specs = [
        AssetSpec(a.name, deps=[RAW_SHARDS.key], description=a.description, group_name="features",
                  partitions_def=shard_partitions, kinds={"pytorch"}, skippable=True, automation_condition=SHARD_CONDITION)
        for a in catalog.FEATURE_ASSETS.values()
    ]

    @multi_asset(name="shard_features", specs=specs, can_subset=True, partitions_def=shard_partitions,
                 backfill_policy=backfill_policy, pool=GPU_POOL)
    def shard_features(context: AssetExecutionContext, d2m: D2MConfigResource):
        """Read each shard once, decode each image once, run every selected model; store features per shard."""
        config = d2m.load()
        selected = [name for name in catalog.FEATURE_ASSETS if any(k.path[-1] == name for k in context.selected_asset_keys)]
        shards = d2m.shards(config, context.partition_keys)
        progress = lambda p: context.log.info(  # noqa: E731
            f"shard {p.shard} done ({p.shards_done}/{p.shards_total}): {p.samples} samples, {p.samples_per_s:.1f} samples/s"
        )
        with claim_device(config.device) as device:  # with several GPUs, each concurrent run its own
            record_outcomes(context, selected, compute_features(config, shards, selected, progress, device))
        for name in selected:
            yield MaterializeResult(asset_key=name)

    return shard_features

"""shard_metadata: DataComp's `{shard}.parquet`, `{shard}.npz` and `{shard}.json`, from stored outputs."""


from dagster import AssetExecutionContext, AssetsDefinition, BackfillPolicy, MaterializeResult, asset

from d2m_assets.automation import SHARD_CONDITION
from d2m_assets.partitions import shard_partitions
from d2m_assets.reporting import record_outcomes
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog, write_metadata


def build_metadata_asset(backfill_policy: BackfillPolicy) -> AssetsDefinition:
    @asset(name=catalog.METADATA_ASSET, deps=[*catalog.FEATURE_ASSETS, *catalog.SCORE_ASSETS], group_name="metadata",
           partitions_def=shard_partitions, backfill_policy=backfill_policy, kinds={"parquet"},
           automation_condition=SHARD_CONDITION)
    def shard_metadata(context: AssetExecutionContext, d2m: D2MConfigResource) -> MaterializeResult:
        """The files DataComp's tools read, in output_metadata_dir: whatever the yml's postprocess lists ask for."""
        record_outcomes(context, [catalog.METADATA_ASSET], write_metadata(d2m.load(), context.partition_keys))
        return MaterializeResult()

    return shard_metadata

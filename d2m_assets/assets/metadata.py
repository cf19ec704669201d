"""shard_metadata: DataComp's `{shard}.parquet`, `{shard}.npz` and `{shard}.json`, from stored outputs,
with the per-shard checks that make each partition trustworthy at a glance."""

import warnings

from dagster import (AssetCheckEvaluation, AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AssetKey,
                     AssetsDefinition, BackfillPolicy, MaterializeResult, asset)

from d2m_assets.automation import SHARD_CONDITION
from d2m_assets.partitions import shard_partitions
from d2m_assets.reporting import record_outcomes
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog, write_metadata
from d2m_core.validation import CHECKS, CheckOutcome, check_shard, score_quantiles

KEY = AssetKey(catalog.METADATA_ASSET)


def _check_specs() -> list[AssetCheckSpec]:
    with warnings.catch_warnings():  # per-partition checks are a preview feature in 1.13
        warnings.simplefilter("ignore")
        return [AssetCheckSpec(name, asset=KEY, partitions_def=shard_partitions, blocking=True) for name in CHECKS]


def build_metadata_asset(backfill_policy: BackfillPolicy) -> AssetsDefinition:
    @asset(name=catalog.METADATA_ASSET, deps=[*catalog.FEATURE_ASSETS, *catalog.SCORE_ASSETS], group_name="metadata",
           partitions_def=shard_partitions, backfill_policy=backfill_policy, kinds={"parquet"},
           automation_condition=SHARD_CONDITION, check_specs=_check_specs())
    def shard_metadata(context: AssetExecutionContext, d2m: D2MConfigResource):
        """The files DataComp's tools read, in output_metadata_dir: whatever the yml's postprocess lists ask for.
        Blocking checks per shard: row count, uids, features, score ranges, failure rate."""
        config = d2m.load()
        record_outcomes(context, [catalog.METADATA_ASSET], write_metadata(config, context.partition_keys))
        results: dict[str, list[CheckOutcome]] = {}
        for stem in context.partition_keys:
            context.add_asset_metadata(score_quantiles(config, stem), asset_key=KEY, partition_key=stem)
            results[stem] = check_shard(config, stem)
        yield MaterializeResult(asset_key=KEY)
        yield from check_events(context.partition_keys, results)

    return shard_metadata


def check_events(stems: list[str], results: dict[str, list[CheckOutcome]]):
    """One result per check: per partition directly in a single-shard run; in a range run, an evaluation per
    partition, then the check's overall result (which fails the run if any shard failed it)."""
    for name in CHECKS:
        outcomes = {stem: next(o for o in results[stem] if o.name == name) for stem in stems}
        if len(stems) > 1:
            for stem, o in outcomes.items():
                yield AssetCheckEvaluation(asset_key=KEY, check_name=name, passed=o.passed, metadata=o.metadata,
                                           partition=stem, description=o.description)
        failed = [stem for stem, o in outcomes.items() if not o.passed]
        only = outcomes[stems[0]]
        metadata = only.metadata if len(stems) == 1 else {"failed_shards": ", ".join(failed) or "none"}
        yield AssetCheckResult(asset_key=KEY, check_name=name, passed=not failed, metadata=metadata,
                               description=only.description)

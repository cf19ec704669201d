"""Score assets: computed from stored features, so new score logic never recomputes features."""


from dagster import AssetExecutionContext, AssetsDefinition, BackfillPolicy, MaterializeResult, asset

from d2m_assets.automation import SHARD_CONDITION
from d2m_assets.partitions import shard_partitions
from d2m_assets.reporting import record_outcomes
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog, compute_scores


def build_score_asset(spec: catalog.ScoreAsset, backfill_policy: BackfillPolicy) -> AssetsDefinition:
    @asset(name=spec.name, deps=list(spec.parents), description=spec.description, group_name="scores",
           partitions_def=shard_partitions, backfill_policy=backfill_policy, kinds={"numpy"},
           automation_condition=SHARD_CONDITION)
    def score(context: AssetExecutionContext, d2m: D2MConfigResource) -> MaterializeResult:
        record_outcomes(context, [spec.name], compute_scores(d2m.load(), context.partition_keys, spec.name))
        return MaterializeResult()

    return score


def build_score_assets(backfill_policy: BackfillPolicy) -> list[AssetsDefinition]:
    return [build_score_asset(spec, backfill_policy) for spec in catalog.SCORE_ASSETS.values()]

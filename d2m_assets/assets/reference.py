"""dedup_reference: the evaluation-set ISC embeddings dedup_scores compares against (one, unpartitioned)."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from d2m_assets.automation import REFERENCE_CONDITION
from d2m_assets.reporting import outcome_metadata
from d2m_assets.resources import D2MConfigResource
from d2m_core import catalog
from d2m_core.pipeline import store_reference


@asset(name=catalog.REFERENCE_ASSET, group_name="references", kinds={"numpy"}, automation_condition=REFERENCE_CONDITION)
def dedup_reference(context: AssetExecutionContext, d2m: D2MConfigResource) -> MaterializeResult:
    """DataComp's eval_dedup_embeddings.pt, verified and stored; a new set recomputes dedup_scores only."""
    outcome = store_reference(d2m.load())
    return MaterializeResult(metadata=outcome_metadata(outcome, catalog.REFERENCE_ASSET))

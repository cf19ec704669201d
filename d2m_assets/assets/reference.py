"""dedup_reference: the evaluation-set ISC embeddings dedup_scores compares against (one per dataset, unpartitioned)."""

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, asset

from d2m_assets.daemon.automation import REFERENCE_CONDITION
from d2m_assets.datasets import Dataset
from d2m_assets.assets.reporting import outcome_metadata
from d2m_core import catalog


def build_reference_asset(dataset: Dataset) -> AssetsDefinition:
    @asset(key=dataset.key(catalog.REFERENCE_ASSET), group_name=dataset.group, kinds={"numpy"},
           automation_condition=REFERENCE_CONDITION)
    def dedup_reference(context: AssetExecutionContext) -> MaterializeResult:
        """DataComp's eval_dedup_embeddings.pt, verified and stored; a new set recomputes dedup_scores only."""
        from d2m_core.compute.pipeline import store_reference  # torch: imported by runs, not by the definitions

        outcome = store_reference(dataset.load())
        return MaterializeResult(metadata=outcome_metadata(outcome, catalog.REFERENCE_ASSET))

    return dedup_reference

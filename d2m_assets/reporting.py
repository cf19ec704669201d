"""Per-shard materialization metadata and failure handling, shared by every asset body."""


from collections.abc import Iterable, Sequence

from dagster import AssetExecutionContext, AssetKey, Failure, MetadataValue

from d2m_core import ShardOutcome


def outcome_metadata(outcome: ShardOutcome, asset: str) -> dict[str, object]:
    meta: dict[str, object] = {"samples_per_s": round(outcome.samples_per_s, 2)}
    if outcome.stats is not None:
        meta |= {
            "dagster/partition_row_count": outcome.stats.samples_written,
            "samples_read": outcome.stats.samples_read,
            "samples_failed": outcome.stats.samples_failed,
        }
    if outcome.weights:
        meta["weights"] = outcome.weights_kind
        meta["weights_detail"] = MetadataValue.json({w.model: w.as_dict() for w in outcome.weights})
    if asset in outcome.paths:
        meta["path"] = MetadataValue.path(outcome.paths[asset])
    for name, path in outcome.paths.items():
        if name in ("parquet", "npz", "json"):
            meta[f"{name}_path"] = MetadataValue.path(path)
    return meta


def record_outcomes(context: AssetExecutionContext, assets: Sequence[str], outcomes: Iterable[ShardOutcome]) -> None:
    """Attach each shard's metadata to each asset's partition; after all shards, fail if any shard failed."""
    failed: list[str] = []
    for outcome in outcomes:
        if outcome.error is not None:
            context.log.error(f"shard {outcome.stem} failed: {outcome.error}")
            failed.append(f"{outcome.stem}: {outcome.error}")
            continue
        for asset in assets:
            context.add_asset_metadata(outcome_metadata(outcome, asset), asset_key=AssetKey(asset), partition_key=outcome.stem)
    if failed:
        raise Failure(description=f"{len(failed)} shard(s) failed", metadata={"failed": MetadataValue.json(failed)})

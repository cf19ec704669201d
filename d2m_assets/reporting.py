"""Per-shard materialization events and check results, shared by the asset bodies."""

from collections.abc import Iterator

from dagster import AssetCheckEvaluation, AssetCheckResult, AssetKey, AssetMaterialization, MetadataValue

from d2m_core import ShardOutcome
from d2m_core.validation import CHECKS, CheckOutcome


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
    meta |= outcome.metadata
    if asset in outcome.paths:
        meta["path"] = MetadataValue.path(outcome.paths[asset])
    for name in ("parquet", "npz", "json"):
        if name in outcome.paths:
            meta[f"{name}_path"] = MetadataValue.path(outcome.paths[name])
    return meta


def materializations(outcome: ShardOutcome, assets: list[str]) -> Iterator[AssetMaterialization]:
    """One materialization per selected asset for this shard (shard_metadata also gets the score quantiles)."""
    for asset in assets:
        meta = outcome_metadata(outcome, asset)
        if asset == "shard_metadata":
            meta |= outcome.quantiles
        yield AssetMaterialization(asset_key=asset, partition=outcome.stem, metadata=meta)


def check_events(key: AssetKey, stems: list[str], results: dict[str, list[CheckOutcome]]):
    """One result per check: per partition directly in a single-shard run; in a range run, an evaluation per
    partition, then the check's overall result (which fails the run if any shard failed it)."""
    for name in CHECKS:
        outcomes = {stem: next(o for o in results[stem] if o.name == name) for stem in stems}
        if len(stems) > 1:
            for stem, o in outcomes.items():
                yield AssetCheckEvaluation(asset_key=key, check_name=name, passed=o.passed, metadata=o.metadata,
                                           partition=stem, description=o.description)
        failed = [stem for stem, o in outcomes.items() if not o.passed]
        only = outcomes[stems[0]]
        metadata = only.metadata if len(stems) == 1 else {"failed_shards": ", ".join(failed) or "none"}
        yield AssetCheckResult(asset_key=key, check_name=name, passed=not failed, metadata=metadata,
                               description=only.description)

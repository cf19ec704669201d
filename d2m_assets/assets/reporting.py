"""Per-shard materialization events and check results, shared by the asset bodies."""

import weakref
from collections.abc import Iterator, Sequence

from dagster import (AssetCheckEvaluation, AssetKey, AssetMaterialization, AssetRecordsFilter,
                     DagsterEventType, DagsterInstance, MetadataValue)

from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData

from d2m_assets.datasets import Dataset
from d2m_core import ShardOutcome
from d2m_core.outputs.identity import Identity
from d2m_core.outputs.records import CheckOutcome


_HELD: "weakref.WeakSet[DagsterInstance]" = weakref.WeakSet()


def hold_connections(instance: DagsterInstance) -> None:
    """Keep the event log's PostgreSQL connection open between events for the rest of this process (as
    dagster-webserver does: Dagster's `optimize_for_webserver`, without a statement timeout). Dagster's
    PostgreSQL storage otherwise opens a new connection for each statement: 3 per recorded event. One held
    connection per process (one per running run); nothing changes on SQLite. Once per instance."""
    if instance not in _HELD:
        instance.event_log_storage.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
        _HELD.add(instance)


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


DATA_VERSION_TAG = "dagster/data_version"  # Dagster's data version of a materialization (indexed per partition)
IDENTITY_TAG_PREFIX = "d2m/"  # d2m/tar, d2m/output, d2m/weights: digests of what produced a materialization


def identity_tags(identity: Identity) -> dict[str, str]:
    """The identity as tags: the whole as Dagster's data version, each part under d2m/<part>."""
    return {DATA_VERSION_TAG: identity.version} | {IDENTITY_TAG_PREFIX + p: d for p, d in identity.parts.items()}


def recorded_parts(tags: dict[str, str]) -> dict[str, str]:
    """The identity parts recorded in a materialization's tags."""
    return {k[len(IDENTITY_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(IDENTITY_TAG_PREFIX)}


def materializations(dataset: Dataset, outcome: ShardOutcome, assets: list[str],
                     identities: dict[str, Identity]) -> Iterator[AssetMaterialization]:
    """One materialization per selected asset for this shard (shard_metadata also gets the score quantiles),
    each with the identity of what produced it (tar, output location, weights)."""
    for asset in assets:
        meta = outcome_metadata(outcome, asset)
        if asset == "shard_metadata":
            meta |= outcome.quantiles
        identity = identities[asset]
        meta["d2m/identity"] = MetadataValue.json(identity.detail)
        yield AssetMaterialization(asset_key=dataset.key(asset), partition=outcome.stem, metadata=meta,
                                   tags=identity_tags(identity))


def check_evaluations(instance: DagsterInstance, key: AssetKey, stem: str,
                      outcomes: list[CheckOutcome]) -> Iterator[AssetCheckEvaluation]:
    """The blocking checks' results for one shard, each targeting that partition's latest materialization
    of `key` (just recorded), so the UI shows them per partition as soon as the shard is done."""
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[stem]), limit=1).records
    target = (AssetCheckEvaluationTargetMaterializationData(run_id=records[0].event_log_entry.run_id,
                                                            storage_id=records[0].storage_id,
                                                            timestamp=records[0].timestamp) if records else None)
    for o in outcomes:
        yield AssetCheckEvaluation(asset_key=key, check_name=o.name, passed=o.passed, metadata=o.metadata,
                                   partition=stem, description=o.description, blocking=True,
                                   target_materialization_data=target)


def latest_versions(instance: DagsterInstance, key: AssetKey, stems: Sequence[str]) -> dict[str, str | None]:
    """The data version of each partition's latest materialization (None: one without; absent: never
    materialized)."""
    storage = instance.event_log_storage
    latest = storage.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION)
    tags = storage.get_latest_tags_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG],
                                                asset_partitions=list(stems))
    return {s: tags.get(s, {}).get(DATA_VERSION_TAG) for s in stems if s in latest}


def recorded_identity(instance: DagsterInstance, key: AssetKey, stem: str) -> dict[str, str]:
    """The identity parts of a partition's latest materialization (empty when it has none)."""
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[stem]), limit=1).records
    return recorded_parts(records[0].asset_materialization.tags or {}) if records else {}

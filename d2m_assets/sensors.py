"""Each dataset's new_shards_sensor: registers each complete img2dataset tar at the config's input as a
partition of the dataset (`<dataset>__shards`) and reports its raw_shards materialization, with the tar's
identity (size and mtime, or ETag). Each tick it also re-checks a bounded slice of the registered tars
(D2M_RECHECK_PER_TICK, default 500, in turn through all of them): a tar whose identity changed since it was
recorded is reported again, so automation recomputes that shard (its input was updated)."""

import os
from collections.abc import Iterator, Sequence

from dagster import (AssetMaterialization, AssetRecordsFilter, DagsterEventType, DagsterInstance, MetadataValue,
                     SensorDefinition, SensorEvaluationContext, SensorResult, SkipReason, sensor)
from dagster_aws.s3 import S3Resource

from d2m_assets.automation import default_status, sensor_interval
from d2m_assets.datasets import Dataset
from d2m_assets.partitions import RAW_SHARDS
from d2m_assets.reporting import DATA_VERSION_TAG
from d2m_core import ShardRef
from d2m_core.config import D2MConfig
from d2m_core.discovery import DiscoveryCursor, discover
from d2m_core.identity import tar_digest, tar_identities

RECHECK_ENV = "D2M_RECHECK_PER_TICK"  # registered tars whose identity each tick re-checks (default 500)


def s3_lister(s3: S3Resource):
    """List an s3:// prefix after a key with ListObjectsV2 StartAfter: each scan reads only new keys."""
    client = s3.get_client()

    def list_after(prefix: str, after: str | None) -> Iterator[str]:
        bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
        key_prefix = key_prefix + "/" if key_prefix else ""
        kwargs = {"Bucket": bucket, "Prefix": key_prefix}
        if after:
            kwargs["StartAfter"] = after[len(f"s3://{bucket}/"):]
        for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"

    return list_after


def find_new_shards(config: D2MConfig, cursor: DiscoveryCursor, known: set[str], s3: S3Resource) -> tuple[list[ShardRef], DiscoveryCursor]:
    lister = s3_lister(s3) if isinstance(config.input_tars, str) and config.input_tars.startswith("s3://") else None
    return discover(config.input_tars, cursor, known=known, list_after=lister)


def raw_shard_event(dataset: Dataset, ref: ShardRef, tar: dict | None) -> AssetMaterialization:
    """raw_shards of this partition is materialized: its tar is complete, at this URL, with this identity."""
    return AssetMaterialization(dataset.key(RAW_SHARDS), partition=ref.stem,
                                metadata={"url": ref.url, "tar": MetadataValue.json(tar or {})},
                                tags={DATA_VERSION_TAG: tar_digest(tar)})  # the tar part of shard identities


def registration(dataset: Dataset, refs: list[ShardRef]) -> dict:
    """The partition adds and raw_shards materializations for newly found shards."""
    tars = tar_identities(refs)
    return {
        "dynamic_partitions_requests": [dataset.partitions.build_add_request([r.stem for r in refs])],
        "asset_events": [raw_shard_event(dataset, r, tars.get(r.stem)) for r in refs],
    }


def recheck_per_tick() -> int:
    return int(os.environ.get(RECHECK_ENV, "500"))


def changed_tars(instance: DagsterInstance, dataset: Dataset, known: Sequence[str], start: int,
                 count: int) -> tuple[list[AssetMaterialization], int]:
    """Re-check `count` registered tars from position `start` (wrapping): a raw_shards event for each whose
    identity differs from the one recorded when it was registered; and where the next re-check starts."""
    if not known or count <= 0:
        return [], 0
    stems = [known[(start + i) % len(known)] for i in range(min(count, len(known)))]
    key = dataset.key(RAW_SHARDS)
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION,
                                                                        partitions=set(stems))
    records = instance.fetch_materializations(AssetRecordsFilter(key, storage_ids=list(ids.values())),
                                              limit=max(len(ids), 1)).records
    latest = {r.partition_key or "": r.asset_materialization for r in records}
    refs = [ShardRef(s, str(latest[s].metadata["url"].value)) for s in stems
            if s in latest and "url" in latest[s].metadata and DATA_VERSION_TAG in (latest[s].tags or {})]
    now = tar_identities(refs)
    events = [raw_shard_event(dataset, r, now[r.stem]) for r in refs
              if now[r.stem] is not None and tar_digest(now[r.stem]) != latest[r.stem].tags[DATA_VERSION_TAG]]
    return events, (start + len(stems)) % len(known)


def build_new_shards_sensor(dataset: Dataset) -> SensorDefinition:
    @sensor(name=dataset.named("new_shards_sensor"), minimum_interval_seconds=sensor_interval(),
            default_status=default_status(),
            description=f"Registers complete tars (their NNNNN_stats.json present) at {dataset.name}'s input_tars "
                        "as its shard partitions")
    def new_shards_sensor(context: SensorEvaluationContext, s3: S3Resource):
        config = dataset.load()
        known = context.instance.get_dynamic_partitions(dataset.partitions_name)
        refs, cursor = find_new_shards(config, DiscoveryCursor.loads(context.cursor), set(known), s3)
        changed, cursor.recheck = changed_tars(context.instance, dataset, known, cursor.recheck, recheck_per_tick())
        if changed:
            context.log.info(f"{len(changed)} tar(s) changed since registered: "
                             f"{', '.join(e.partition or '' for e in changed)}")
        if not refs:
            if changed:
                return SensorResult(cursor=cursor.dumps(), asset_events=changed)
            return SensorResult(skip_reason=SkipReason(f"no new complete tar at {config.input_tars}"),
                                cursor=cursor.dumps())
        context.log.info(f"{len(refs)} new shard(s): {refs[0].stem} .. {refs[-1].stem}")
        new = registration(dataset, refs)
        return SensorResult(cursor=cursor.dumps(), dynamic_partitions_requests=new["dynamic_partitions_requests"],
                            asset_events=new["asset_events"] + changed)

    return new_shards_sensor

"""Each dataset's new_shards_sensor: registers each complete img2dataset tar at the config's input as a
partition of the dataset (`<dataset>__shards`) and reports its raw_shards materialization, with the tar's
identity (size and mtime, or ETag). The sensor stores those events itself, in batches (one INSERT per
STORE_BATCH events on PostgreSQL), each batch's partitions added after its events in one statement.
Dagster's daemon would store a SensorResult's events one at a time and look each partition key up before
adding it: 92-158 ms per shard on PostgreSQL here against 1.3-2.8 ms (bench/instance_scale.py), 44 hours
for DataComp xlarge. Each tick it also re-checks a bounded slice of the registered tars
(D2M_RECHECK_PER_TICK, default 500, in turn through all of them): a tar whose identity changed since it was
recorded is reported again, so automation recomputes that shard (its input was updated)."""

import logging
import os
import time
from dataclasses import replace
from collections.abc import Iterator, Sequence

from dagster import (AssetMaterialization, AssetRecordsFilter, DagsterEvent, DagsterEventType, DagsterInstance,
                     EventLogEntry, MetadataValue, SensorDefinition, SensorEvaluationContext, SensorResult, SkipReason,
                     sensor)
from dagster._core.events import StepMaterializationData
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID
from dagster_aws.s3 import S3Resource

from d2m_assets.daemon.automation import default_status, sensor_interval
from d2m_assets.datasets import Dataset
from d2m_assets.partitions import RAW_SHARDS
from d2m_assets.assets.reporting import DATA_VERSION_TAG
from d2m_core import ShardRef
from d2m_core.config import D2MConfig
from d2m_core.outputs.identity import tar_digest, tar_identities
from d2m_core.reading.discovery import DiscoveryCursor, discover

RECHECK_ENV = "D2M_RECHECK_PER_TICK"  # registered tars whose identity each tick re-checks (default 500)
STORE_BATCH = 1000  # raw_shards events per write
# Seconds of registering per evaluation: well under the daemon's 60 s limit on a sensor evaluation (the rest
# is registered by the next evaluations; on SQLite, which stores events one at a time, a few hundred tars).
REGISTER_BUDGET_S = 20.0


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


def store_runless(instance: DagsterInstance, events: Sequence[AssetMaterialization]) -> None:
    """Store materializations outside any run, as `report_runless_asset_event` does, STORE_BATCH per write
    (Dagster's `store_event_batch`: on PostgreSQL one INSERT for the events, one for their tags)."""
    for start in range(0, len(events), STORE_BATCH):
        instance.event_log_storage.store_event_batch([
            EventLogEntry(error_info=None, level=logging.INFO, user_message="", run_id=RUNLESS_RUN_ID,
                          timestamp=time.time(), job_name=RUNLESS_JOB_NAME,
                          dagster_event=DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, RUNLESS_JOB_NAME,
                                                     event_specific_data=StepMaterializationData(e)))
            for e in events[start:start + STORE_BATCH]])


def register_shards(instance: DagsterInstance, dataset: Dataset, refs: Sequence[ShardRef],
                    changed: Sequence[AssetMaterialization] = (), budget_s: float | None = None) -> list[ShardRef]:
    """Report `changed` tars' raw_shards events, then register the new shards STORE_BATCH at a time: a batch's
    raw_shards materializations, then those shards as partitions (the daemon's order: a tick that dies in
    between finds them again, since they are not partitions yet). Past `budget_s` seconds it stops after the
    current batch. Returns the shards registered."""
    start = time.monotonic()
    store_runless(instance, list(changed))
    tars = tar_identities(refs)  # one listing per folder
    done: list[ShardRef] = []
    for first in range(0, len(refs), STORE_BATCH):
        batch = refs[first:first + STORE_BATCH]
        store_runless(instance, [raw_shard_event(dataset, r, tars.get(r.stem)) for r in batch])
        instance.add_dynamic_partitions(dataset.partitions_name, [r.stem for r in batch])
        done += batch
        if budget_s is not None and time.monotonic() - start > budget_s:
            break
    return done


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
        if not refs and not changed:
            return SensorResult(skip_reason=SkipReason(f"no new complete tar at {config.input_tars}"),
                                cursor=cursor.dumps())
        done = register_shards(context.instance, dataset, refs, changed, budget_s=REGISTER_BUDGET_S)
        found = f"{len(done)} new shard(s) registered" + (f": {done[0].stem} .. {done[-1].stem}" if done else "")
        if len(done) < len(refs):  # the next evaluation lists from here again and skips those now registered
            found += f" ({len(refs) - len(done)} more found, registered next)"
            cursor = replace(DiscoveryCursor.loads(context.cursor), recheck=cursor.recheck)
        context.log.info(found)
        return SensorResult(cursor=cursor.dumps(), skip_reason=SkipReason(
            f"{found}, {len(changed)} changed tar(s) reported; automation materializes them"))

    return new_shards_sensor

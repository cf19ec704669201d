"""Each dataset's new_shards_sensor: registers each complete img2dataset tar at the config's input as a
partition of the dataset (`<dataset>__shards`) and reports its raw_shards materialization."""

from collections.abc import Iterator

from dagster import (AssetMaterialization, SensorDefinition, SensorEvaluationContext, SensorResult, SkipReason,
                     sensor)
from dagster_aws.s3 import S3Resource

from d2m_assets.automation import default_status, sensor_interval
from d2m_assets.datasets import Dataset
from d2m_assets.partitions import RAW_SHARDS
from d2m_core import ShardRef
from d2m_core.config import D2MConfig
from d2m_core.discovery import DiscoveryCursor, discover


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


def raw_shard_event(dataset: Dataset, ref: ShardRef) -> AssetMaterialization:
    """raw_shards of this partition is materialized: its tar is complete, at this URL."""
    return AssetMaterialization(dataset.key(RAW_SHARDS), partition=ref.stem, metadata={"url": ref.url})


def registration(dataset: Dataset, refs: list[ShardRef]) -> dict:
    """The partition adds and raw_shards materializations for newly found shards."""
    return {
        "dynamic_partitions_requests": [dataset.partitions.build_add_request([r.stem for r in refs])],
        "asset_events": [raw_shard_event(dataset, r) for r in refs],
    }


def build_new_shards_sensor(dataset: Dataset) -> SensorDefinition:
    @sensor(name=dataset.named("new_shards_sensor"), minimum_interval_seconds=sensor_interval(),
            default_status=default_status(),
            description=f"Registers complete tars (their NNNNN_stats.json present) at {dataset.name}'s input_tars "
                        "as its shard partitions")
    def new_shards_sensor(context: SensorEvaluationContext, s3: S3Resource):
        config = dataset.load()
        known = set(context.instance.get_dynamic_partitions(dataset.partitions_name))
        refs, cursor = find_new_shards(config, DiscoveryCursor.loads(context.cursor), known, s3)
        if not refs:
            return SensorResult(skip_reason=SkipReason(f"no new complete tar at {config.input_tars}"),
                                cursor=cursor.dumps())
        context.log.info(f"{len(refs)} new shard(s): {refs[0].stem} .. {refs[-1].stem}")
        return SensorResult(cursor=cursor.dumps(), **registration(dataset, refs))

    return new_shards_sensor

"""discover_shards_schedule: the cron alternative to new_shards_sensor, for deployments that prefer ticks on a clock.

It runs `discover_shards_job`, which registers complete tars the same way; automation then processes them.
"""

from dagster import DefaultScheduleStatus, OpExecutionContext, RunRequest, job, op, schedule
from dagster_aws.s3 import S3Resource

from d2m_assets.partitions import SHARDS
from d2m_assets.resources import D2MConfigResource
from d2m_assets.sensors import find_new_shards, raw_shard_event
from d2m_core.discovery import DiscoveryCursor


@op
def discover_shards(context: OpExecutionContext, d2m: D2MConfigResource, s3: S3Resource) -> None:
    """Register every complete tar not yet a partition (a full listing: schedules keep no cursor)."""
    config = d2m.load()
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    refs, _ = find_new_shards(config, DiscoveryCursor(), known, s3)
    context.instance.add_dynamic_partitions(SHARDS, [r.stem for r in refs])
    for ref in refs:
        context.log_event(raw_shard_event(ref))
    context.log.info(f"registered {len(refs)} new shard(s)")


@job(description="Register complete tars at the config's input_tars as shard partitions")
def discover_shards_job() -> None:
    discover_shards()


@schedule(job=discover_shards_job, cron_schedule="0 * * * *", default_status=DefaultScheduleStatus.STOPPED,
          description="Hourly registration of newly downloaded shards (alternative to new_shards_sensor)")
def discover_shards_schedule(context) -> RunRequest:
    return RunRequest()

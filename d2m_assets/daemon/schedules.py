"""Each dataset's discover_shards_schedule: the cron alternative to its new_shards_sensor, for deployments
that prefer ticks on a clock. It runs the dataset's discover_shards_job, which registers complete tars the
same way; automation then processes them."""

from dagster import (DefaultScheduleStatus, JobDefinition, OpExecutionContext, RunRequest, ScheduleDefinition, job,
                     op, schedule)
from dagster_aws.s3 import S3Resource

from d2m_assets.datasets import Dataset
from d2m_assets.daemon.sensors import find_new_shards, raw_shard_event
from d2m_core.outputs.identity import tar_identities
from d2m_core.reading.discovery import DiscoveryCursor


def build_discovery(dataset: Dataset) -> tuple[JobDefinition, ScheduleDefinition]:
    @op(name=dataset.named("discover_shards"))
    def discover_shards(context: OpExecutionContext, s3: S3Resource) -> None:
        """Register every complete tar not yet a partition (a full listing: schedules keep no cursor)."""
        config = dataset.load()
        known = set(context.instance.get_dynamic_partitions(dataset.partitions_name))
        refs, _ = find_new_shards(config, DiscoveryCursor(), known, s3)
        context.instance.add_dynamic_partitions(dataset.partitions_name, [r.stem for r in refs])
        tars = tar_identities(refs)
        for ref in refs:
            context.log_event(raw_shard_event(dataset, ref, tars.get(ref.stem)))
        context.log.info(f"registered {len(refs)} new shard(s)")

    @job(name=dataset.named("discover_shards_job"),
         description=f"Register complete tars at {dataset.name}'s input_tars as its shard partitions")
    def discover_shards_job() -> None:
        discover_shards()

    @schedule(name=dataset.named("discover_shards_schedule"), job=discover_shards_job, cron_schedule="0 * * * *",
              default_status=DefaultScheduleStatus.STOPPED,
              description="Hourly registration of newly downloaded shards (alternative to new_shards_sensor)")
    def discover_shards_schedule(context) -> RunRequest:
        return RunRequest()

    return discover_shards_job, discover_shards_schedule

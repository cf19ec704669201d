"""When the daemon materializes shard assets by itself: the automation conditions and their sensor.

Why declarative automation rather than run requests from the discovery sensor: one mechanism covers new
shards, shards still missing after a crash, and scores made stale by a new dedup reference set, and its
backfills follow each asset's BackfillPolicy (several shards per run, models loaded once per run).
Failed runs are retried by the daemon's run retries (dagster.yaml, bounded); the condition never requests a
partition whose last run failed, or one already requested or running, so nothing is requested twice.

Why no `any_deps_updated` on shard assets: what a shard asset's output depends on is its identity (its tar,
output location and weights; the dedup reference set is a weights file), which `identity_changed` compares
directly. A parent recomputed with the same identity gives the same bytes, so its children need no rerun; and
Dagster's dependency-update trigger races with the status of multi-asset runs (a parent's materialization
seen in one evaluation, the child's only in the next, the run already over): a finished shard was requested
a second time under load. Likewise `missing` is read as of the evaluation's start and `in_progress` when it
is computed: a run that records a shard and ends in between left it missing and not in progress, so a
missing shard is also checked against what is recorded when it is evaluated (`recorded_now`).
"""

import os

from collections.abc import Sequence

from dagster import (AssetKey, AssetSelection, AutomationCondition, AutomationConditionSensorDefinition,
                     DefaultSensorStatus)

from d2m_assets.datasets import Dataset
from d2m_assets.daemon.staleness import IdentityChanged, RecordedNow

AUTOMATION_ENV = "D2M_AUTOMATION"  # "off" leaves the sensors stopped until turned on in the UI
INTERVAL_ENV = "D2M_SENSOR_INTERVAL_S"  # seconds between evaluations of both sensors (default 30)

_never_attempted_missing = AutomationCondition.missing() & ~AutomationCondition.execution_failed()


def shard_condition(dataset: Dataset) -> AutomationCondition:
    """A shard asset is requested when it is missing or its recorded identity no longer matches: materialized
    from another tar (reported again by the sensor as it changed), output location or weights (the dedup
    reference set included) than a run would use now (see d2m_assets.daemon.staleness)."""
    changed = IdentityChanged(dataset) & ~AutomationCondition.execution_failed()
    return (
        (_never_attempted_missing | changed)
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        # last, so read after in_progress: a run not in progress then has recorded its shards by now
        & (~RecordedNow(dataset) | changed)
    ).with_label("shard missing, or its identity changed")

REFERENCE_CONDITION = (_never_attempted_missing & ~AutomationCondition.in_progress()).with_label("missing")


def default_status() -> DefaultSensorStatus:
    off = os.environ.get(AUTOMATION_ENV, "on").strip().lower() in ("off", "0", "false", "no")
    return DefaultSensorStatus.STOPPED if off else DefaultSensorStatus.RUNNING


def sensor_interval() -> int:
    return int(os.environ.get(INTERVAL_ENV, "30"))


def build_automation_sensor(name: str, targets: Sequence[AssetKey]) -> AutomationConditionSensorDefinition:
    """The automation sensor of one dataset, over its assets (`targets`; never the external raw_shards)."""
    return AutomationConditionSensorDefinition(
        name,
        target=AssetSelection.assets(*targets),
        default_status=default_status(),
        minimum_interval_seconds=sensor_interval(),
        emit_backfills=True,
        use_user_code_server=True,  # identity_changed is Python of ours: evaluated in the code server
        description="Materializes new, missing and stale shard assets in backfills of tars_per_wds shards per run",
    )


def filter_condition(cron: str) -> AutomationCondition:
    """A filter (unpartitioned, reading every shard) re-runs at most once per `cron` tick, when shard_metadata was
    materialized since the filter last ran, or when it never ran and some shard exists: not once per shard."""
    stale = AutomationCondition.any_deps_updated().since(
        AutomationCondition.newly_requested() | AutomationCondition.newly_updated())
    never_run = (AutomationCondition.missing() & ~AutomationCondition.execution_failed()
                 & AutomationCondition.any_deps_match(~AutomationCondition.missing()))
    return (AutomationCondition.cron_tick_passed(cron).since_last_handled() & (stale | never_run)
            & ~AutomationCondition.in_progress()).with_label(f"shards materialized since it last ran, on '{cron}'")

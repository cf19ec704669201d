"""A new shard makes the filters stale; automation re-runs them on the filter_cron cadence, not once per shard."""

import datetime as dt

from dagster import (AssetKey, DagsterInstance, DynamicPartitionsDefinition, MaterializeResult, asset,
                     evaluate_automation_conditions, materialize)

from d2m_assets.daemon.automation import filter_condition

PARTS = DynamicPartitionsDefinition(name="demo__shards")


@asset(key=AssetKey(["demo", "shard_metadata"]), partitions_def=PARTS)
def shard_metadata() -> MaterializeResult:
    return MaterializeResult()


@asset(key=AssetKey(["demo", "clip_score"]), deps=[shard_metadata.key], automation_condition=filter_condition("0 * * * *"))
def clip_score() -> MaterializeResult:
    return MaterializeResult()


def at(hour: int, minute: int) -> dt.datetime:
    return dt.datetime(2030, 1, 1, hour, minute, tzinfo=dt.timezone.utc)


def test_new_shard_makes_the_filter_stale_and_it_reruns_on_the_cron_tick() -> None:
    instance = DagsterInstance.ephemeral()
    state = {"cursor": None}

    def requested(when: dt.datetime) -> int:
        result = evaluate_automation_conditions([shard_metadata, clip_score], instance, evaluation_time=when,
                                                cursor=state["cursor"])
        state["cursor"] = result.cursor
        return result.get_num_requested(clip_score.key)

    def shard(key: str) -> None:
        instance.add_dynamic_partitions(PARTS.name, [key])
        assert materialize([shard_metadata], instance=instance, partition_key=key).success

    assert requested(at(10, 5)) == 0  # nothing yet
    shard("00000")
    assert requested(at(10, 30)) == 0  # no tick since
    assert requested(at(11, 1)) == 1  # the tick: it never ran and a shard exists
    assert materialize([clip_score], instance=instance).success
    assert requested(at(11, 5)) == 0
    shard("00001")
    shard("00002")
    assert requested(at(11, 20)) == 0  # stale, but waits for the next tick (not once per shard)
    assert requested(at(12, 1)) == 1  # once for both new shards
    assert materialize([clip_score], instance=instance).success
    assert requested(at(13, 1)) == 0  # nothing new: not stale

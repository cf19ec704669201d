import shutil
from pathlib import Path

from dagster import DagsterInstance, SensorResult, build_sensor_context

from conftest import dataset_of
from d2m_assets import build_definitions


def _evaluate(defs, ds, instance: DagsterInstance, cursor: str | None) -> SensorResult:
    sensor = defs.get_sensor_def(f"{ds.name}__new_shards_sensor")
    context = build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources, definitions=defs)
    return sensor(context)


def test_sensor_registers_complete_tars_once(shard_dir: Path, write_config, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(shard_dir / "00000.tar", incoming / "00000.tar")
    shutil.copy(shard_dir / "00000_stats.json", incoming / "00000_stats.json")
    shutil.copy(shard_dir / "00001.tar", incoming / "00001.tar")  # still downloading: no stats yet
    path = write_config(incoming, input_tars=str(incoming))
    defs, ds = build_definitions(path), dataset_of(path)
    instance = DagsterInstance.ephemeral()
    result = _evaluate(defs, ds, instance, None)
    assert result.dynamic_partitions_requests[0].partition_keys == ["00000"]
    assert [e.partition for e in result.asset_events] == ["00000"]
    assert result.asset_events[0].asset_key == ds.key("raw_shards")
    assert not result.run_requests  # automation materializes; the sensor only registers
    instance.add_dynamic_partitions(ds.partitions_name, ["00000"])

    again = _evaluate(defs, ds, instance, result.cursor)
    assert again.skip_reason is not None and not again.dynamic_partitions_requests

    shutil.copy(shard_dir / "00001_stats.json", incoming / "00001_stats.json")
    done = _evaluate(defs, ds, instance, again.cursor)
    assert done.dynamic_partitions_requests[0].partition_keys == ["00001"]


def test_discovery_schedule_job_registers_complete_tars(shard_dir: Path, write_config) -> None:
    path = write_config(shard_dir, input_tars=str(shard_dir))
    defs, ds = build_definitions(path), dataset_of(path)
    assert defs.get_schedule_def(f"{ds.name}__discover_shards_schedule").cron_schedule == "0 * * * *"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["00000"])
    result = defs.get_job_def(f"{ds.name}__discover_shards_job").execute_in_process(instance=instance)
    assert result.success
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001"]
    events = instance.fetch_materializations(ds.key("raw_shards"), limit=10).records
    assert [e.asset_materialization.partition for e in events] == ["00001"]

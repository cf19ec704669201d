import shutil
from pathlib import Path

from dagster import DagsterInstance, SensorResult, build_sensor_context

from conftest import dataset_of
from d2m_assets import build_definitions


def _evaluate(defs, ds, instance: DagsterInstance, cursor: str | None) -> SensorResult:
    sensor = defs.get_sensor_def(f"{ds.name}__new_shards_sensor")
    context = build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources, definitions=defs)
    return sensor(context)


def _raw_shards(instance: DagsterInstance, ds) -> list[tuple[str | None, str]]:
    """The raw_shards materializations stored in the instance, oldest first: (partition, url)."""
    records = instance.fetch_materializations(ds.key("raw_shards"), limit=100, ascending=True).records
    return [(r.partition_key, r.asset_materialization.metadata["url"].value) for r in records]


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
    # the sensor stores what it found itself (in batches): the partition, and its raw_shards materialization
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000"]
    assert _raw_shards(instance, ds) == [("00000", str(incoming / "00000.tar"))]
    event = instance.fetch_materializations(ds.key("raw_shards"), limit=1).records[0].event_log_entry
    # runless, as the daemon reports a SensorResult's events
    assert event.run_id == "" and event.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    assert not result.run_requests and not result.asset_events and not result.dynamic_partitions_requests
    assert "1 new shard(s) registered: 00000 .. 00000" in result.skip_reason.skip_message

    again = _evaluate(defs, ds, instance, result.cursor)
    assert again.skip_reason.skip_message.startswith("no new complete tar")
    assert len(_raw_shards(instance, ds)) == 1  # nothing reported twice

    shutil.copy(shard_dir / "00001_stats.json", incoming / "00001_stats.json")
    _evaluate(defs, ds, instance, again.cursor)
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001"]
    assert [p for p, _ in _raw_shards(instance, ds)] == ["00000", "00001"]


def test_an_evaluation_past_its_budget_registers_the_rest_next_time(shard_dir: Path, write_config, monkeypatch) -> None:
    """One batch per evaluation (budget 0): the first registers 00000 and keeps its cursor, the next 00001."""
    from d2m_assets.daemon import sensors

    monkeypatch.setattr(sensors, "STORE_BATCH", 1)
    monkeypatch.setattr(sensors, "REGISTER_BUDGET_S", 0.0)
    path = write_config(shard_dir, input_tars=str(shard_dir))
    defs, ds = build_definitions(path), dataset_of(path)
    instance = DagsterInstance.ephemeral()
    first = _evaluate(defs, ds, instance, None)
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000"]
    assert "1 new shard(s) registered: 00000 .. 00000 (1 more found, registered next)" in first.skip_reason.skip_message
    second = _evaluate(defs, ds, instance, first.cursor)
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001"]
    assert "1 new shard(s) registered: 00001 .. 00001," in second.skip_reason.skip_message
    third = _evaluate(defs, ds, instance, second.cursor)
    assert third.skip_reason.skip_message.startswith("no new complete tar")
    assert [p for p, _ in _raw_shards(instance, ds)] == ["00000", "00001"]  # each reported once


def test_register_shards_stores_events_in_batches_then_adds_partitions(monkeypatch) -> None:
    """More shards than one batch: the changed tars' events first, then per batch one store_event_batch call and
    then its partitions (a tick that dies in between finds those shards again); every event once, in order."""
    from d2m_assets.daemon import sensors
    from d2m_assets.datasets import Dataset
    from d2m_core import ShardRef

    monkeypatch.setattr(sensors, "STORE_BATCH", 2)
    ds = Dataset("pool", "")
    instance = DagsterInstance.ephemeral()
    calls: list[tuple[str, int, int]] = []
    storage = instance.event_log_storage
    store_batch, add = storage.store_event_batch, instance.add_dynamic_partitions
    monkeypatch.setattr(storage, "store_event_batch", lambda events: (
        calls.append(("events", len(events), len(instance.get_dynamic_partitions(ds.partitions_name)))),
        store_batch(events)))
    monkeypatch.setattr(instance, "add_dynamic_partitions", lambda name, keys: (
        calls.append(("partitions", len(keys), len(_raw_shards(instance, ds)))), add(name, keys)))
    refs = [ShardRef(f"{i:05d}", f"/nowhere/{i:05d}.tar") for i in range(5)]
    changed = [sensors.raw_shard_event(ds, ShardRef("00009", "/nowhere/00009.tar"), None)]
    done = sensors.register_shards(instance, ds, refs, changed)
    # (what, how many, partitions (events) already stored when called): each batch's events before its partitions
    assert calls == [("events", 1, 0), ("events", 2, 0), ("partitions", 2, 3), ("events", 2, 2),
                     ("partitions", 2, 5), ("events", 1, 4), ("partitions", 1, 6)]
    assert done == refs
    assert [p for p, _ in _raw_shards(instance, ds)] == ["00009", *[r.stem for r in refs]]
    assert instance.get_dynamic_partitions(ds.partitions_name) == [r.stem for r in refs]


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

"""d2m's PostgreSQL event log storage (deploy/dagster-postgres.yaml): a run's planned events written in batches
leave the same per-partition record as Dagster's own storage, so materializing and failed shards, and
automation's in_progress / execution_failed, are what they were."""

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import (AssetKey, AssetMaterialization, AssetSpec, BackfillPolicy, DagsterEventType, DagsterInstance,
                     Definitions, DynamicPartitionsDefinition, EventRecordsFilter, Failure, multi_asset)
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from conftest import REPO, run_cli
from d2m_assets.storage import BATCH_ENV, BatchedPostgresEventLogStorage
from services import postgres_server

PARTS = DynamicPartitionsDefinition(name="shards")
KEYS = [f"{i:05d}" for i in range(7)]
BROKEN = "00003"
A, B = AssetKey("a"), AssetKey("b")


@multi_asset(specs=[AssetSpec(A, partitions_def=PARTS, skippable=True),
                    AssetSpec(B, deps=[A], partitions_def=PARTS, skippable=True)],
             can_subset=True, partitions_def=PARTS, backfill_policy=BackfillPolicy.multi_run(100))
def pipeline(context):
    """As d2m's shard assets: per shard, its materializations; a broken shard fails the run after the others."""
    for key in context.partition_keys:
        if key != BROKEN:
            yield AssetMaterialization(A, partition=key)
            yield AssetMaterialization(B, partition=key)
    raise Failure(f"shard {BROKEN} failed")


@pytest.fixture
def pg_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    monkeypatch.delenv(BATCH_ENV, raising=False)
    with postgres_server() as pg:
        for name, value in pg.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with DagsterInstance.get() as instance:
            yield instance


def test_a_runs_planned_events_are_batched_and_statuses_stay_per_shard(pg_instance: DagsterInstance) -> None:
    instance = pg_instance
    storage = instance.event_log_storage
    assert isinstance(storage, BatchedPostgresEventLogStorage)
    instance.add_dynamic_partitions(PARTS.name, KEYS)
    inserts: list[str] = []
    sa.event.listen(storage._engine, "before_cursor_execute",  # noqa: SLF001 (what reaches PostgreSQL)
                    lambda conn, cursor, statement, *_: inserts.append(statement)
                    if statement.lstrip().upper().startswith("INSERT INTO EVENT_LOGS") else None)
    job = Definitions(assets=[pipeline]).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, raise_on_error=False,
                                    tags={ASSET_PARTITION_RANGE_START_TAG: KEYS[0], ASSET_PARTITION_RANGE_END_TAG: KEYS[-1]})
    assert not result.success
    run_id = result.run_id

    # one planned event per asset and shard, as Dagster's own storage stores them; the asset rows name the run
    for key in (A, B):
        planned = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION_PLANNED, key))
        assert sorted(r.partition_key for r in planned) == KEYS
        assert {r.run_id for r in planned} == {run_id}
        assert instance.get_asset_records([key])[0].asset_entry.last_run_id == run_id
    # written 2 x 7 in one INSERT (the run's other events one at a time, as Dagster writes them)
    planned_inserts = [s for s in inserts if s.count("%(") > 20]
    assert len(planned_inserts) == 1

    # the shard the failed run did not materialize is failed, the others materialized; nothing in progress
    for key in (A, B):
        status = get_and_update_asset_status_cache_value(instance, key, PARTS, dynamic_partitions_loader=instance)
        assert list(status.deserialize_failed_partition_subsets(PARTS).get_partition_keys()) == [BROKEN]
        assert not list(status.deserialize_in_progress_partition_subsets(PARTS).get_partition_keys())
        assert sorted(status.deserialize_materialized_partition_subsets(PARTS).get_partition_keys()) == \
            [k for k in KEYS if k != BROKEN]


def test_dagster_cli_materializes_a_shard_on_the_production_instance(pg_instance: DagsterInstance, shard_dir: Path,
                                                                      write_config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`dagster asset materialize` of a shard on deploy/dagster-postgres.yaml (d2m's event log storage in the
    CLI's own process, which sets the batch size itself): the shard is planned once per asset and materialized."""
    config = write_config(shard_dir, dataset="pool")
    monkeypatch.delenv(BATCH_ENV, raising=False)  # the CLI's process sets it itself
    env = {"D2M_CONFIG": str(config)}
    assert run_cli(["d2m", "register", "--yml", str(config)], env, tmp_path).returncode == 0
    result = run_cli(["dagster", "asset", "materialize", "-m", "d2m_assets", "--select",
                      "pool/clip_b32_features,pool/clip_b32_scores", "--partition", "00001"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for asset in ("clip_b32_features", "clip_b32_scores"):
        key = AssetKey(["pool", asset])
        planned = pg_instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION_PLANNED, key))
        assert [r.partition_key for r in planned] == ["00001"]
        done = pg_instance.fetch_materializations(key, limit=10).records
        assert [(r.partition_key, r.run_id) for r in done] == [("00001", planned[0].run_id)]


def test_partition_keys_are_read_again_only_after_any_process_changed_them(pg_instance: DagsterInstance) -> None:
    """Dagster reads all of a definition's keys several times per run it creates: the storage reads them in
    full once, then again only when keys were added or deleted, here by another instance (another process)."""
    storage = pg_instance.event_log_storage
    full_reads: list[str] = []
    sa.event.listen(storage._engine, "before_cursor_execute",  # noqa: SLF001 (what reaches PostgreSQL)
                    lambda conn, cursor, statement, *_: full_reads.append(statement)
                    if "dynamic_partitions.partition" in statement and "ORDER BY" in statement else None)
    other = DagsterInstance.from_ref(pg_instance.get_ref())  # its own storage and connections, like a sensor's process
    other.add_dynamic_partitions("shards", KEYS[:3])
    other.add_dynamic_partitions("other", ["x"])

    assert pg_instance.get_dynamic_partitions("shards") == KEYS[:3]
    assert pg_instance.get_dynamic_partitions("shards") == KEYS[:3]
    assert len(full_reads) == 1  # unchanged: the keys read before
    changes = [
        lambda: other.add_dynamic_partitions("shards", KEYS[3:5]),
        lambda: other.delete_dynamic_partition("shards", KEYS[0]),
        lambda: (other.delete_dynamic_partition("shards", KEYS[4]), other.add_dynamic_partitions("shards", [KEYS[6]])),
        lambda: other.add_dynamic_partitions("other", ["y"]),  # another definition: read again, same keys
    ]
    expected = [KEYS[:5], KEYS[1:5], [*KEYS[1:4], KEYS[6]], [*KEYS[1:4], KEYS[6]]]
    for n, (change, keys) in enumerate(zip(changes, expected, strict=True), start=2):
        change()
        assert pg_instance.get_dynamic_partitions("shards") == keys
        assert len(full_reads) == n
    returned = pg_instance.get_dynamic_partitions("shards")
    returned.append("mutated by a caller")
    assert pg_instance.get_dynamic_partitions("shards") == expected[-1]
    assert pg_instance.get_dynamic_partitions("other") == ["x", "y"]
    other.dispose()

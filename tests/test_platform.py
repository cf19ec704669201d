"""The platform as users run it: a real daemon and webserver, a UI backfill over 6 shards with a gpu pool
of 2 on a real PostgreSQL server, and the daemon on the default SQLite instance processing new shards."""

import shutil
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from conftest import BASIC, REPO, dataset_of, run_cli
from d2m_core.testdata.synth import make_shards
from services import dagster_process, free_port, graphql, postgres_server

ASSETS = ["clip_b32_features", "clip_b32_scores", "shard_metadata"]
UI_QUERY = """
{
  workspaceOrError { ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on RepositoryLocation { repositories {
          sensors { name } schedules { name } } } ... on PythonError { message } } } } }
  assetNodes { assetKey { path } isPartitioned partitionKeys assetChecksOrError { ... on AssetChecks { checks { name } } } }
}
"""
LAUNCH = """
mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }
"""
STATUS = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"


@pytest.fixture
def instance_env(tmp_path: Path):
    """The production instance: deploy/dagster-postgres.yaml on a real PostgreSQL server. (The SQLite instance
    runs the daemon below, and `d2m run` and the gpu pool's slots in test_recovery and test_state.)"""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    with postgres_server() as pg:
        yield {"DAGSTER_HOME": str(home)} | pg


def _step_windows(instance: DagsterInstance, run_ids: list[str]) -> list[tuple[float, float]]:
    windows = []
    for run_id in run_ids:
        events = {e.dagster_event.event_type: e.timestamp for e in instance.all_logs(run_id)
                  if e.dagster_event and e.dagster_event.step_key == "pool__shard_pipeline"
                  and e.dagster_event.event_type in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS)}
        windows.append((events[DagsterEventType.STEP_START], events[DagsterEventType.STEP_SUCCESS]))
    return windows


def _max_overlap(windows: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows], key=lambda p: (p[0], p[1]))
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


def test_ui_backfill_of_6_shards_with_a_gpu_pool_of_2(instance_env: dict, tmp_path: Path, monkeypatch) -> None:
    make_shards(tmp_path / "shards", shards=6, samples=4, max_side=128)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(BASIC | {"input_tars": str(tmp_path / "shards" / "*.tar"), "dataset": "pool",
                                              "output_metadata_dir": str(tmp_path / "metadata"), "tars_per_wds": 1}))
    env = instance_env | {"D2M_CONFIG": str(config), "D2M_AUTOMATION": "off", "D2M_RANDOM_WEIGHTS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stems = [f"{i:05d}" for i in range(6)]
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("pool__shards", stems)
    pool = run_cli(["dagster", "instance", "concurrency", "set", "gpu", "2"], env, tmp_path)
    assert pool.returncode == 0, pool.stderr[-2000:]

    port = free_port()
    with dagster_process(["dagster-daemon", "run", "-w", "workspace.yaml"], env, tmp_path / "daemon.log"), \
         dagster_process(["dagster-webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)], env,
                         tmp_path / "webserver.log"):
        ui = graphql(port, UI_QUERY)
        (location,) = ui["workspaceOrError"]["locationEntries"]
        assert location["loadStatus"] == "LOADED", location
        repo = location["locationOrLoadError"]["repositories"][0]
        assert {s["name"] for s in repo["sensors"]} == {"pool__new_shards_sensor", "pool__shard_automation"}
        assert [s["name"] for s in repo["schedules"]] == ["pool__discover_shards_schedule"]
        nodes = {"/".join(n["assetKey"]["path"]): n for n in ui["assetNodes"]}
        assert set(nodes) == {f"pool/{a}" for a in ["raw_shards", *ASSETS]}  # only what the config needs
        assert nodes["pool/clip_b32_features"]["isPartitioned"] and nodes["pool/clip_b32_features"]["partitionKeys"] == stems
        assert {c["name"] for c in nodes["pool/shard_metadata"]["assetChecksOrError"]["checks"]} == {
            "row_count", "uids", "features", "scores_in_range", "failure_rate"}

        params = {"partitionNames": stems, "assetSelection": [{"path": ["pool", a]} for a in ASSETS], "fromFailure": False}
        launched = graphql(port, LAUNCH, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        deadline = time.time() + 480
        while graphql(port, STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]["status"] not in (
                "COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
            assert time.time() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(2)

    runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": launched["backfillId"]}))
    assert len(runs) == 6 and {r.status for r in runs} == {DagsterRunStatus.SUCCESS}
    shard_of = lambda r: r.tags.get("dagster/partition") or r.tags["dagster/asset_partition_range_start"]  # noqa: E731
    assert sorted(shard_of(r) for r in runs) == stems  # tars_per_wds: 1 -> one shard per run
    windows = _step_windows(instance, [r.run_id for r in runs])
    assert _max_overlap(windows) <= 2
    for stem in stems:
        assert (tmp_path / "metadata" / f"{stem}.parquet").is_file()


def _evaluations_after(instance: DagsterInstance, sensor: str, after: float) -> int:
    """Ticks of the sensor named `sensor` (the dataset's prefix aside) that started after `after` and ended."""
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import TickStatus

    ended = (TickStatus.SUCCESS, TickStatus.SKIPPED, TickStatus.FAILURE)
    return sum(tick.status in ended and tick.timestamp > after
               for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
               if state.instigator_name.endswith(sensor)
               for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=20))


def test_daemon_processes_new_shards_by_itself(tmp_path: Path, monkeypatch) -> None:
    """Sensor + automation on: complete tars dropped into the input folder get materialized, each once."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    incoming = tmp_path / "incoming"
    make_shards(incoming, shards=2, samples=4, max_side=128)
    (incoming / "00001_stats.json").unlink()  # still downloading
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(BASIC | {"input_tars": str(incoming), "tars_per_wds": 4,
                                              "output_metadata_dir": str(tmp_path / "metadata")}))
    env = {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(config), "D2M_AUTOMATION": "on", "D2M_RANDOM_WEIGHTS": "1",
           "D2M_SENSOR_INTERVAL_S": "5"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    instance = DagsterInstance.get()
    metadata = dataset_of(config).key("shard_metadata")
    with dagster_process(["dagster-daemon", "run", "-w", "workspace.yaml"], env, tmp_path / "daemon.log"):
        deadline = time.time() + 420
        while instance.get_materialized_partitions(metadata) != {"00000"}:
            assert time.time() < deadline, (tmp_path / "daemon.log").read_text()[-4000:]
            time.sleep(3)
        (incoming / "00001_stats.json").write_text("{}")  # the download finishes
        while instance.get_materialized_partitions(metadata) != {"00000", "00001"}:
            assert time.time() < deadline, (tmp_path / "daemon.log").read_text()[-4000:]
            time.sleep(3)
        done = time.time()
        while _evaluations_after(instance, "shard_automation", done) < 1:  # an evaluation begun after: nothing requested
            assert time.time() < deadline, (tmp_path / "daemon.log").read_text()[-4000:]
            time.sleep(1)
    events = instance.fetch_materializations(metadata, limit=50).records
    runs = [(r.run_id[:8], r.status.value, {k: v for k, v in r.tags.items() if "partition" in k or "retry" in k
                                            or "backfill" in k}) for r in instance.get_runs()]
    why = f"runs: {runs}\ndaemon log:\n{(tmp_path / 'daemon.log').read_text()[-6000:]}"
    assert sorted(e.asset_materialization.partition for e in events) == ["00000", "00001"], why
    assert {r.status for r in instance.get_runs()} == {DagsterRunStatus.SUCCESS}, why
    assert instance.get_dynamic_partitions(dataset_of(config).partitions_name) == ["00000", "00001"]

"""Dagster runs as Slurm jobs: a real Slurm (slurmctld, slurmd, munge) on loopback with 2 fake GPUs through
GRES, PostgreSQL, dagster-daemon and dagster-webserver, the instance configured by deploy/dagster-slurm.yaml."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from conftest import BASIC, REPO, hold_plugin, run_cli
from d2m_assets.datasets import Dataset
from d2m_assets.slurm_launcher import JOB_ID_TAG
from d2m_core import slurm
from d2m_core.testdata.synth import make_shards
from services import dagster_process, free_port, graphql, postgres_server, slurm_cluster, slurm_installed

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not slurm_installed(), reason="Slurm is not installed: `make test` installs it")]

DATASET = Dataset("slurmtest", "")  # the yml below names it
SMALL = [f"{i:05d}" for i in range(6)]  # the backfill's shards
SLOW = ["00006", "00007"]  # shards whose runs the test cancels while they compute (held by the hold plugin)
ASSETS = ["clip_b32_features", "clip_b32_scores", "custom_hold", "shard_metadata"]
METADATA = DATASET.key("shard_metadata")
LAUNCH = """
mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }
"""
TERMINATE = """
mutation($runId: String!) { terminateRun(runId: $runId) {
  __typename ... on TerminateRunFailure { message } ... on PythonError { message } } }
"""
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@dataclass
class Platform:
    tmp: Path
    env: dict[str, str]
    port: int
    stack: ExitStack
    hold: Path  # while this file exists, the runs' hold model blocks (tests/conftest.py hold_plugin)
    daemon: ExitStack = field(default_factory=ExitStack)

    def start_daemon(self) -> None:
        self.daemon = ExitStack()
        self.daemon.enter_context(dagster_process(["dagster-daemon", "run", "-w", "workspace.yaml"], self.env,
                                                  self.tmp / f"daemon-{time.time():.0f}.log"))

    def backfill(self, stems: list[str]) -> str:
        params = {"partitionNames": stems, "assetSelection": [{"path": DATASET.key(a).path} for a in ASSETS], "fromFailure": False}
        launched = graphql(self.port, LAUNCH, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (result := predicate()):
        assert time.time() < deadline, f"{what}\n{_diagnosis()}"
        time.sleep(1)
    return result


def _diagnosis() -> str:
    """The runs' states and the Slurm jobs' output, for a failure message."""
    runs = [f"{r.run_id[:8]} {r.status.value} job {r.tags.get(JOB_ID_TAG)}" for r in _instance().get_runs()]
    home = Path(_instance().root_directory)
    outputs = [f"{p.name}: {p.read_text()[-800:]}" for p in sorted((home / "slurm").glob("*.out"))]
    return "\n".join(runs + outputs)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("slurm")
    make_shards(tmp / "shards", shards=8, samples=4, max_side=128)
    plugin = hold_plugin(tmp)
    config = tmp / "config.yml"
    config.write_text(yaml.safe_dump(BASIC | {"dataset": DATASET.name, "input_tars": str(tmp / "shards" / "*.tar"), "device": 0,
                                              "output_metadata_dir": str(tmp / "metadata"), "tars_per_wds": 1,
                                              "models": BASIC["models"] + ["hold"], "custom_pypath": str(plugin.path),
                                              "postprocess_columns": BASIC["postprocess_columns"] + ["hold-red"]}))
    home = tmp / "home"
    home.mkdir()
    instance_yaml = yaml.safe_load((REPO / "deploy" / "dagster-slurm.yaml").read_text())
    instance_yaml["run_monitoring"] |= {"poll_interval_seconds": 1}  # the shipped file's settings, polled faster
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server())
        cluster = stack.enter_context(slurm_cluster(gpus=2))
        env = pg | cluster | {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(config), "D2M_AUTOMATION": "off",
                              "D2M_RANDOM_WEIGHTS": "1"}
        pool = run_cli(["dagster", "instance", "concurrency", "set", "gpu", "2"], env, tmp)
        assert pool.returncode == 0, pool.stderr[-2000:]
        port = free_port()
        platform = Platform(tmp, env, port, stack, plugin.hold)
        stack.enter_context(dagster_process(["dagster-webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p",
                                             str(port)], env, tmp / "webserver.log"))
        platform.start_daemon()
        stack.callback(lambda: platform.daemon.close())
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            instance = DagsterInstance.get()
            instance.add_dynamic_partitions(DATASET.partitions_name, SMALL + SLOW)
            yield platform


def _instance() -> DagsterInstance:
    return DagsterInstance.get()


def _runs(tag_value: str, key: str = "dagster/backfill") -> list:
    return _instance().get_runs(RunsFilter(tags={key: tag_value}))


def _step_window(run_id: str) -> tuple[float, float]:
    events = {e.dagster_event.event_type: e.timestamp for e in _instance().all_logs(run_id)
              if e.dagster_event and e.dagster_event.step_key == DATASET.named("shard_pipeline")}
    return events[DagsterEventType.STEP_START], events[DagsterEventType.STEP_SUCCESS]


def _visible_devices(run) -> str:
    """The GPU Slurm gave the run's job, as the job (whose process becomes the run worker) printed it first."""
    out = Path(_instance().root_directory) / "slurm" / f"dagster-run-{run.run_id}-{run.tags[JOB_ID_TAG]}.out"
    return out.read_text().splitlines()[0].rsplit("CUDA_VISIBLE_DEVICES=", 1)[1]


def _step_started(run_id: str) -> bool:
    return any(e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_START
               for e in _instance().all_logs(run_id))


def _job_state(run) -> str:
    state = slurm.job_state(run.tags[JOB_ID_TAG])
    return state.state if state else "LOST"


def test_backfill_of_6_shards_runs_as_slurm_jobs_on_2_gpus(platform: Platform) -> None:
    started = time.time()
    backfill = platform.backfill(SMALL)
    instance = _instance()
    _wait(lambda: len(instance.get_materialized_partitions(METADATA)) >= len(SMALL), 1200, "backfill did not finish")
    runs = _wait(lambda: (rs := _runs(backfill)) and all(r.status in FINISHED for r in rs) and rs, 120, "runs not finished")
    assert len(runs) == 6 and {r.status for r in runs} == {DagsterRunStatus.SUCCESS}
    jobs = {r.run_id: r.tags[JOB_ID_TAG] for r in runs}
    assert len(set(jobs.values())) == 6  # one Slurm job per run
    _wait(lambda: {_job_state(r) for r in runs} == {"COMPLETED"}, 120, "jobs not completed")  # workers exiting
    windows = {r.run_id: _step_window(r.run_id) for r in runs}
    devices = {r.run_id: _visible_devices(r) for r in runs}
    assert set(devices.values()) <= {"0", "1"}  # each run saw exactly the one GPU Slurm gave its job
    overlapping = [(a, b) for a in windows for b in windows
                   if a < b and windows[a][0] < windows[b][1] and windows[b][0] < windows[a][1]]
    assert all(devices[a] != devices[b] for a, b in overlapping)  # two runs at once never share a GPU
    points = sorted([(s, 1) for s, _ in windows.values()] + [(e, -1) for _, e in windows.values()])
    running = [sum(d for _, d in points[: i + 1]) for i in range(len(points))]
    assert max(running) <= 2
    materialized = instance.fetch_materializations(METADATA, limit=100).records
    assert sorted(m.asset_materialization.partition for m in materialized) == SMALL
    last = max(m.timestamp for m in materialized)
    print(json.dumps({"slurm_backfill": {"shards": 6, "gpus": 2, "jobs": len(set(jobs.values())),
                                         "max_concurrent_steps": max(running), "devices": sorted(devices.values()),
                                         "backfill_to_last_materialization_s": round(last - started, 1)}}))


def test_scancel_fails_a_run_that_is_retried_and_terminate_cancels_its_job(platform: Platform) -> None:
    """Two runs on the two GPUs: one's job is cancelled with scancel while the daemon is down (a restarted daemon
    fails the run and retries it), the other is terminated from the webserver's GraphQL API. Both runs are held
    in their first batch (the hold file) until their jobs are cancelled, so neither can finish first."""
    hold = platform.hold
    hold.touch()
    cancelled, terminated = (_wait(lambda b=b: _runs(b), 300, "no run")[0] for b in map(lambda s: platform.backfill([s]), SLOW))
    for run in (cancelled, terminated):
        _wait(lambda r=run: _step_started(r.run_id), 600, "the run's step never started")
    cancelled, terminated = (_instance().get_run_by_id(r.run_id) for r in (cancelled, terminated))

    result = graphql(platform.port, TERMINATE, {"runId": terminated.run_id})["terminateRun"]
    assert result["__typename"] == "TerminateRunSuccess", result
    platform.daemon.close()
    slurm.cancel(cancelled.tags[JOB_ID_TAG])
    for run in (cancelled, terminated):
        _wait(lambda r=run: _job_state(r) == "CANCELLED", 60, "job not cancelled")
    hold.unlink()  # the retry computes freely
    platform.start_daemon()

    finished = lambda r: (now := _instance().get_run_by_id(r.run_id)).status in FINISHED and now  # noqa: E731
    assert _wait(lambda: finished(terminated), 300, "run not canceled").status == DagsterRunStatus.CANCELED
    assert _wait(lambda: finished(cancelled), 300, "run not failed").status == DagsterRunStatus.FAILURE
    (retry,) = _wait(lambda: _runs(cancelled.run_id, "dagster/parent_run_id"), 300, "no retry")
    retry = _wait(lambda: finished(retry), 600, "retry did not finish")
    assert retry.status == DagsterRunStatus.SUCCESS
    assert retry.tags[JOB_ID_TAG] != cancelled.tags[JOB_ID_TAG]
    _wait(lambda: _job_state(retry) == "COMPLETED", 120, "retry's job not completed")
    assert not _runs(terminated.run_id, "dagster/parent_run_id")  # a cancelled run is not retried
    materialized = _instance().get_materialized_partitions(METADATA)
    assert SLOW[0] in materialized and SLOW[1] not in materialized  # the retried run's shard, not the terminated one

"""WarmRunLauncher (deploy/dagster.yaml's launcher): a run starts in the worker started ahead of it, a new spare
is started for the next run, a spare of older code is not used, Terminate cancels the run, and no spare
outlives the launcher."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._core.instance.ref import InstanceRef

from conftest import REPO
from d2m_assets import warm_launcher
from d2m_assets.warm_launcher import PID_TAG, WarmRunLauncher

HELD_JOB = Path(__file__).resolve().parents[1] / "data" / "held_job.py"


def wait_for(predicate, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def engine_messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [e.message or "" for e in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)]


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("HELD_JOB_HOLD", str(tmp_path / "hold"))
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        yield instance


def launch(instance: DagsterInstance) -> str:
    recon = ReconstructableJob.for_file(str(HELD_JOB), "held")
    run = instance.create_run_for_job(recon.get_definition(), job_code_origin=recon.get_python_origin())
    instance.launch_run(run.run_id, workspace=None)
    return run.run_id


def test_runs_start_in_spares_and_terminate_cancels(instance: DagsterInstance, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = instance.run_launcher
    assert isinstance(launcher, WarmRunLauncher) and launcher.config.spares == 1
    hold = tmp_path / "hold"
    hold.touch()
    assert launcher.warm_up(timeout=300), "the spare never finished its imports"
    (spare,) = launcher._spares
    first = launch(instance)
    # The run executes in the spare's process, which had done its imports before the run existed.
    wait_for(lambda: (tmp_path / f"started-{spare.process.pid}").exists(), "the run's op in the spare")
    assert instance.get_run_by_id(first).tags[PID_TAG] == str(spare.process.pid)
    messages = engine_messages(instance, first)
    assert any(m.startswith("Run handed to a worker started") and f"(pid {spare.process.pid})" in m for m in messages)
    assert f"Started process for run (pid: {spare.process.pid})." in messages
    (next_spare,) = launcher._spares  # the next run's worker, started at once
    assert next_spare.process.pid != spare.process.pid

    # Terminate: the run ends CANCELED and its worker exits.
    assert launcher.terminate(first)
    wait_for(lambda: instance.get_run_by_id(first).status == DagsterRunStatus.CANCELED, "the run to be canceled", 60)
    assert spare.process.wait(timeout=60) is not None

    # d2m's code changed after the spare started: the spare is closed, and the run gets a new process.
    monkeypatch.setattr(warm_launcher, "source_stamp", lambda: next_spare.stamp + 1)
    hold.unlink()
    second = launch(instance)
    assert next_spare.process.wait(timeout=60) is not None  # ended (end of input, or killed while importing)
    launcher.join(timeout=300)
    run = instance.get_run_by_id(second)
    assert run.status == DagsterRunStatus.SUCCESS
    assert any(m.startswith("Run handed to a new process (no spare ready for it)") for m in engine_messages(instance, second))
    assert run.tags[PID_TAG] not in {str(spare.process.pid), str(next_spare.process.pid)}

    # Nothing outlives the launcher: its spare ends when it is disposed.
    (last_spare,) = launcher._spares
    launcher.dispose()
    assert last_spare.process.poll() is not None and not launcher._spares

"""Runs left unfinished by a process that died (kill -9, OOM killer, power cut): found and marked failed.

A run executed in-process (`d2m run`, `materialize`) writes its own status; if its process is killed the
run stays STARTED for ever, its partitions show as in progress, and the pool slot its step claimed (the
`gpu` pool) stays taken, so every later run waits for it for ever. `mark_abandoned_runs` reports such runs
failed (as Dagster's run monitoring does for launched runs) and frees their slots, so the UI shows their
partitions failed and the next `d2m run` processes them again. Without a daemon nothing else does either.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

PID_TAG, HOST_TAG = "d2m/pid", "d2m/host"
UNFINISHED = (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
START_SLACK_S = 1.0  # clock ticks and timestamps are coarse: a process this close to the run's start may own it


def owner_tags() -> dict[str, str]:
    """Tags naming the process that executes a run in-process (add them to `materialize(tags=...)`)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def mark_abandoned_runs(instance: DagsterInstance, host: str | None = None, *,
                        untagged_are_local: bool | None = None) -> list[str]:
    """Report FAILURE for every unfinished run whose process is gone and free the pool slots it held, and
    those of any finished run still holding one; returns the run ids marked failed.

    A run's process is its `d2m/pid` tag (with `d2m/host`), else the pid Dagster's executor records when
    the run starts executing ("Executing steps in process (pid: N)"). It is gone when no process has that
    pid, or the one that has it started after the run did (the pid was reused). Runs of another host, and
    runs whose process is unknown (queued, or still being launched), are left to their owner. A run with no
    `d2m/host` tag is judged only where it must have run on this machine (`untagged_are_local`; by default
    when the instance keeps its runs in SQLite files, never with a shared database such as PostgreSQL).
    """
    host = host or socket.gethostname()
    if untagged_are_local is None:
        untagged_are_local = _runs_stored_locally(instance)
    marked: list[str] = []
    for record in instance.get_run_records(filters=RunsFilter(statuses=list(UNFINISHED))):
        run = record.dagster_run
        run_host = run.tags.get(HOST_TAG)
        if run_host != host and (run_host is not None or not untagged_are_local):
            continue
        pid = _run_pid(instance, run.run_id, run.tags)
        if pid is None:
            continue
        started = record.start_time or record.create_timestamp.timestamp()
        if _process_alive_since(pid, started):
            continue
        where = f" on {run_host}" if run_host else ""
        instance.report_run_failed(run, _message(pid, where), *_unexpected_termination())
        marked.append(run.run_id)
    free_slots_of_finished_runs(instance)
    return marked


def free_slots_of_finished_runs(instance: DagsterInstance) -> list[str]:
    """Free the pool slots (and queued step claims) still held by runs that have finished; returns those runs.

    A run frees its slots as its steps end; one killed mid-step never does. Dagster's daemon frees them only
    when `run_monitoring.free_slots_after_run_end_seconds` is set, and `d2m run` runs no daemon.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return []
    finished = [r.run_id for r in instance.get_runs(filters=RunsFilter(run_ids=list(holders), statuses=list(FINISHED)))]
    for run_id in finished:
        storage.free_concurrency_slots_for_run(run_id)
    return finished


def _runs_stored_locally(instance: DagsterInstance) -> bool:
    """True when runs live in SQLite files under $DAGSTER_HOME, which only this machine's processes use."""
    try:
        from dagster._core.storage.runs import SqliteRunStorage
    except ImportError:  # pragma: no cover
        return False
    return isinstance(instance.run_storage, SqliteRunStorage)


def _message(pid: int, where: str) -> str:
    return (f"The process that executed this run (pid {pid}{where}) is gone: it was killed or crashed before "
            "the run finished. Marked failed by d2m; no partition of it was materialized, and the next "
            "`d2m run` processes them again.")


def _unexpected_termination() -> Sequence[object]:
    """The failure reason Dagster's own run monitoring gives a dead run worker, where this Dagster has it."""
    try:
        from dagster._core.events import JobFailureData, RunFailureReason
    except ImportError:  # pragma: no cover - older or newer layouts: the message alone still says it
        return ()
    return (JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION),)


def _run_pid(instance: DagsterInstance, run_id: str, tags: dict[str, str]) -> int | None:
    if tags.get(PID_TAG, "").isdigit():
        return int(tags[PID_TAG])
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        value = data.metadata.get("pid") if data and data.metadata else None
        text = str(getattr(value, "value", value)) if value is not None else ""
        if text.isdigit():
            return int(text)
    return None


def _process_alive_since(pid: int, since: float) -> bool:
    """True if a live process has `pid` and started no later than `since` (a Unix time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = _process_start_time(pid)
    if started is None:
        return True  # cannot tell a reused pid apart: assume the owner lives
    return started <= since + START_SLACK_S


def _process_start_time(pid: int) -> float | None:
    """When the process started (Unix time), from /proc; None where there is no /proc or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":
        return float("inf")  # a zombie has exited: it owns nothing any more
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")

"""WarmRunLauncher: each run starts in a run worker that was started, and did its imports, before the run.

deploy/dagster.yaml:

    run_launcher:
      module: d2m_assets.warm_launcher
      class: WarmRunLauncher
      config: {spares: 1}

A d2m run worker spends seconds importing dagster, torch and the model code before its first step can
build a model. This launcher keeps `spares` workers started ahead (`python -m d2m_assets.warm_worker`): a
run is handed to one, which runs `dagster api execute_run` for it in the process that has already imported
everything, and a new spare is started at once for the next run. A spare that is still importing is
handed the run all the same (it starts it when ready, never later than a new process would). When no spare
fits (spares: 0, another Python, d2m's code changed since the spare started), the run gets a new
`dagster api execute_run` process, as with Slurm and Kubernetes.

Workers are processes on this machine, like those of Dagster's default launcher. Their pid and start time are
run tags, so Terminate (SIGINT, as Ctrl-C: the run ends CANCELED) works from the webserver and the daemon
alike, and never signals another process that took the pid later. Spares hold no run: they exit when the
launcher does (end of input) or is disposed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import Config
from dagster._core.launcher import LaunchRunContext
from dagster._serdes import ConfigurableClassData
from pydantic import Field

from d2m_assets.launcher_base import ConfiguredRunLauncher, execute_run_command

PID_TAG = "d2m/worker_pid"
START_TAG = "d2m/worker_start"  # the worker's start time in the kernel's clock ticks (/proc/<pid>/stat)
SOURCES = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "d2m_core"]


class WarmRunLauncherConfig(Config):
    spares: int = Field(default=1, ge=0, le=16,
                        description="run workers kept started ahead of runs; 0: a new process for every run")


def source_stamp() -> float:
    """The newest modification time of d2m's own modules: a spare started before it holds older code."""
    return max((p.stat().st_mtime for folder in SOURCES for p in folder.rglob("*.py")), default=0.0)


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass
class Spare:
    """A started `d2m_assets.warm_worker`: its stdin takes the run; its ready pipe closes when it is imported."""

    process: subprocess.Popen
    ready_fd: int
    executable: str
    stamp: float
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, executable: str, stamp: float) -> Spare:
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen([executable, "-m", "d2m_assets.warm_worker", str(write_fd)],
                                       stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True)
        finally:
            os.close(write_fd)
        return cls(process, read_fd, executable, stamp)

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether its imports are done (the worker closed its end of the pipe)."""
        return bool(select.select([self.ready_fd], [], [], timeout)[0]) and self.process.poll() is None

    def hand(self, execute_run_args: str) -> bool:
        """Give it the run; False when it died before taking it."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(execute_run_args + "\n")
            self.process.stdin.close()
        except OSError:
            self.process.wait()
            return False
        finally:
            os.close(self.ready_fd)
        return True

    def close(self) -> None:
        """End it without waiting (it holds no run): end of input when it is ready, SIGKILL while it imports."""
        ready = self.ready()
        try:
            assert self.process.stdin is not None
            self.process.stdin.close()
        except OSError:
            pass
        os.close(self.ready_fd)
        if not ready:
            self.process.kill()


class WarmRunLauncher(ConfiguredRunLauncher):
    config_class = WarmRunLauncherConfig
    config: WarmRunLauncherConfig

    def __init__(self, inst_data: ConfigurableClassData | None = None, **config) -> None:
        self._lock = threading.Lock()
        self._spares: list[Spare] = []
        self._workers: dict[str, subprocess.Popen] = {}  # run id -> its worker, until it has exited
        self._closed: list[subprocess.Popen] = []  # spares ended, until they have exited
        super().__init__(inst_data, **config)

    def warm_up(self, executable: str = sys.executable, timeout: float | None = None) -> bool:
        """Start the spares now (they otherwise start with the first run); with a timeout, wait until one is ready."""
        with self._lock:
            self._fill(executable, source_stamp())
            spares = list(self._spares)
        if timeout is None or not spares:
            return False
        return spares[0].ready(timeout)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        args = self.execute_run_argument(run)
        executable = run.job_code_origin.executable_path
        stamp = source_stamp()
        with self._lock:
            self._reap()
            spare = self._take(executable, stamp)
            was_ready = spare is not None and spare.ready()
            if spare is not None and spare.hand(args):
                worker, how = spare.process, (f"a worker started {time.monotonic() - spare.started:.1f} s ahead"
                                               + ("" if was_ready else ", still importing"))
            else:
                worker = subprocess.Popen(execute_run_command(executable, args))
                how = "a new process (no spare ready for it)" if self.config.spares else "a new process"
            self._workers[run.run_id] = worker
            self._fill(executable, stamp)
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(worker.pid), START_TAG: process_start(worker.pid) or ""})
        self._instance.report_engine_event(f"Run handed to {how} (pid {worker.pid})", run)

    def _take(self, executable: str, stamp: float) -> Spare | None:
        """The oldest usable spare (ready ones first); spares of other code are closed."""
        self._retire([s for s in self._spares if s.stamp < stamp or s.process.poll() is not None])
        fitting = [s for s in self._spares if s.executable == executable]
        if not fitting:
            return None
        spare = next((s for s in fitting if s.ready()), fitting[0])
        self._spares.remove(spare)
        return spare

    def _retire(self, spares: list[Spare]) -> None:
        """Close these spares (their process exits on its own) and keep them until they are reaped."""
        for spare in spares:
            self._spares.remove(spare)
            spare.close()
            self._closed.append(spare.process)

    def _fill(self, executable: str, stamp: float) -> None:
        while sum(s.executable == executable for s in self._spares) < self.config.spares:
            self._spares.append(Spare.start(executable, stamp))

    def _reap(self) -> None:
        for run_id, worker in list(self._workers.items()):
            if worker.poll() is not None:
                del self._workers[run_id]
        self._closed = [p for p in self._closed if p.poll() is None]

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished or PID_TAG not in run.tags:
            return False
        pid = int(run.tags[PID_TAG])
        if process_start(pid) != run.tags.get(START_TAG):
            self._instance.report_engine_event(f"The run's worker (pid {pid}) is no longer running", run)
            return False
        self._instance.report_run_canceling(run)
        os.kill(pid, signal.SIGINT)  # as Ctrl-C: dagster stops the step and ends the run CANCELED
        self._instance.report_engine_event(f"Sent SIGINT to the run's worker (pid {pid})", run)
        return True

    def join(self, timeout: int = 30) -> None:
        """Wait for the runs this launcher started to exit (tests)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.wait(timeout=max(deadline - time.monotonic(), 0.01))
        with self._lock:
            self._reap()

    def dispose(self) -> None:
        with self._lock:
            self._retire(list(self._spares))
            for process in self._closed:
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._closed = []

"""SlurmRunLauncher: each Dagster run becomes one Slurm batch job that runs the run worker.

dagster.yaml:

    run_launcher:
      module: d2m_assets.slurm_launcher
      class: SlurmRunLauncher
      config: {partition: gpu, time: "04:00:00", cpus_per_task: 8, mem: 64G, gres: "gpu:1", extra_args: []}

The daemon's run queue and the `gpu` pool decide what is launched; Slurm decides where and which GPU
(the job's `CUDA_VISIBLE_DEVICES`). The job id is a run tag, so run monitoring (which asks Slurm for the
job's state), Terminate (`scancel`) and a restarted daemon all find the job from the run alone.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from dagster import Config
from dagster._core.events import EngineEventData
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from pydantic import Field

from d2m_assets.launcher_base import ConfiguredRunLauncher, execute_run_command
from d2m_core import slurm

JOB_ID_TAG = "d2m/slurm_job_id"


class SlurmJobConfig(Config):
    """sbatch options of every run's job (unset: the cluster's default)."""

    partition: str | None = Field(default=None, description="sbatch --partition")
    time: str | None = Field(default=None, description="sbatch --time, e.g. 04:00:00; the run fails when it is reached")
    cpus_per_task: int | None = Field(default=None, description="sbatch --cpus-per-task (loader threads + writer)")
    mem: str | None = Field(default=None, description="sbatch --mem, e.g. 64G")
    gres: str | None = Field(default="gpu:1", description="sbatch --gres; one GPU per run by default")
    output_dir: str | None = Field(default=None, description="folder of the jobs' stdout/stderr; default $DAGSTER_HOME/slurm")
    extra_args: list[str] = Field(default=[], description="more sbatch options, e.g. ['--account=lab', '--qos=normal']")

    def sbatch_args(self, run_id: str) -> list[str]:
        options = {"partition": self.partition, "time": self.time, "cpus-per-task": self.cpus_per_task,
                   "mem": self.mem, "gres": self.gres}
        output = Path(self.output_dir or Path(os.environ.get("DAGSTER_HOME", ".")) / "slurm")
        output.mkdir(parents=True, exist_ok=True)
        return [f"--job-name=dagster-run-{run_id[:8]}", f"--output={output}/dagster-run-{run_id}-%j.out",
                *(f"--{k}={v}" for k, v in options.items() if v is not None), *self.extra_args]


def job_script(command: list[str]) -> str:
    return ("#!/bin/bash\n"
            'echo "d2m: Slurm job $SLURM_JOB_ID on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"\n'
            f"exec {shlex.join(command)}\n")


class SlurmRunLauncher(ConfiguredRunLauncher):
    config_class = SlurmJobConfig
    config: SlurmJobConfig

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        command = execute_run_command(run.job_code_origin.executable_path, self.execute_run_argument(run))
        job_id = slurm.submit(job_script(command), self.config.sbatch_args(run.run_id))
        self._instance.add_run_tags(run.run_id, {JOB_ID_TAG: job_id})
        self._instance.report_engine_event(f"Submitted Slurm job {job_id}", run,
                                           EngineEventData({"Slurm job id": job_id}))

    def _job_id(self, run: DagsterRun) -> str | None:
        return run.tags.get(JOB_ID_TAG)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished or not self._job_id(run):
            return False
        self._instance.report_run_canceling(run)
        slurm.cancel(self._job_id(run))
        self._instance.report_engine_event(f"Cancelled Slurm job {self._job_id(run)}", run)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        job_id = self._job_id(run)
        if job_id is None:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "the run has no Slurm job id")
        try:
            state = slurm.job_state(job_id)
        except slurm.SlurmError as exc:  # controller down or restarting: say nothing about the run yet
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"cannot ask Slurm: {exc}", transient=True)
        if state is None:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, f"Slurm job {job_id} is lost (unknown to Slurm)")
        if state.succeeded:
            return CheckRunHealthResult(WorkerStatus.SUCCESS, str(state))
        if state.finished:
            return CheckRunHealthResult(WorkerStatus.FAILED, str(state))
        return CheckRunHealthResult(WorkerStatus.RUNNING, str(state))

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        job_id = self._job_id(run)
        return slurm.describe(job_id) if job_id else None

"""Slurm from Python: submit a batch job, read its state, cancel it (`sbatch`, `scontrol`, `sacct`, `scancel`)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

# Job states after which the job will not run again (Slurm's `JobState`, first word of sacct's `State`).
SUCCEEDED = {"COMPLETED"}
FAILED = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED",
          "TIMEOUT"}


class SlurmError(RuntimeError):
    """A Slurm command failed (controller unreachable, job refused, ...); the message is Slurm's."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    reason: str = ""
    exit_code: str = ""

    @property
    def finished(self) -> bool:
        return self.state in SUCCEEDED | FAILED

    @property
    def succeeded(self) -> bool:
        return self.state in SUCCEEDED

    def __str__(self) -> str:
        extra = ", ".join(x for x in (self.reason and f"reason {self.reason}",
                                      self.exit_code and f"exit code {self.exit_code}") if x)
        return f"Slurm job {self.job_id} {self.state}" + (f" ({extra})" if extra else "")


def _run(argv: list[str], stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{argv[0]}: {exc}") from exc


def submit(script: str, sbatch_args: list[str]) -> str:
    """Submit a batch script (its text) with these sbatch options; returns the job id."""
    done = _run(["sbatch", "--parsable", *sbatch_args], stdin=script)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def job_state(job_id: str) -> JobState | None:
    """The job's state from the controller, else from accounting; None when Slurm no longer knows the job
    (purged after MinJobAge with no accounting). Raises SlurmError when Slurm cannot be asked."""
    done = _run(["scontrol", "show", "job", "-o", job_id])
    if done.returncode == 0 and done.stdout.strip():
        fields = _fields(done.stdout)
        return JobState(job_id, fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""), fields.get("ExitCode", ""))
    if "Invalid job id" not in done.stderr:
        raise SlurmError(f"scontrol show job {job_id}: {done.stderr.strip()}")
    acct = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"])
    rows = [r.split("|") for r in acct.stdout.splitlines() if r.strip()] if acct.returncode == 0 else []
    if rows and rows[-1][0]:
        return JobState(job_id, rows[-1][0].split()[0], "", rows[-1][1] if len(rows[-1]) > 1 else "")
    return None


def cancel(job_id: str) -> None:
    done = _run(["scancel", job_id])
    if done.returncode != 0:
        raise SlurmError(f"scancel {job_id}: {done.stderr.strip()}")


def describe(job_id: str) -> str:
    """`scontrol show job` as Slurm prints it (for run logs), or why it could not be read."""
    done = _run(["scontrol", "show", "job", job_id])
    return (done.stdout or done.stderr).strip()

"""A Dagster job for the warm launcher's test: its op says it started, then waits while $HELD_JOB_HOLD exists."""

import os
import time
from pathlib import Path

from dagster import in_process_executor, job, op


@op
def wait_while_held() -> int:
    hold = Path(os.environ["HELD_JOB_HOLD"])
    (hold.parent / f"started-{os.getpid()}").touch()
    while hold.exists():
        time.sleep(0.05)
    return os.getpid()


@job(executor_def=in_process_executor)  # as d2m's runs: the step runs in the run worker
def held() -> None:
    wait_while_held()

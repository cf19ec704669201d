"""A run worker started before its run is known: `python -m d2m_assets.warm_worker READY_FD`.

It imports what every d2m run worker imports before and while it computes (dagster's run path, the code
location's modules, torch and the model, reading and output code), then closes READY_FD to say it is ready,
and reads one line from stdin: the argument of `dagster api execute_run` (a serialized ExecuteRunArgs).
It then runs that very command in this process, so the run starts with its imports done. End of input (the
launcher exited, or gave it no run) ends it quietly. Nothing here builds definitions or reads a config:
the code location is loaded from the run's origin once the run is known, as in any run worker.
"""

from __future__ import annotations

import importlib
import os
import sys

PRELOAD = (
    "dagster._cli.api",  # the run worker's command and dagster's execution path
    "dagster._core.storage.schedules",  # the instance's storages (about 0.8 s)
    "dagster._core.storage.sqlite_storage",
    "d2m_assets.storage",  # d2m's PostgreSQL event log storage and dagster-postgres
    "d2m_assets.definitions",  # the code location's modules (definitions are built later, from the run's config)
)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    from d2m_core.lightimports import import_run_stack

    import_run_stack()  # torch, the models, reading and output code


def main(argv: list[str]) -> int:
    ready_fd = int(argv[1])
    try:
        preload()
        os.close(ready_fd)
        line = sys.stdin.readline().strip()
    except KeyboardInterrupt:  # the launcher's process group was interrupted before a run came
        return 130
    if not line:
        return 0
    from dagster._cli import main as dagster_main

    sys.argv = ["dagster", "api", "execute_run", line]
    dagster_main()  # exits as `dagster api execute_run` does (status 1 when the run failed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

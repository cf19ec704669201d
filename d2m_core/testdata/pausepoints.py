"""Test-only: named places where a process can be held, so that a test kills it (SIGKILL) exactly there.

Outside tests nothing is set and `pause_at` returns at once. A test sets, for the process under test,
`D2M_TEST_PAUSE=<point>:<stem>` and `D2M_TEST_PAUSE_DIR=<folder>`: when the process reaches that point for that
shard, it creates `<folder>/<point>-<stem>` and blocks the calling thread for good (the other threads go on).
The test waits for that file, then kills the process, so the kill provably lands at that point.

Points (each reached once per shard):
- `shard-computing`: the engine has computed the shard's first batch (mid-shard; nothing of it written yet).
- `between-writes`: the shard's `{stem}.parquet` is written, its `{stem}.json` (and `.npz`) not yet.
- `shard-complete`: every file of the shard is written (by the writer thread); nothing of it recorded in
  Dagster yet, and no later shard written.
- `reshard-shard-written`: output shard `<stem>` of a reshard (`00000001`) is written, tar and stats file;
  not yet recorded in Dagster.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAUSE_ENV = "D2M_TEST_PAUSE"
PAUSE_DIR_ENV = "D2M_TEST_PAUSE_DIR"
POINTS = ("shard-computing", "between-writes", "shard-complete", "reshard-shard-written")


def pause_at(point: str, stem: str) -> None:
    """Block here for good if the test asked to stop at `point` for shard `stem` (after saying so)."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted or wanted != f"{point}:{stem}":
        return
    folder = Path(os.environ[PAUSE_DIR_ENV])
    (folder / f"{point}-{stem}.tmp").write_text(str(os.getpid()))
    os.replace(folder / f"{point}-{stem}.tmp", folder / f"{point}-{stem}")
    threading.Event().wait()

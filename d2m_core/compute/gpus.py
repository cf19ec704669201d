"""One GPU per run: a run takes the first free GPU by an exclusive lock file, released when it ends or dies."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
LOCK_DIR_ENV = "D2M_GPU_LOCK_DIR"


def gpu_count() -> int:
    """GPUs this process can use (the Dagster pool's limit should equal it); 1 on a CPU machine."""
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


@contextmanager
def claim_device(spec: int | str, *, lock_dir: str | None = None, poll_s: float = 1.0) -> Iterator[torch.device]:
    """Yield the device a run should use. With several GPUs, each concurrent run gets a different one:
    the configured index first, else the first whose lock is free (waiting while all are taken).
    The lock is an fcntl lock, so a killed process frees its GPU. (torch is imported here, not with the
    module: the Dagster definitions that name this load without it.)"""
    import torch

    from d2m_core.compute.device import resolve_device

    device = resolve_device(spec)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count and (device.index or 0) >= count:  # e.g. `device: 3` in a Slurm job that was given one GPU
        log.warning("device %s asked for, but only %d GPU(s) are visible: using cuda:0", device, count)
        device = torch.device("cuda", 0)
    if count <= 1:
        yield device
        return
    folder = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    order = [(device.index or 0) + k for k in range(count)]
    while True:
        for index in (i % count for i in order):
            handle = open(folder / f"d2m-gpu-{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                log.info("using GPU %d", index)
                yield torch.device("cuda", index)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)

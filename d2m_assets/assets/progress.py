"""Progress while shards run: the shard asset reports each engine update here; it goes to the Dagster run log
(every D2M_PROGRESS_INTERVAL_S seconds and at each shard's end) and to whoever listens in this process
(`d2m run`'s display, since `d2m run` materializes in-process)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from d2m_core.compute.engine import Progress

PROGRESS_INTERVAL_ENV = "D2M_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


@dataclass(frozen=True)
class ShardFailed:
    """A shard that failed after its pass (writing its files, scores, checks), with the reason."""

    shard: str
    error: str


@dataclass(frozen=True)
class RunPlan:
    """What `d2m run` is about to process: shard count to do and already done."""

    todo: int
    skipped: int


Event = Union["Progress", ShardFailed, RunPlan]
_listeners: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def interval_s() -> float:
    """Seconds between progress lines (run log; `d2m run` off a terminal): $D2M_PROGRESS_INTERVAL_S or 30."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def publish(event: Event) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)


@contextmanager
def listening(listener: Callable[[Event], None]) -> Iterator[None]:
    """Receive every event published in this process while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def progress_line(p: Progress) -> str:
    state = "failed" if p.error else ("done" if p.finished else "running")
    return (f"shard {p.shard} {state} ({p.shards_done}/{p.shards_total} shards of this run done): "
            f"{p.samples} samples, {p.samples_per_s:.1f} samples/s" + (f": {p.error}" if p.error else ""))


class RunLogReporter:
    """The asset's progress callback: every update to the listeners, a run-log line at most every interval
    and at each shard's end."""

    def __init__(self, log: Callable[[str], None], every_s: float | None = None) -> None:
        self.log = log
        self.every_s = interval_s() if every_s is None else every_s
        self.last = time.monotonic()

    def __call__(self, p: Progress) -> None:
        publish(p)
        now = time.monotonic()
        if p.finished or now - self.last >= self.every_s:
            self.last = now
            self.log(progress_line(p))

    def failed(self, shard: str, error: str) -> None:
        publish(ShardFailed(shard, error))


def run_failure_line(result: Any) -> str:
    """The first line of why an in-process run failed (its step failure), for one-line reports."""
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None and error.cause is not None and "Error occurred while executing" in error.message:
            error = error.cause
        if error is not None:
            return error.message.strip().splitlines()[0]
    return "a blocking check failed: see the Checks tab"

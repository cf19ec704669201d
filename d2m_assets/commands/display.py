"""What `d2m run` shows: a live tqdm bar on a terminal (shards done of total, samples, samples/s, ETA), a
progress line every N seconds when stdout is not a terminal, failures as they happen, and a final summary."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from typing import IO, TYPE_CHECKING, Any

from d2m_assets.assets import progress
from d2m_assets.assets.progress import RunPlan, ShardFailed

if TYPE_CHECKING:
    from d2m_assets.commands.runner import RunSummary


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _AboveBar:
    """A stream whose lines tqdm prints above its bars."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


class RunDisplay:
    """A context manager that listens to the shard asset's progress while `d2m run` materializes."""

    def __init__(self, stream: IO[str], *, interval_s: float | None = None, tty: bool | None = None) -> None:
        self.stream = stream
        self.interval_s = progress.interval_s() if interval_s is None else interval_s
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.first_sample_at: float | None = None
        self.todo: int | None = None
        self.skipped = 0
        self.samples: dict[str, int] = {}  # per shard, latest count written
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar: Any = None
        self._stack = ExitStack()

    # context
    def __enter__(self) -> RunDisplay:
        self._stack.enter_context(progress.listening(self.on_event))
        if self.tty:  # log lines printed above the bar, not through it
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler):
                    previous = handler.setStream(_AboveBar(handler.stream))
                    self._stack.callback(handler.setStream, previous)
        elif self.interval_s > 0:
            thread = threading.Thread(target=self._ticker, name="d2m-progress", daemon=True)
            thread.start()
            self._stack.callback(thread.join)
            self._stack.callback(self._stop.set)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self._bar is not None:
            self._refresh_bar()
            self._bar.close()

    # events
    def on_event(self, event: progress.Event) -> None:
        with self._lock:
            if isinstance(event, RunPlan):
                self.todo, self.skipped = event.todo, event.skipped
                self.started = time.monotonic()
                if self.tty and event.todo:
                    self._open_bar()
                return
            if isinstance(event, ShardFailed):
                self._fail(event.shard, event.error)
                return
            if self.first_sample_at is None:
                self.first_sample_at = time.monotonic()
            self.samples[event.shard] = event.samples
            self.current = None if event.finished else event.shard
            if event.error:
                self._fail(event.shard, event.error)
            elif event.finished:
                self.done.add(event.shard)
            if self._bar is not None:
                self._refresh_bar()

    def _fail(self, shard: str, error: str) -> None:
        """Record a failure; its line once (the engine and the asset both report a tar that cannot be read)."""
        self.done.discard(shard)
        if self.failed.get(shard) != error:
            self.failed[shard] = error
            self.echo(f"shard {shard} failed: {error}")

    def echo(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    # figures
    def total_samples(self) -> int:
        return sum(self.samples.values())

    def rate(self) -> float:
        return self.total_samples() / max(time.monotonic() - self.started, 1e-9)

    def fraction_done(self) -> float:
        """Shards finished, plus the running shard's share estimated from the finished shards' sizes."""
        finished = len(self.done) + len(self.failed)
        if self.current is None or not self.done:
            return float(finished)
        per_shard = sum(self.samples[s] for s in self.done) / len(self.done)
        return finished + min(self.samples.get(self.current, 0) / max(per_shard, 1.0), 0.95)

    def eta_s(self) -> float | None:
        fraction = self.fraction_done()
        if not self.todo or fraction <= 0:
            return None
        return (time.monotonic() - self.started) / fraction * (self.todo - fraction)

    def status_line(self) -> str:
        eta = self.eta_s()
        failed = f", {len(self.failed)} failed" if self.failed else ""
        if not self.samples and not self.failed:  # models load, then a whole batch goes through them at once
            return (f"progress: 0/{self.todo} shards done, no batch finished yet (models loading or the first "
                    f"batch_size samples running), elapsed {_duration(time.monotonic() - self.started)}")
        return (f"progress: {len(self.done)}/{self.todo} shards done{failed}, {self.total_samples()} samples, "
                f"{self.rate():.1f} samples/s, elapsed {_duration(time.monotonic() - self.started)}"
                + (f", ETA {_duration(eta)}" if eta is not None else ""))

    # terminal
    def _open_bar(self) -> None:
        from tqdm import tqdm

        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            size = os.terminal_size((0, 0))
        known = size.columns > 0 and size.lines > 0  # a pty without a size (e.g. under `script`): fixed 100 x 24
        self._bar = tqdm(total=self.todo, file=self.stream, leave=True, dynamic_ncols=known,
                         ncols=None if known else 100, nrows=None if known else 24, desc=f"0/{self.todo} shards",
                         bar_format="{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]")

    def _refresh_bar(self) -> None:
        self._bar.n = round(self.fraction_done(), 3)
        failed = f" ({len(self.failed)} failed)" if self.failed else ""
        self._bar.set_description_str(f"{len(self.done)}/{self.todo} shards{failed}, {self.total_samples()} samples, "
                                      f"{self.rate():.1f} samples/s", refresh=False)
        self._bar.refresh()

    def _ticker(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self.todo:
                    print(self.status_line(), file=self.stream, flush=True)

    # end
    def print_summary(self, summary: RunSummary) -> None:
        elapsed = time.monotonic() - self.started
        samples = self.total_samples()
        lines = [f"d2m run: {len(summary.processed)} shard(s) processed, {len(summary.skipped)} skipped "
                 f"(already materialized), {len(summary.failed_shards)} failed; {samples} samples in "
                 f"{_duration(elapsed)} ({samples / max(elapsed, 1e-9):.1f} samples/s)"]
        for shard in summary.failed_shards:
            reason = self.failed.get(shard)
            lines.append(f"  failed: {shard}" + (f": {reason}" if reason else ""))
        if summary.failed_runs and summary.failed_shards:
            lines.append(f"  failed run(s): {', '.join(summary.failed_runs)} (tracebacks in their Dagster run logs; "
                         "rerun `d2m run` to retry what is missing)")
        elif summary.failed_runs:  # every shard written and recorded; the run failed after them (a blocking check)
            lines.append(f"  failed run(s): {', '.join(summary.failed_runs)}: every shard was written and recorded, "
                         "the run failed after them (its `[run i/n]` line above says why; details in its Dagster "
                         "run log)")
        print("\n".join(lines), file=self.stream, flush=True)

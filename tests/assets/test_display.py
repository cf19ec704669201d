"""`d2m run`'s display off a terminal: status lines from the published events, each failure once, the summary."""

import io
from types import SimpleNamespace

from d2m_assets.commands.display import RunDisplay
from d2m_assets.assets.progress import RunPlan, ShardFailed, publish
from d2m_assets.commands.runner import RunSummary


def test_failures_once_status_and_summary() -> None:
    out = io.StringIO()
    with RunDisplay(out, interval_s=0, tty=False) as display:
        publish(RunPlan(todo=3, skipped=1))
        waiting = display.status_line()
        publish(SimpleNamespace(shard="00000", samples=8, finished=True, error=None))
        publish(SimpleNamespace(shard="00001", samples=4, finished=False, error=None))
        publish(SimpleNamespace(shard="00002", samples=0, finished=True, error="not a readable tar"))
        publish(ShardFailed("00002", "not a readable tar"))  # the asset reports what the engine already did
        status = display.status_line()
    assert out.getvalue() == "shard 00002 failed: not a readable tar\n"
    assert waiting.startswith("progress: 0/3 shards done, no batch finished yet (models loading or the first "
                              "batch_size samples running), elapsed 0m")
    assert status.startswith("progress: 1/3 shards done, 1 failed, 12 samples, ") and "ETA" in status
    display.print_summary(RunSummary(shards=["00000", "00001", "00002", "00003"], skipped=["00003"],
                                     processed=["00000", "00001"], failed_runs=["r1"], failed_shards=["00002"]))
    summary = out.getvalue().splitlines()[1:]
    assert summary[0].startswith("d2m run: 2 shard(s) processed, 1 skipped (already materialized), 1 failed; 12 samples")
    assert summary[1] == "  failed: 00002: not a readable tar" and "r1" in summary[2]


def test_a_run_that_failed_after_writing_every_shard_says_so() -> None:
    """A blocking check failing the run after each shard was written: no shard is called missing."""
    out = io.StringIO()
    with RunDisplay(out, interval_s=0, tty=False) as display:
        publish(RunPlan(todo=1, skipped=0))
        publish(SimpleNamespace(shard="00000", samples=8, finished=True, error=None))
        display.print_summary(RunSummary(shards=["00000"], processed=["00000"], failed_runs=["r1"]))
    summary = out.getvalue().splitlines()
    assert summary[0].startswith("d2m run: 1 shard(s) processed, 0 skipped (already materialized), 0 failed; 8 samples")
    assert summary[1] == ("  failed run(s): r1: every shard was written and recorded, the run failed after them "
                          "(its `[run i/n]` line above says why; details in its Dagster run log)")

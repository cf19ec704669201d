"""`d2m run`'s display off a terminal: status lines from the published events, each failure once, the summary."""

import io
from types import SimpleNamespace

from d2m_assets.display import RunDisplay
from d2m_assets.progress import RunPlan, ShardFailed, publish
from d2m_assets.runner import RunSummary


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

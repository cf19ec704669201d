"""`d2m bench --stage run-overhead`: a run launched by the instance's launcher, as the daemon launches one (into the
spare worker started ahead, or a new `dagster api execute_run` process), executes its step in that process and
reports its timeline from the run's event log."""

from pathlib import Path

from d2m_assets.commands.overhead import run_overhead
from d2m_core.reading.shards import expand_shards


def test_a_launched_run_executes_in_its_worker_and_reports_its_timeline(shard_dir: Path, write_config) -> None:
    config = write_config(shard_dir)
    record = run_overhead(config, expand_shards(str(shard_dir / "*.tar")), "basic.yml", "warm")
    assert record["stage"] == "run-overhead" and record["config"] == "basic.yml" and record["launch"] == "warm"
    assert record["executor"] == "in_process"  # no second process per run
    assert record["shards"] == 2 and record["samples"] == 17  # 2 x 9 samples, one undecodable image
    # One process's log lines, in the order it wrote them: launch, model build, first batch, end of work, exit.
    assert 0 < record["launch_to_worker_start_s"] <= record["launch_to_run_start_s"] <= record["launch_to_step_start_s"]
    assert record["launch_to_step_start_s"] <= record["launch_to_model_build_start_s"] <= record["launch_to_first_batch_s"]
    assert record["model_build_s"] >= 0 and record["work_s"] >= 0 and record["teardown_s"] >= 0
    assert record["launch_to_exit_s"] >= record["launch_to_first_batch_s"] + record["work_s"]
    assert {"load_1m", "cores"} <= set(record)

"""One Dagster instance (PostgreSQL on loopback) holding d2m's own definitions at DataComp pool sizes.

    .venv/bin/python bench/instance_scale.py --shards 12800 128000 1280000 [--yml configs/datacomp.yml]

For each N, on a fresh PostgreSQL database, prints one JSON line:
- register: the sensor path. d2m's `registration()` builds the partition adds and `raw_shards`
  materializations for N shards, applied as the sensor daemon applies a SensorResult (25,000 keys per
  evaluation: `add_dynamic_partitions`, then `report_runless_asset_event` per event). The tar listing
  itself is `bench/sensor_scan.py`'s. Events past --register-events are extrapolated (said in the output).
- get_dynamic_partitions: reading all N keys back.
- backfill: the webserver's own GraphQL mutation (in-process) for all N shards and every shard asset,
  as the UI's launch dialog sends it.
- tick: a real `dagster-daemon` (runs are queued, never launched: max_concurrent_runs 0) for --tick-seconds:
  time to the first submitted run, runs submitted, the daemon's peak RSS.
- record: a run's events per shard as d2m's asset body emits them (`reporting.materializations` and
  `reporting.check_events` of a ShardOutcome), stored through the instance as a run stores them, for
  --record-shards shards in runs of tars_per_wds; ms per shard, and N x that (extrapolated).
- ui: the webserver's GraphQL queries behind the Partitions tab and the asset checks of shard_metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the PostgreSQL server the platform tests use

from services import postgres_server  # noqa: E402

from dagster import DagsterEvent, DagsterEventType, DagsterInstance, RunsFilter  # noqa: E402
from dagster._core.events import StepMaterializationData  # noqa: E402
from dagster._core.test_utils import create_run_for_test  # noqa: E402
from dagster._core.workspace.context import WorkspaceProcessContext  # noqa: E402
from dagster._core.workspace.load_target import WorkspaceFileTarget  # noqa: E402
from dagster_graphql.test.utils import execute_dagster_graphql  # noqa: E402

from d2m_assets import reporting  # noqa: E402
from d2m_assets.datasets import Dataset  # noqa: E402
from d2m_assets.sensors import registration  # noqa: E402
from d2m_core import ShardRef, catalog, load_config  # noqa: E402
from d2m_core.identity import asset_identity  # noqa: E402
from d2m_core.pipeline import ShardOutcome, selected_assets  # noqa: E402
from d2m_core.records import ShardStats  # noqa: E402
from d2m_core.validation import CHECKS, CheckOutcome  # noqa: E402

PER_EVALUATION = 25_000  # the sensor's cap on partition adds per evaluation
DATASET = Dataset("xlarge", "")  # the bench yml names it
JOB = "__ASSET_JOB"

LAUNCH = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
PARTITIONS_TAB = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  partitionStats { numMaterialized numPartitions numFailed numMaterializing }
  assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
    materializedPartitions failedPartitions unmaterializedPartitions materializingPartitions } } } } }"""
CHECKS_PANEL = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } } } }"""


def asset_key_path(asset: str) -> list[str]:
    return list(DATASET.key(asset).path)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def graphql(context, query: str, variables: dict) -> dict:
    result = execute_dagster_graphql(context.create_request_context(), query, variables)
    assert not result.errors, result.errors
    return result.data


def register(instance: DagsterInstance, stems: list[str], events_max: int) -> dict:
    add_s = events_s = 0.0
    events = 0
    for start in range(0, len(stems), PER_EVALUATION):
        refs = [ShardRef(s, f"s3://pool/shards/{s}.tar") for s in stems[start:start + PER_EVALUATION]]
        request = registration(DATASET, refs)
        for add in request["dynamic_partitions_requests"]:
            add_s += timed(instance.add_dynamic_partitions, add.partitions_def_name, list(add.partition_keys))[1]
        if events < events_max:
            t = time.perf_counter()
            for event in request["asset_events"]:
                instance.report_runless_asset_event(event)
            events_s += time.perf_counter() - t
            events += len(request["asset_events"])
    per_event_ms = 1000 * events_s / max(events, 1)
    return {"add_partitions_s": round(add_s, 1), "raw_shards_events_measured": events,
            "raw_shards_events_s": round(events_s, 1), "raw_shards_ms_per_shard": round(per_event_ms, 3),
            "raw_shards_events_s_for_all": round(per_event_ms * len(stems) / 1000, 1),
            "raw_shards_extrapolated": events < len(stems)}


def shard_outcome(stem: str, assets: list[str]) -> ShardOutcome:
    """What d2m's pipeline reports for a shard of 10,000 samples (paths, counts, weights, checks, quantiles)."""
    paths = {a: f"s3://pool/metadata/.d2m/{a}/{stem}.npz" for a in assets}
    paths |= {k: f"s3://pool/metadata/{stem}.{k}" for k in ("parquet", "npz", "json")}
    checks = [CheckOutcome(name, True, f"{name} passed", {"samples": 10_000}) for name in CHECKS]
    return ShardOutcome(stem=stem, stats=ShardStats(shard=stem, samples_read=10_000, samples_written=10_000),
                        paths=paths, samples_per_s=2500.0, checks=checks,
                        quantiles={f"{c}_p{q}": 0.1 * q / 50 for c in ("clip_b32", "clip_l14") for q in (5, 50, 95)})


def record(instance: DagsterInstance, stems: list[str], assets: list[str], per_run: int, config) -> dict:
    """Store the events of runs over these shards the way the run's step stores them: per shard, its
    materializations then its check evaluations (d2m's `reporting`), in runs of `per_run` shards."""
    metadata_key = DATASET.key(catalog.METADATA_ASSET)
    job = DATASET.named("shard_pipeline")
    start = time.perf_counter()
    events = 0
    for first in range(0, len(stems), per_run):
        chunk = stems[first:first + per_run]
        run = create_run_for_test(instance, job_name=JOB, tags={"dagster/asset_partition_range_start": chunk[0],
                                                                "dagster/asset_partition_range_end": chunk[-1]})
        for stem in chunk:
            outcome = shard_outcome(stem, assets)
            tar = {"url": f"s3://pool/shards/{stem}.tar", "size": 400_000_000, "etag": "0" * 32}
            identities = {a: asset_identity(config, a, tar, {}) for a in assets}
            for mat in reporting.materializations(DATASET, outcome, assets, identities):
                instance.report_dagster_event(DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, JOB, step_key=job,
                                                           event_specific_data=StepMaterializationData(mat)), run.run_id)
                events += 1
            for check in reporting.check_evaluations(instance, metadata_key, stem, outcome.checks):
                instance.report_dagster_event(DagsterEvent(DagsterEventType.ASSET_CHECK_EVALUATION.value, JOB,
                                                           step_key=job, event_specific_data=check), run.run_id)
                events += 1
    elapsed = time.perf_counter() - start
    return {"shards": len(stems), "events": events, "events_per_shard": round(events / len(stems), 2),
            "s": round(elapsed, 1), "ms_per_shard": round(1000 * elapsed / len(stems), 2)}


def tick(env: dict, seconds: float, instance: DagsterInstance, log: Path) -> dict:
    with log.open("w") as out:
        proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO,
                                env=os.environ | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.time()
    first = None
    peak_kb = 0
    try:
        while time.time() - start < seconds:
            count = instance.get_runs_count(RunsFilter())
            if count and first is None:
                first = time.time() - start
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
            except FileNotFoundError:
                break
            time.sleep(1)
        runs = instance.get_runs_count(RunsFilter())
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    return {"seconds_watched": seconds, "first_run_after_s": first and round(first, 1), "runs_submitted": runs,
            "daemon_peak_rss_mb": round(peak_kb / 1024)}


def measure(n: int, yml: Path, args: argparse.Namespace, pg: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="d2m-scale-"))
    home = tmp / "home"
    home.mkdir()
    settings = yaml.safe_load((REPO / "deploy" / "dagster-postgres.yaml").read_text())
    settings["concurrency"] = {"runs": {"max_concurrent_runs": 0}}  # queue the runs, never launch them
    settings["run_retries"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    config = yaml.safe_load(yml.read_text()) | {"input_tars": str(tmp / "tars"), "output_metadata_dir": str(tmp / "out"),
                                                "custom_pypath": None, "dataset": DATASET.name}
    (tmp / "tars").mkdir()
    (tmp / "d2m.yml").write_text(yaml.safe_dump(config))
    env = pg | {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(tmp / "d2m.yml"), "D2M_AUTOMATION": "off"}
    os.environ.update(env)
    d2m_config = load_config(tmp / "d2m.yml")
    assets = selected_assets(d2m_config)
    per_run = config.get("tars_per_wds") or 8
    stems = [f"{i:08d}" for i in range(n)]
    out: dict = {"shards": n, "yml": yml.name, "assets_per_shard": len(assets), "checks_per_shard": len(CHECKS)}
    with DagsterInstance.get() as instance:
        out["register"] = register(instance, stems, args.register_events)
        keys, out["get_dynamic_partitions_s"] = timed(instance.get_dynamic_partitions, DATASET.partitions_name)
        assert len(keys) == n
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as context:
            params = {"partitionNames": stems, "assetSelection": [{"path": asset_key_path(a)} for a in assets],
                      "fromFailure": False}
            launched, out["backfill_create_s"] = timed(graphql, context, LAUNCH, {"params": params})
            assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", launched
            out["backfill_request_mb"] = round(len(json.dumps(params)) / 1e6, 1)
            out["tick"] = tick(env, args.tick_seconds, instance, tmp / "daemon.log")
            out["record"] = record(instance, stems[: args.record_shards], assets, per_run, d2m_config)
            out["record"]["s_for_all_extrapolated"] = round(out["record"]["ms_per_shard"] * n / 1000)
            key = {"path": asset_key_path(catalog.METADATA_ASSET)}
            tab, out["ui_partitions_tab_s"] = timed(graphql, context, PARTITIONS_TAB, {"key": key})
            out["ui_partitions_tab_mb"] = round(len(json.dumps(tab)) / 1e6, 1)
            _, out["ui_checks_panel_s"] = timed(graphql, context, CHECKS_PANEL, {"key": key})
    for k in ("get_dynamic_partitions_s", "backfill_create_s", "ui_partitions_tab_s", "ui_checks_panel_s"):
        out[k] = round(out[k], 2)
    out["load"] = os.getloadavg()[0]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[12_800, 128_000, 1_280_000])
    parser.add_argument("--yml", type=Path, default=REPO / "configs" / "datacomp.yml")
    parser.add_argument("--register-events", type=int, default=128_000, help="raw_shards events stored (the rest extrapolated)")
    parser.add_argument("--record-shards", type=int, default=400, help="shards whose run events are stored")
    parser.add_argument("--tick-seconds", type=float, default=90)
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    for n in args.shards:
        with postgres_server() as pg:
            line = json.dumps(measure(n, args.yml.resolve(), args, pg))
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()

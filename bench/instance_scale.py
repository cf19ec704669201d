"""One Dagster instance (PostgreSQL on loopback) holding d2m's own definitions at DataComp pool sizes.

    .venv/bin/python bench/instance_scale.py --shards 12800 128000 1280000 [--yml configs/datacomp.yml]

For each N, on a fresh PostgreSQL 15 database, prints one JSON line (every figure says what was sampled):
- register: the sensor path as d2m runs it now (`register_shards`: raw_shards events stored in batches, then
  one bulk add of the partition keys), 25,000 shards per evaluation, all N keys; the raw_shards events of
  the first --register-events shards (the rest of the keys added alone, the events' time extrapolated).
  Tar identities are synthetic (size, ETag): listing the tars is `bench/sensor_scan.py`'s.
- register_sample: at that table size, back to back on --sample-shards new shards each: Dagster's daemon
  applying a SensorResult (d2m's sensor before: each event through `report_runless_asset_event`, then
  the daemon's own `_handle_dynamic_partitions_requests`, which looks each key up), and `register_shards`.
- get_dynamic_partitions: reading all N keys back.
- backfill: the webserver's own GraphQL mutation (in-process) for all N shards and every shard asset,
  as the UI's launch dialog sends it.
- tick: a real `dagster-daemon` (runs are queued, never launched: max_concurrent_runs 0) for --tick-seconds:
  time to the first submitted run, runs submitted, the daemon's peak RSS.
- record: a run's events per shard as d2m's asset body emits them (`reporting.materializations`, then
  `reporting.check_evaluations`, which looks the shard's materialization up), stored through the instance as
  the run worker stores them, for --record-shards shards in runs of tars_per_wds: first with Dagster's
  PostgreSQL storage as it comes (a new connection per statement), then after `reporting.hold_connections`
  (what the asset body does now), then also with PostgreSQL's synchronous_commit off (a deployment setting).
  Per shard: ms, connections opened, statements, and the split between materializations, check evaluations
  and d2m's own lookup.
- ui: the webserver's GraphQL queries behind the Partitions tab (shard_metadata: only the recorded shards
  materialized; raw_shards: every registered event) and the asset checks of shard_metadata.
- db: PostgreSQL's size, and bytes per stored run event (event_logs with its indexes and tags).
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

import logging  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from dagster import DagsterEvent, DagsterEventType, DagsterInstance, RunsFilter  # noqa: E402
from dagster._daemon.sensor import _handle_dynamic_partitions_requests  # noqa: E402
from dagster._core.events import StepMaterializationData  # noqa: E402
from dagster._core.test_utils import create_run_for_test  # noqa: E402
from dagster._core.workspace.context import WorkspaceProcessContext  # noqa: E402
from dagster._core.workspace.load_target import WorkspaceFileTarget  # noqa: E402
from dagster_graphql.test.utils import execute_dagster_graphql  # noqa: E402

from d2m_assets.assets import reporting
from d2m_assets.daemon import sensors  # noqa: E402
from d2m_assets.datasets import Dataset  # noqa: E402
from d2m_core import ShardRef, catalog, load_config  # noqa: E402
from d2m_core.outputs.identity import asset_identity  # noqa: E402
from d2m_core.outputs.records import ShardOutcome, ShardStats  # noqa: E402
from d2m_core.outputs.records import CheckOutcome  # noqa: E402
from d2m_core.outputs.validation import CHECKS  # noqa: E402
from d2m_core.selection import selected_assets  # noqa: E402

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


def synthetic_tars(refs) -> dict:
    return {r.stem: {"url": r.url, "size": 400_000_000, "etag": f"{int(r.stem, 36) % 16**32:032x}"} for r in refs}


sensors.tar_identities = synthetic_tars  # the bench's tars exist nowhere: identities as an S3 listing gives them


def refs_of(stems: list[str]) -> list[ShardRef]:
    return [ShardRef(s, f"s3://pool/shards/{s}.tar") for s in stems]


def register(instance: DagsterInstance, stems: list[str], events_max: int) -> dict:
    """d2m's sensor path for all N keys, 25,000 per evaluation; past events_max, keys only."""
    with_events = keys_only = 0.0
    events = 0
    for start in range(0, len(stems), PER_EVALUATION):
        chunk = stems[start:start + PER_EVALUATION]
        if events < events_max:
            with_events += timed(sensors.register_shards, instance, DATASET, refs_of(chunk))[1]
            events += len(chunk)
        else:
            keys_only += timed(instance.add_dynamic_partitions, DATASET.partitions_name, chunk)[1]
    per_shard_ms = 1000 * with_events / max(events, 1)
    return {"shards_with_events": events, "s_with_events": round(with_events, 1),
            "ms_per_shard": round(per_shard_ms, 3), "keys_only_shards": len(stems) - events,
            "keys_only_s": round(keys_only, 1), "s_for_all_extrapolated": round(per_shard_ms * len(stems) / 1000, 1)}


class _TickContext:
    """What `_handle_dynamic_partitions_requests` needs of the daemon's sensor tick context."""
    logger = logging.getLogger("bench.sensor")

    def add_dynamic_partitions_request_result(self, result) -> None:
        pass


def register_sample(instance: DagsterInstance, n: int, count: int) -> dict:
    """Back to back, `count` new shards each at table size n: as Dagster's daemon applies the SensorResult
    d2m's sensor returned before (events one at a time, then each key looked up and the new ones added), and
    d2m's `register_shards`."""
    def new_stems(tag: str) -> list[str]:
        return [f"{tag}{i:07d}" for i in range(count)]

    before_stems = new_stems("b")
    events = [sensors.raw_shard_event(DATASET, r, t) for r, t in
              zip(refs_of(before_stems), synthetic_tars(refs_of(before_stems)).values())]
    start = time.perf_counter()
    for event in events:
        instance.report_runless_asset_event(event)
    events_s = time.perf_counter() - start
    request = DATASET.partitions.build_add_request(before_stems)
    keys_s = timed(_handle_dynamic_partitions_requests, [request], instance, _TickContext())[1]
    after_s = timed(sensors.register_shards, instance, DATASET, refs_of(new_stems("a")))[1]
    return {"shards_each": count, "daemon_applied_ms_per_shard": round(1000 * (events_s + keys_s) / count, 2),
            "daemon_events_ms_per_shard": round(1000 * events_s / count, 2),
            "daemon_keys_ms_per_shard": round(1000 * keys_s / count, 2),
            "register_shards_ms_per_shard": round(1000 * after_s / count, 3),
            "daemon_applied_s_for_all_extrapolated": round((events_s + keys_s) * n / count)}


def shard_outcome(stem: str, assets: list[str]) -> ShardOutcome:
    """What d2m's pipeline reports for a shard of 10,000 samples (paths, counts, weights, checks, quantiles)."""
    paths = {a: f"s3://pool/metadata/.d2m/{a}/{stem}.npz" for a in assets}
    paths |= {k: f"s3://pool/metadata/{stem}.{k}" for k in ("parquet", "npz", "json")}
    checks = [CheckOutcome(name, True, f"{name} passed", {"samples": 10_000}) for name in CHECKS]
    return ShardOutcome(stem=stem, stats=ShardStats(shard=stem, samples_read=10_000, samples_written=10_000),
                        paths=paths, samples_per_s=2500.0, checks=checks,
                        quantiles={f"{c}_p{q}": 0.1 * q / 50 for c in ("clip_b32", "clip_l14") for q in (5, 50, 95)})


class Counter:
    """Connections opened and statements sent by the event log storage's current engine."""

    def __init__(self, instance: DagsterInstance):
        self.connects = self.statements = 0
        self.instance = instance
        self.attach()

    def attach(self) -> None:
        engine = self.instance.event_log_storage._engine  # noqa: SLF001 (bench only)
        sa.event.listen(engine, "connect", lambda *_: setattr(self, "connects", self.connects + 1))
        sa.event.listen(engine, "before_cursor_execute", lambda *_: setattr(self, "statements", self.statements + 1))


def record_shard(instance: DagsterInstance, run_id: str, stem: str, assets: list[str], config) -> tuple[int, dict]:
    """Store one shard's events as the run's step stores them: its materializations, then its check
    evaluations (d2m's `reporting`, which looks the shard's materialization up). Events stored, and seconds
    spent in materializations, d2m's lookup and check evaluations."""
    metadata_key = DATASET.key(catalog.METADATA_ASSET)
    job = DATASET.named("shard_pipeline")
    outcome = shard_outcome(stem, assets)
    tar = {"url": f"s3://pool/shards/{stem}.tar", "size": 400_000_000, "etag": "0" * 32}
    identities = {a: asset_identity(config, a, tar, {}) for a in assets}
    events = 0
    t = time.perf_counter()
    for mat in reporting.materializations(DATASET, outcome, assets, identities):
        instance.report_dagster_event(DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, JOB, step_key=job,
                                                   event_specific_data=StepMaterializationData(mat)), run_id)
        events += 1
    t2 = time.perf_counter()
    checks = list(reporting.check_evaluations(instance, metadata_key, stem, outcome.checks))
    t3 = time.perf_counter()
    for check in checks:
        instance.report_dagster_event(DagsterEvent(DagsterEventType.ASSET_CHECK_EVALUATION.value, JOB,
                                                   step_key=job, event_specific_data=check), run_id)
        events += 1
    t4 = time.perf_counter()
    return events, {"materializations": t2 - t, "lookup": t3 - t2, "checks": t4 - t3}


def record(instance: DagsterInstance, stems: list[str], assets: list[str], per_run: int, config,
           counter: Counter) -> dict:
    """Store the events of runs over these shards the way the run's step stores them (`record_shard`),
    in runs of `per_run` shards."""
    split = {"materializations": 0.0, "lookup": 0.0, "checks": 0.0}
    connects, statements = counter.connects, counter.statements
    start = time.perf_counter()
    events = 0
    for first in range(0, len(stems), per_run):
        chunk = stems[first:first + per_run]
        run = create_run_for_test(instance, job_name=JOB, tags={"dagster/asset_partition_range_start": chunk[0],
                                                                "dagster/asset_partition_range_end": chunk[-1]})
        for stem in chunk:
            stored, times = record_shard(instance, run.run_id, stem, assets, config)
            events += stored
            for k, v in times.items():
                split[k] += v
    elapsed = time.perf_counter() - start
    n = len(stems)
    return {"shards": n, "events": events, "events_per_shard": round(events / n, 2), "s": round(elapsed, 1),
            "ms_per_shard": round(1000 * elapsed / n, 1),
            "connections_per_shard": round((counter.connects - connects) / n, 1),
            "statements_per_shard": round((counter.statements - statements) / n, 1),
            **{f"{k}_ms_per_shard": round(1000 * v / n, 1) for k, v in split.items()}}


def db_sizes(instance: DagsterInstance, run_events: float) -> dict:
    """The database's size, and the bytes of the event log (rows, indexes, tags) per stored event."""
    with instance.event_log_storage._engine.connect() as conn:  # noqa: SLF001 (bench only)
        q = lambda sql: conn.execute(sa.text(sql)).scalar()  # noqa: E731
        db = q("SELECT pg_database_size(current_database())")
        rows = q("SELECT count(*) FROM event_logs")
        logs = q("SELECT pg_total_relation_size('event_logs') + pg_total_relation_size('asset_event_tags')")
        checks = q("SELECT pg_total_relation_size('asset_check_executions')")
    return {"database_mb": round(db / 1e6), "event_logs_rows": rows, "event_logs_mb": round(logs / 1e6),
            "bytes_per_event": round(logs / max(rows, 1)), "check_executions_mb": round(checks / 1e6, 1),
            "run_events_sampled": int(run_events)}


def tick(env: dict, seconds: float, instance: DagsterInstance, log: Path) -> dict:
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO,
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
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a busy daemon: stop it and its code server outright
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)
    return {"seconds_watched": seconds, "first_run_after_s": first and round(first, 1), "runs_submitted": runs,
            "daemon_peak_rss_mb": round(peak_kb / 1024)}


def queue_only_settings() -> dict:
    """deploy/dagster-postgres.yaml with runs queued, never launched, and never retried."""
    settings = yaml.safe_load((REPO / "deploy" / "dagster-postgres.yaml").read_text())
    settings["concurrency"] = {"runs": {"max_concurrent_runs": 0}}  # queue the runs, never launch them
    settings["run_retries"] = {"enabled": False}
    return settings


def measure(n: int, yml: Path, args: argparse.Namespace, pg: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="d2m-scale-"))
    home = tmp / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(queue_only_settings()))
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
        out["load_1m_start"] = os.getloadavg()[0]
        out["register"] = register(instance, stems, args.register_events)
        keys, out["get_dynamic_partitions_s"] = timed(instance.get_dynamic_partitions, DATASET.partitions_name)
        assert len(keys) == n
        out["register_sample"] = register_sample(instance, n, args.sample_shards) | {"load_1m": os.getloadavg()[0]}
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as context:
            params = {"partitionNames": stems, "assetSelection": [{"path": asset_key_path(a)} for a in assets],
                      "fromFailure": False}
            launched, out["backfill_create_s"] = timed(graphql, context, LAUNCH, {"params": params})
            assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", launched
            out["backfill_request_mb"] = round(len(json.dumps(params)) / 1e6, 1)
            out["tick"] = tick(env, args.tick_seconds, instance, tmp / "daemon.log")
            counter = Counter(instance)
            sample = args.record_shards
            out["record_before"] = record(instance, stems[:sample], assets, per_run, d2m_config, counter)
            out["record_before"]["load_1m"] = os.getloadavg()[0]
            reporting.hold_connections(instance)  # what the asset body does now
            counter.attach()
            out["record_after"] = record(instance, stems[sample:2 * sample], assets, per_run, d2m_config, counter)
            out["record_after"]["load_1m"] = os.getloadavg()[0]
            # the same with PostgreSQL's synchronous_commit off for d2m's sessions (a deployment's choice:
            # `params: {options: "-c synchronous_commit=off"}` in dagster.yaml's postgres_db), on new sessions
            with instance.event_log_storage._engine.connect() as conn:  # noqa: SLF001 (bench only)
                conn.execute(sa.text("ALTER DATABASE dagster SET synchronous_commit = off"))
            with DagsterInstance.from_ref(instance.get_ref()) as fresh:
                reporting.hold_connections(fresh)
                out["record_async_commit"] = record(fresh, stems[2 * sample:3 * sample], assets, per_run, d2m_config,
                                                    Counter(fresh))
                out["record_async_commit"]["load_1m"] = os.getloadavg()[0]
            with instance.event_log_storage._engine.connect() as conn:  # noqa: SLF001 (bench only)
                conn.execute(sa.text("ALTER DATABASE dagster RESET synchronous_commit"))
            for k in ("record_before", "record_after", "record_async_commit"):
                out[k]["s_for_all_extrapolated"] = round(out[k]["ms_per_shard"] * n / 1000)
            for asset in (catalog.METADATA_ASSET, sensors.RAW_SHARDS):
                key = {"path": asset_key_path(asset)}
                tab, out[f"ui_partitions_tab_{asset}_s"] = timed(graphql, context, PARTITIONS_TAB, {"key": key})
                out[f"ui_partitions_tab_{asset}_mb"] = round(len(json.dumps(tab)) / 1e6, 1)
            key = {"path": asset_key_path(catalog.METADATA_ASSET)}
            _, out["ui_checks_panel_s"] = timed(graphql, context, CHECKS_PANEL, {"key": key})
        out["db"] = db_sizes(instance, 3 * sample * out["record_after"]["events_per_shard"])
    for k in [k for k in out if k.endswith("_s") and isinstance(out[k], float)]:
        out[k] = round(out[k], 2)
    out["load_1m_end"] = os.getloadavg()[0]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[12_800, 128_000, 1_280_000])
    parser.add_argument("--yml", type=Path, default=REPO / "configs" / "datacomp.yml")
    parser.add_argument("--register-events", type=int, default=128_000, help="raw_shards events stored (the rest extrapolated)")
    parser.add_argument("--record-shards", type=int, default=40,
                        help="shards whose run events are stored, before and after (each)")
    parser.add_argument("--sample-shards", type=int, default=300,
                        help="new shards registered the daemon's way and d2m's way (each), at table size N")
    parser.add_argument("--tick-seconds", type=float, default=90)
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    for n in args.shards:
        with postgres_server() as pg:
            emit(measure(n, args.yml.resolve(), args, pg), args.out)


def emit(record: dict, out: Path | None) -> None:
    """Print one JSON line, and append it to `out` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

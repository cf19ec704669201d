"""How fast runs for a slice get submitted into the run queue, with d2m's own definitions on PostgreSQL.

    PYTHONPATH=. .venv/bin/python bench/backfill_submit.py --shards 12800 --tars-per-wds 1024 \
        --paths backfill daemon [--storage dagster] [--seconds 300] [--profile --stats /tmp/prof] \
        [--out bench/results/cpu-backfill-submit.jsonl]

For each N, on a fresh PostgreSQL 15 database (tests/services.py), N shards registered the sensor's way
(`register_shards`: raw_shards events and partition keys), then per path, one JSON line:
- backfill: the UI's backfill of every shard asset (the webserver's own GraphQL mutation), then the
  backfill daemon's own `execute_backfill_iteration` called in-process for at most --seconds: runs submitted
  and when, and whether the first iteration ended. With --profile, cProfile of that call (its top
  functions by cumulative time in the JSON line, the full stats in --stats).
- daemon: the same backfill, then a real `dagster-daemon` watched for --seconds (instance_scale's tick):
  time to the first submitted run, runs submitted, the daemon's peak RSS.
Runs are queued, never launched (max_concurrent_runs 0). --storage dagster: Dagster's own PostgreSQL storage
(`storage: postgres`, what deploy/dagster-postgres.yaml had before d2m_assets.storage).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the PostgreSQL server the platform tests use
sys.path.insert(0, str(REPO / "bench"))

from services import postgres_server  # noqa: E402

from dagster import DagsterInstance, RunsFilter  # noqa: E402
from dagster._core.workspace.context import WorkspaceProcessContext  # noqa: E402
from dagster._core.workspace.load_target import WorkspaceFileTarget  # noqa: E402

import instance_scale as scale  # noqa: E402  (register, graphql, LAUNCH, synthetic tars)
from d2m_core import load_config  # noqa: E402
from d2m_core.selection import selected_assets  # noqa: E402

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
PARTITION = "dagster/partition"


class Timeout(Exception):
    pass


_TIMED_OUT: list[bool] = []


def _alarm(signum, frame):
    _TIMED_OUT.append(True)  # Dagster's iteration may catch the exception and log it: remembered here
    raise Timeout()


def queued_runs(instance: DagsterInstance, stems: list[str]) -> dict:
    """The runs in the queue: how many, shards per run, and shards requested by more than one run."""
    index = {s: i for i, s in enumerate(stems)}
    runs = instance.get_runs(RunsFilter())
    requested: Counter = Counter()
    sizes = []
    selections: Counter = Counter()
    created = sorted(r.create_timestamp.timestamp() for r in instance.get_run_records(RunsFilter()))
    for run in runs:
        tags = run.tags
        if RANGE_START in tags:
            keys = stems[index[tags[RANGE_START]]:index[tags[RANGE_END]] + 1]
        elif PARTITION in tags:
            keys = [tags[PARTITION]]
        else:
            keys = []
        sizes.append(len(keys))
        selections[" ".join(sorted(k.path[-1] for k in run.asset_selection or []))
                   + f" +{len(run.asset_check_selection or [])} checks"] += 1
        requested.update(keys)
    twice = sum(1 for c in requested.values() if c > 1)
    return {"runs": len(runs), "shards_requested": len(requested), "shards_requested_twice": twice,
            "runs_by_selection": dict(selections), "shards_per_run_min": min(sizes, default=0), "shards_per_run_max": max(sizes, default=0),
            "first_run_created": created[0] if created else None, "last_run_created": created[-1] if created else None}


def profiled(fn, seconds: float, profile: bool, stats_path: Path | None):
    """fn() for at most `seconds` (SIGALRM), under cProfile if asked; returns (finished, elapsed, top)."""
    prof = cProfile.Profile() if profile else None
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # again every second: Dagster catches some exceptions
    start = time.perf_counter()
    finished = True
    _TIMED_OUT.clear()
    try:
        if prof:
            prof.enable()
        fn()
    except Timeout:
        finished = False
    finally:
        if prof:
            prof.disable()
        signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed = time.perf_counter() - start
    finished = finished and not _TIMED_OUT
    top = []
    if prof:
        stats = pstats.Stats(prof)
        if stats_path:
            stats.dump_stats(str(stats_path))
        stats.sort_stats("cumulative")
        for (file, line, name), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:60]:
            top.append({"fn": f"{Path(file).name}:{line}:{name}", "calls": nc, "cum_s": round(ct, 2),
                        "own_s": round(tt, 2)})
    return finished, elapsed, top


def backfill_path(instance, context, stems, assets, args, tag) -> dict:
    from dagster._daemon.backfill import execute_backfill_iteration
    params = {"partitionNames": stems, "assetSelection": [{"path": scale.asset_key_path(a)} for a in assets],
              "fromFailure": False}
    launched, create_s = scale.timed(scale.graphql, context, scale.LAUNCH, {"params": params})
    assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", launched
    logger = logging.getLogger("bench.backfill")
    start = time.time()

    def iterate():
        for _ in range(args.iterations):
            list(execute_backfill_iteration(context, logger))

    finished, elapsed, top = profiled(iterate, args.seconds, args.profile, args.stats and Path(f"{args.stats}.{tag}"))
    runs = queued_runs(instance, stems)
    first = runs.pop("first_run_created")
    last = runs.pop("last_run_created")
    return {"path": "backfill", "backfill_create_s": round(create_s, 2), "iterations_asked": args.iterations,
            "finished": finished, "s": round(elapsed, 1), **runs,
            "first_run_after_s": first and round(first - start, 1), "last_run_after_s": last and round(last - start, 1),
            "runs_per_minute": round(60 * runs["runs"] / elapsed, 2), "profiled": args.profile, "top": top}


def daemon_path(instance, context, stems, assets, args, tag) -> dict:
    """The UI's backfill, then a real dagster-daemon for --seconds (instance_scale's tick)."""
    params = {"partitionNames": stems, "assetSelection": [{"path": scale.asset_key_path(a)} for a in assets],
              "fromFailure": False}
    launched, create_s = scale.timed(scale.graphql, context, scale.LAUNCH, {"params": params})
    assert launched["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess", launched
    start = time.time()
    watched = scale.tick(dict(os.environ), args.seconds, instance, Path(tempfile.mkdtemp()) / "daemon.log")
    runs = queued_runs(instance, stems)
    runs.pop("first_run_created")  # the tick above times the first run itself
    last = runs.pop("last_run_created")
    return {"path": "daemon", "backfill_create_s": round(create_s, 2), **watched, **runs,
            "last_run_after_s": last and round(last - start, 1), "top": []}


PATHS = {"backfill": backfill_path, "daemon": daemon_path}


def measure(n: int, path: str, args: argparse.Namespace, pg: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="d2m-submit-"))
    home = tmp / "home"
    home.mkdir()
    settings = scale.queue_only_settings()
    if args.storage == "dagster":  # Dagster's own PostgreSQL storage for everything (d2m before)
        db = settings["event_log_storage"]["config"]
        for key in ("run_storage", "event_log_storage", "schedule_storage"):
            settings.pop(key)
        settings["storage"] = {"postgres": db}
        os.environ.pop("DAGSTER_EVENT_BATCH_SIZE", None)
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    config = yaml.safe_load(args.yml.read_text()) | {"input_tars": str(tmp / "tars"), "output_metadata_dir": str(tmp / "out"),
                                                     "custom_pypath": None, "dataset": scale.DATASET.name,
                                                     "tars_per_wds": args.tars_per_wds}
    (tmp / "tars").mkdir()
    (tmp / "d2m.yml").write_text(yaml.safe_dump(config))
    env = pg | {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(tmp / "d2m.yml"), "D2M_AUTOMATION": "off"}
    os.environ.update(env)
    scale.DATASET = scale.Dataset("xlarge", str(tmp / "d2m.yml"))
    assets = selected_assets(load_config(tmp / "d2m.yml"))
    stems = [f"{i:08d}" for i in range(n)]
    out: dict = {"shards": n, "path": path, "storage": args.storage, "yml": args.yml.name, "tars_per_wds": args.tars_per_wds,
                 "assets_per_shard": len(assets)}
    with DagsterInstance.get() as instance:
        out["load_1m_start"] = os.getloadavg()[0]
        out["register"] = scale.register(instance, stems, n)
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])) as context:
            out |= PATHS[path](instance, context, stems, assets, args, f"{n}.{path}")
    out["load_1m_end"] = os.getloadavg()[0]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[12_800])
    parser.add_argument("--paths", nargs="+", default=["backfill"], choices=sorted(PATHS))
    parser.add_argument("--yml", type=Path, default=REPO / "configs" / "datacomp.yml")
    parser.add_argument("--tars-per-wds", type=int, default=1024)
    parser.add_argument("--storage", choices=["d2m", "dagster"], default="d2m",
                        help="event log storage: deploy/dagster-postgres.yaml's (d2m) or Dagster's own PostgreSQL one")
    parser.add_argument("--seconds", type=float, default=240, help="stop the measured call after this long")
    parser.add_argument("--iterations", type=int, default=1, help="backfill: daemon iterations")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured call")
    parser.add_argument("--stats", help="write the full pstats here (suffixed .N.path)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    args.yml = args.yml.resolve()
    for n in args.shards:
        for path in args.paths:
            with postgres_server() as pg:
                scale.emit(measure(n, path, args, pg), args.out)


if __name__ == "__main__":
    main()

"""Many runs recording shards into one PostgreSQL server at once, with d2m's own definitions and recording path.

    PYTHONPATH=. .venv/bin/python bench/instance_writers.py --shards 12800 --writers 1 2 4 8 16 \
        [--seconds 60] [--out bench/results/cpu-instance-writers.jsonl]

On a fresh PostgreSQL 15 database on loopback (tests/services.py, default settings), the instance of
deploy/dagster-postgres.yaml (d2m_assets.storage's event log storage), N shards registered the sensor's way
(`register_shards`: raw_shards events and partition keys). Then for each K, K writer processes, each like
a run worker: its own instance, one run, `reporting.hold_connections` (as the asset body does), then, from
a common start, shard after shard for --seconds: the shard's 16 events recorded as
`instance_scale.record_shard` records them (11 materializations, d2m's lookup of the shard's
materialization, 5 check results). Every shard is recorded once (distinct shards per writer).

One JSON line per K: per-shard recording latency over all writers (median, p90, max), shards recorded per
second by all writers together (shards done / time from the common start to the last writer's end),
the writers' CPU seconds, the PostgreSQL server's (its postmaster and backends, from /proc),
pg_stat_database's commits, rows inserted and blocks read, the tables' sequential and index scans over the
same window, what the writers' backends were doing (pg_stat_activity sampled 4 times a second: on CPU,
waiting on a lock, a lightweight lock, IO, or idle between statements), how busy the machine's CPUs were,
and the 1-minute load at the start and end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the PostgreSQL server the platform tests use
sys.path.insert(0, str(REPO / "bench"))

from services import postgres_server  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from dagster import DagsterInstance  # noqa: E402
from dagster._core.test_utils import create_run_for_test  # noqa: E402

import instance_scale as scale  # noqa: E402  (record_shard, register, queue_only_settings, emit)
from d2m_assets.assets import reporting  # noqa: E402
from d2m_core import load_config  # noqa: E402
from d2m_core.selection import selected_assets  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def writer(stems: list[str], seconds: float, barrier, results) -> None:
    """One run worker: its instance, its run and a held connection; then shards until `seconds` have passed
    since the common start (the barrier), each shard's recording time kept."""
    d2m_config = load_config(Path(os.environ["D2M_CONFIG"]))
    assets = selected_assets(d2m_config)
    with DagsterInstance.get() as instance:
        reporting.hold_connections(instance)
        run = create_run_for_test(instance, job_name=scale.JOB, tags={"dagster/asset_partition_range_start": stems[0],
                                                                      "dagster/asset_partition_range_end": stems[-1]})
        barrier.wait()
        start, cpu = time.perf_counter(), time.process_time()
        latencies, events = [], 0
        for stem in stems:
            if time.perf_counter() - start >= seconds:
                break
            t = time.perf_counter()
            stored, _ = scale.record_shard(instance, run.run_id, stem, assets, d2m_config)
            latencies.append(time.perf_counter() - t)
            events += stored
        else:
            raise RuntimeError(f"a writer ran out of shards ({len(stems)}) before {seconds} s: give it more")
        results.put({"end": time.time(), "latencies": latencies, "events": events,
                     "cpu_s": time.process_time() - cpu})


def postgres_cpu_s(engine) -> float:
    """CPU seconds of the PostgreSQL server so far: its postmaster (with its reaped children) and the live
    processes it started (backends, checkpointer, WAL writer ...)."""
    with engine.connect() as conn:  # the backend's parent, read while the backend lives
        backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pid, ppid = int(proc.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def db_stats(engine) -> dict:
    """pg_stat_database's counters for the database, sequential and index scans of its tables, and the
    server's CPU seconds."""
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT xact_commit, tup_inserted, blks_read, blks_hit FROM pg_stat_database "
                                   "WHERE datname = current_database()")).one()
        tables = conn.execute(sa.text("SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0) "
                                      "FROM pg_stat_user_tables")).all()
    stats = dict(row._mapping) | {"server_cpu_s": postgres_cpu_s(engine)}
    for name, seq_scan, seq_rows, idx_scan in tables:
        stats |= {f"seq_scan:{name}": seq_scan, f"seq_rows:{name}": seq_rows, f"idx_scan:{name}": idx_scan}
    return stats


class WaitSampler(threading.Thread):
    """What the database's other backends are doing, sampled every `every` seconds from pg_stat_activity over
    one held connection: active on CPU (no wait event), waiting on a lock, on a lightweight lock, on IO, or
    on the client (idle in a statement's gap)."""

    def __init__(self, engine, every: float = 0.25):
        super().__init__(daemon=True)
        self.engine, self.every, self.samples = engine, every, []
        self.stop = threading.Event()

    def run(self) -> None:
        query = sa.text("SELECT state, wait_event_type FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        with self.engine.connect() as conn:
            while not self.stop.wait(self.every):
                rows = conn.execute(query).all()
                self.samples.append({
                    "on_cpu": sum(1 for s, w in rows if s == "active" and w is None),
                    "lock": sum(1 for s, w in rows if s == "active" and w == "Lock"),
                    "lwlock": sum(1 for s, w in rows if s == "active" and w == "LWLock"),
                    "io": sum(1 for s, w in rows if s == "active" and w == "IO"),
                    "idle": sum(1 for s, _ in rows if s != "active")})

    def summary(self) -> dict:
        self.stop.set()
        self.join()
        n = max(len(self.samples), 1)
        keys = ("on_cpu", "lock", "lwlock", "io", "idle")
        return {"samples": len(self.samples)} | {k: round(sum(s[k] for s in self.samples) / n, 2) for k in keys}


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def phase(k: int, stems: list[str], seconds: float, engine) -> dict:
    """K writers at once over these shards (split between them), from a common start."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k + 1), ctx.Queue()
    share = len(stems) // k
    procs = [ctx.Process(target=writer, args=(stems[i * share:(i + 1) * share], seconds, barrier, results))
             for i in range(k)]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)  # every writer has its instance, its run and its connection
    load_start = os.getloadavg()[0]
    before, busy_before, start = db_stats(engine), machine_busy(), time.time()
    sampler = WaitSampler(engine)
    sampler.start()
    done = [results.get(timeout=seconds + 600) for _ in procs]
    backends = sampler.summary()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a writer failed (exit {p.exitcode})"
    time.sleep(1)  # the writers' backends have reported their statistics on closing
    after, busy_after = db_stats(engine), machine_busy()
    window = max(d["end"] for d in done) - start
    latencies = sorted(t for d in done for t in d["latencies"])
    shards = len(latencies)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    per_shard = lambda prefix: {k.split(":", 1)[1]: round(v / shards, 1) for k, v in sorted(  # noqa: E731
        delta.items(), key=lambda kv: -kv[1]) if k.startswith(prefix) and v}
    return {
        "writers": k, "seconds": seconds, "window_s": round(window, 1), "shards": shards,
        "shards_per_writer": [len(d["latencies"]) for d in done],
        "events": sum(d["events"] for d in done),
        "ms_per_shard_median": round(1000 * statistics.median(latencies)),
        "ms_per_shard_p90": round(1000 * latencies[int(0.9 * (shards - 1))]),
        "ms_per_shard_max": round(1000 * latencies[-1]),
        "shards_per_s": round(shards / window, 2),
        "events_per_s": round(sum(d["events"] for d in done) / window, 1),
        "writers_cpu_s": round(sum(d["cpu_s"] for d in done), 1),
        "server_cpu_s": round(delta["server_cpu_s"], 1),
        "server_commits": delta["xact_commit"], "server_commits_per_shard": round(delta["xact_commit"] / shards, 1),
        "server_rows_inserted": delta["tup_inserted"], "server_blocks_read": delta["blks_read"],
        "server_blocks_hit": delta["blks_hit"], "server_blocks_hit_per_shard": round(delta["blks_hit"] / shards),
        "seq_scans_per_shard": per_shard("seq_scan:"), "seq_rows_read_per_shard": per_shard("seq_rows:"),
        "index_scans_per_shard": per_shard("idx_scan:"),
        "backends_mean": backends,
        "machine_busy": round((busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1]), 2),
        "cores": os.cpu_count(), "load_1m_start": load_start, "load_1m_end": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=12_800, help="shards registered (and partition keys)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=60, help="how long the writers record, each K")
    parser.add_argument("--yml", type=Path, default=REPO / "configs" / "datacomp.yml")
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="d2m-writers-"))
    try:
        with postgres_server() as pg:
            home = tmp / "home"
            home.mkdir()
            (home / "dagster.yaml").write_text(yaml.safe_dump(scale.queue_only_settings()))
            config = yaml.safe_load(args.yml.read_text()) | {
                "input_tars": str(tmp / "tars"), "output_metadata_dir": str(tmp / "out"), "custom_pypath": None,
                "dataset": scale.DATASET.name}
            (tmp / "tars").mkdir()
            (tmp / "d2m.yml").write_text(yaml.safe_dump(config))
            os.environ.update(pg | {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(tmp / "d2m.yml"),
                                    "D2M_AUTOMATION": "off"})
            stems = [f"{i:08d}" for i in range(args.shards)]
            with DagsterInstance.get() as instance:
                registered = scale.register(instance, stems, args.shards)
                engine = instance.event_log_storage._engine  # noqa: SLF001 (bench only)
                base = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "registered_shards": args.shards, "register_s": registered["s_with_events"],
                        "yml": args.yml.name, "assets_per_shard": len(selected_assets(load_config(tmp / "d2m.yml")))}
                used = 0
                per_phase = len(stems) // len(args.writers)
                for k in args.writers:
                    line = base | phase(k, stems[used:used + per_phase], args.seconds, engine)
                    used += per_phase
                    scale.emit(line, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

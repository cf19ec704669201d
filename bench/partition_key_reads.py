"""What one read of a dynamic partitions definition's keys costs on PostgreSQL, in full (Dagster's storage)
and when nothing changed since the last read (d2m's storage: a count + highest id query, then the keys it
holds), at DataComp's pool sizes.

    PYTHONPATH=. .venv/bin/python bench/partition_key_reads.py [--sizes 12800 128000 1280000] [--out FILE]

A fresh PostgreSQL 15 on loopback (tests/services.py), deploy/dagster-postgres.yaml's instance; keys added
100,000 per call. One JSON line per size: the full read, 5 unchanged reads (min, median), the stamp query
alone, whether both return the same keys, and the 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the PostgreSQL server the platform tests use

from dagster import DagsterInstance  # noqa: E402
from dagster_postgres.event_log import PostgresEventLogStorage  # noqa: E402
from services import postgres_server  # noqa: E402

NAME = "shards"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12_800, 128_000, 1_280_000])
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, postgres_server() as pg:
        shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", Path(home) / "dagster.yaml")
        os.environ.update(pg | {"DAGSTER_HOME": home})
        instance = DagsterInstance.get()
        storage = instance.event_log_storage
        for size in sorted(args.sizes):
            keys = [f"{i:08d}" for i in range(len(instance.get_dynamic_partitions(NAME)), size)]
            for start in range(0, len(keys), 100_000):
                instance.add_dynamic_partitions(NAME, keys[start:start + 100_000])
            began = time.perf_counter()
            full = PostgresEventLogStorage.get_dynamic_partitions(storage, NAME)
            full_s = time.perf_counter() - began
            storage.get_dynamic_partitions(NAME)  # holds them now
            unchanged = []
            for _ in range(5):
                began = time.perf_counter()
                held = storage.get_dynamic_partitions(NAME)
                unchanged.append(time.perf_counter() - began)
            began = time.perf_counter()
            storage._partitions_stamp(NAME)  # noqa: SLF001
            stamp_s = time.perf_counter() - began
            line = {"bench": "partition-key-reads", "keys": size, "full_read_s": round(full_s, 3),
                    "unchanged_read_s_min": round(min(unchanged), 4),
                    "unchanged_read_s_median": round(statistics.median(unchanged), 4),
                    "stamp_query_s": round(stamp_s, 4), "same_keys": held == full, "load_1m": os.getloadavg()[0]}
            print(json.dumps(line), flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

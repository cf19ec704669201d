"""How late Dagster records a shard after its files are complete, and what a kill -9 loses: prints JSON lines.

    python bench/record_latency.py OUT_DIR [--shards 4] [--samples 24]

Runs `d2m run` (random weights, CPU) over N shards in one Dagster run (tars_per_wds: N) and reports, per shard,
the seconds from its last file ({shard}.json) to its shard_metadata materialization and to its check results.
Then runs it again into a fresh instance, kills it (SIGKILL) right after shard 00001's files are complete, and
reports which shards had complete files and which the instance had recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from d2m_core.testdata.synth import make_shards

BIN = Path(sys.executable).parent


def _config(root: Path, name: str, shards: Path, n: int) -> Path:
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump({
        "models": ["oai-clip-vit-b32"], "postprocess_columns": ["oai-clip-vit-b32-score"],
        "postprocess_features": ["oai-clip-vit-b32-image", "oai-clip-vit-b32-text"], "additional_fields": ["uid"],
        "nworkers": 2, "batch_size": 8, "device": "cpu", "input_tars": str(shards / "*.tar"),
        "output_metadata_dir": str(root / name), "tars_per_wds": n, "max_failure_rate": 0.5}))
    return path


def _env(home: Path) -> dict[str, str]:
    return os.environ | {"DAGSTER_HOME": str(home), "D2M_RANDOM_WEIGHTS": "1", "PYTHONWARNINGS": "ignore"}


def _records(home: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per partition: the shard_metadata materialization's time and its last check evaluation's time."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    mats: dict[str, float] = {}
    checks: dict[str, float] = {}
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.ASSET_MATERIALIZATION and event.asset_key.path[-1] == "shard_metadata":
                mats.setdefault(event.partition, entry.timestamp)
            if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
                data = event.event_specific_data
                part = getattr(data, "partition", None) or "(range)"
                checks[part] = max(checks.get(part, 0.0), entry.timestamp)
    return mats, checks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    root = Path(args.out).resolve()
    shards = root / "shards"
    if not any(shards.glob("*.tar")):
        make_shards(shards, shards=args.shards, samples=args.samples, max_side=256)

    config = _config(root, "latency", shards, args.shards)
    home = root / "home-latency"
    subprocess.run([str(BIN / "d2m"), "run", "--yml", str(config)], env=_env(home), check=True, capture_output=True)
    mats, checks = _records(home)
    for stem in sorted(mats):
        last_file = (root / "latency" / f"{stem}.json").stat().st_mtime
        print(json.dumps({"shard": stem, "record_after_last_file_s": round(mats[stem] - last_file, 3),
                          "checks_after_last_file_s": round(checks.get(stem, checks.get("(range)", 0.0)) - last_file, 3)
                          if checks else None}), flush=True)

    config = _config(root, "killed", shards, args.shards)
    home = root / "home-killed"
    proc = subprocess.Popen([str(BIN / "d2m"), "run", "--yml", str(config)], env=_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = root / "killed" / "00001.json"
    while not target.exists():
        if proc.poll() is not None:
            raise SystemExit("d2m run ended before shard 00001 was complete")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mats, _ = _records(home)
    complete = sorted(p.stem for p in (root / "killed").glob("*.json"))
    print(json.dumps({"kill": "right after 00001's files", "complete_files": complete, "recorded": sorted(mats),
                      "complete_but_unrecorded": sorted(set(complete) - set(mats))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

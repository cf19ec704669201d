"""How long new_shards_sensor's discovery takes on a prefix of N tars (local folder): prints JSON lines.

    .venv/bin/python bench/sensor_scan.py --tars 100000
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from d2m_core.reading.discovery import DiscoveryCursor, discover


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tars", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2m-scan-") as tmp:
        root = Path(tmp)
        for i in range(args.tars):
            (root / f"{i:08d}.tar").touch()
            (root / f"{i:08d}_stats.json").touch()
        known: set[str] = set()
        cursor = DiscoveryCursor()
        scan = 0
        while True:  # the first evaluations register everything, 25,000 partitions per tick at most
            start = time.perf_counter()
            refs, cursor = discover(str(root), cursor, known=known)
            known.update(r.stem for r in refs)
            scan += 1
            print(json.dumps({"scan": scan, "tars_in_prefix": args.tars, "new": len(refs), "seconds": round(time.perf_counter() - start, 4),
                              "cursor_bytes": len(cursor.dumps())}), flush=True)
            if not refs:
                break
        for extra in range(3):  # steady state: a few new tars per tick
            for j in range(10):
                stem = f"{args.tars + extra * 10 + j:08d}"
                (root / f"{stem}.tar").touch()
                (root / f"{stem}_stats.json").touch()
            start = time.perf_counter()
            refs, cursor = discover(str(root), cursor, known=known)
            known.update(r.stem for r in refs)
            print(json.dumps({"scan": "steady", "tars_in_prefix": args.tars + (extra + 1) * 10, "new": len(refs),
                              "seconds": round(time.perf_counter() - start, 4), "cursor_bytes": len(cursor.dumps())}), flush=True)


if __name__ == "__main__":
    main()

"""What the automation condition `identity_changed` costs per evaluation at N shards (SQLite instance):
the first evaluation in a process reads every shard's data version once, later ones only what was recorded
since. Prints JSON lines.

    .venv/bin/python bench/identity_condition.py --shards 10000
"""

import argparse
import json
import tempfile
import time

from dagster import AssetKey, AssetMaterialization, DagsterInstance

from d2m_assets.daemon.staleness import StaleShards
from d2m_core.outputs.identity import version_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--in-memory", action="store_true", help="an in-memory SQLite instance (faster to fill)")
    args = parser.parse_args()
    raw, key = AssetKey(["bench", "raw_shards"]), AssetKey(["bench", "shard_metadata"])
    parts = ("o" * 16, "w" * 16)
    with tempfile.TemporaryDirectory(prefix="d2m-identity-") as home:
        instance = DagsterInstance.ephemeral() if args.in_memory else DagsterInstance.local_temp(home)
        stems = [f"{i:08d}" for i in range(args.shards)]
        start = time.perf_counter()
        for stem in stems:
            tar = f"{int(stem):016x}"
            instance.report_runless_asset_event(AssetMaterialization(raw, partition=stem, tags={"dagster/data_version": tar}))
            version = version_of({"tar": tar, "output": parts[0], "weights": parts[1]})
            instance.report_runless_asset_event(AssetMaterialization(key, partition=stem, tags={"dagster/data_version": version}))
        setup = time.perf_counter() - start
        state = StaleShards()

        def evaluate(what: str, config_parts: tuple[str, str], new: int = 0) -> None:
            for stem in stems[:new]:  # `new` shards recorded since the last evaluation (from other weights)
                instance.report_runless_asset_event(AssetMaterialization(key, partition=stem, tags={"dagster/data_version": "x" * 16}))
            start = time.perf_counter()
            stale = state.update(instance, key, raw, config_parts)
            print(json.dumps({"shards": args.shards, "evaluation": what, "new_events": new, "stale": len(stale),
                              "seconds": round(time.perf_counter() - start, 4), "setup_s": round(setup, 1),
                              "storage": "in-memory sqlite" if args.in_memory else "sqlite"}), flush=True)

        evaluate("first in the process", parts)
        evaluate("nothing new", parts)
        evaluate("100 shards recorded since", parts, new=100)
        evaluate("weights changed", (parts[0], "v" * 16))


if __name__ == "__main__":
    main()

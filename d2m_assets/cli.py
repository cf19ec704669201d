"""The `d2m` command: run (the seed's workflow), make-shards, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cmd_run(args: argparse.Namespace) -> int:
    from d2m_assets.runner import run_config_file

    summary = run_config_file(args.yml)
    return 0 if summary.ok else 1


def _cmd_make_shards(args: argparse.Namespace) -> int:
    if args.faults:
        from d2m_core.faults import MANIFEST, make_fault_shards

        for case in make_fault_shards(args.out, seed=args.seed).values():
            print(f"{case.path}\t{case.what}")
        print(f"expected outcomes per sample: {Path(args.out) / MANIFEST}")
        return 0
    from d2m_core.synth import make_shards

    paths = make_shards(args.out, shards=args.shards, samples=args.samples, seed=args.seed, start=args.start,
                        max_side=args.max_side, jpeg_quality=args.jpeg_quality)
    for path in paths:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from d2m_assets.runner import run_config_file
    from d2m_core import load_config
    from d2m_core.synth import make_shards

    config_file = REPO / "configs" / "demo.yml"
    shard_dir = REPO / ".demo" / "shards"
    if not any(shard_dir.glob("*.tar")):
        print(f"making demo shards in {shard_dir}")
        make_shards(shard_dir, shards=args.shards, samples=args.samples)
    summary = run_config_file(config_file)
    out = load_config(config_file).output_metadata_dir
    print(f"\noutputs in {out}: {{shard}}.parquet, {{shard}}.npz, {{shard}}.json")
    print(f"  python -c \"import pandas as pd; print(pd.read_parquet('{out}/{summary.shards[0]}.parquet'))\"")
    print(f"Dagster UI: DAGSTER_HOME={os.environ['DAGSTER_HOME']} D2M_CONFIG={config_file} .venv/bin/dagster dev -w {REPO / 'workspace.yaml'}")
    return 0 if summary.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from d2m_core import expand_shards, load_config
    from d2m_core.bench import run_benchmark

    config = load_config(args.yml)
    updates = {k: v for k, v in (("device", args.device), ("precision", args.precision), ("gpu_decode", args.gpu_decode))
               if v is not None}
    config = config.model_copy(update=updates)
    shard_dir = Path(args.shards)
    if not any(shard_dir.glob("*.tar")):
        from d2m_core.synth import make_shards

        make_shards(shard_dir, shards=args.make_shards, samples=args.make_samples)
    for line in run_benchmark(config, expand_shards(str(shard_dir)), Path(args.yml).name, args.repeats):
        print(json.dumps(line), flush=True)
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from d2m_core import load_config
    from d2m_core.models import list_models, resolve_model_weights, weights_inventory
    from d2m_core.models.isc import DEDUP_REFERENCE_FILES
    from d2m_core.pipeline import REFERENCE_MODEL
    from d2m_core.weights import WeightsError, random_weights_enabled, resolve_weights, weights_dir

    directory = args.dir or (load_config(args.yml).weights_dir if args.yml else None)
    if args.action == "list":
        print(f"weights folder: {weights_dir(directory)} (weights_dir in the yml, or $D2M_WEIGHTS_DIR)")
        for row in weights_inventory(directory):
            print(f"\n{row['model']}: {row['file']} ({row['format']})\n  goes to: {row['path']}")
            if row["sha256"]:
                print(f"  sha256:  {row['sha256']}")
            if row["source"]:
                print(f"  get it:  {row['source']}")
        return 0
    if random_weights_enabled():
        print("d2m: D2M_RANDOM_WEIGHTS is set: unset it to verify real weights", file=sys.stderr)
        return 2
    models = load_config(args.yml).models if args.yml else list_models()
    checks = {m: (lambda m=m: resolve_model_weights(m, directory)) for m in models}
    if "dedup-isc-ft-v107" in models:
        checks[REFERENCE_MODEL] = lambda: resolve_weights(REFERENCE_MODEL, DEDUP_REFERENCE_FILES, weights_dir(directory))
    failed = 0
    for model, check in checks.items():
        try:
            record = check().record
            print(f"ok       {model}: {record.path} sha256 {record.sha256}")
        except WeightsError as err:
            failed += 1
            print(f"MISSING  {err}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2m", description="DataComp metadata as Dagster assets")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="process the shards of a seed-format yml (registers partitions, materializes)")
    run.add_argument("--yml", required=True, help="the config (the seed's yml format)")
    run.set_defaults(func=_cmd_run)

    make = sub.add_parser("make-shards", help="write img2dataset-format test shards from bundled photos")
    make.add_argument("out")
    make.add_argument("--shards", type=int, default=2)
    make.add_argument("--samples", type=int, default=32)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--start", type=int, default=0, help="index of the first shard")
    make.add_argument("--max-side", type=int, default=512)
    make.add_argument("--jpeg-quality", type=int, default=95)
    make.add_argument("--faults", action="store_true",
                      help="write the corpus of faulty shards (bad images, broken tars, ...) and faults.json instead")
    make.set_defaults(func=_cmd_make_shards)

    demo = sub.add_parser("demo", help="make demo shards and materialize the basic assets for them")
    demo.add_argument("--shards", type=int, default=3)
    demo.add_argument("--samples", type=int, default=24)
    demo.set_defaults(func=_cmd_demo)

    weights = sub.add_parser("weights", help="list the weights files each model needs, or verify a folder of them")
    weights.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    weights.add_argument("--dir", default=None, help="the weights folder (default: $D2M_WEIGHTS_DIR or ~/.cache/d2m/weights)")
    weights.add_argument("--yml", default=None, help="only the models of this config (and its weights_dir)")
    weights.set_defaults(func=_cmd_weights)

    bench = sub.add_parser("bench", help="print throughput as JSON lines")
    bench.add_argument("--yml", required=True)
    bench.add_argument("--shards", required=True, help="folder of tars (made with make-shards if empty)")
    bench.add_argument("--device", default=None, help="override the yml's device ('cpu', 0, 'cuda:1')")
    bench.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=None)
    bench.add_argument("--gpu-decode", choices=["auto", "on", "off"], default=None, help="override the yml's gpu_decode")
    bench.add_argument("--make-shards", type=int, default=2, help="shards to make when the folder is empty")
    bench.add_argument("--make-samples", type=int, default=256)
    bench.add_argument("--repeats", type=int, default=3, help="model-only passes over one batch")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    args = build_parser().parse_args(argv)
    from d2m_assets.resources import PartitionNotInInputError
    from d2m_core.catalog import UnknownOutputError
    from d2m_core.config import ConfigError
    from d2m_core.models import UnknownModelError
    from d2m_core.plugins import PluginError
    from d2m_core.shards import ShardListError
    from d2m_core.storage import StorageError
    from d2m_core.weights import WeightsError

    user_errors = (ConfigError, ShardListError, WeightsError, UnknownOutputError, UnknownModelError,
                   PluginError, PartitionNotInInputError, StorageError)
    try:
        return args.func(args)
    except user_errors as err:  # each names the field, file or shard at fault
        print(f"d2m: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `d2m` command: run (the seed's workflow), register, filter, reshard, make-shards, demo, weights, bench.

Heavy libraries (torch, open_clip, dagster) are imported inside the command that uses them, so `--help`
and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RUN_DESCRIPTION = """\
Process every shard of a dataset2metadata yml: register each tar of input_tars as a partition in the
Dagster instance at $DAGSTER_HOME, then materialize the assets the yml asks for, tars_per_wds shards per
Dagster run. Every weights file is verified first. Progress is shown live on a terminal, as a line every
--progress-every seconds otherwise, then a summary; the runs appear in the Dagster UI like any other.

reprocess: false (or absent) skips the shards whose requested assets Dagster has already materialized
(state in the instance, not files on disk), so rerunning after a failure processes exactly what is
missing; reprocess: true recomputes every shard.

exit status: 0 all shards done, 1 a shard or run failed (named above the summary), 2 a config, weights or
input error (one line saying which file or field)."""

ENVIRONMENT = """\
environment:
  DAGSTER_HOME         the Dagster instance folder (d2m run: default ./.dagster_home, created)
  D2M_CONFIG           the yml the Dagster definitions load (dagster dev, daemon, dagster asset materialize);
                       d2m run and d2m register use --yml
  D2M_WEIGHTS_DIR      the weights folder when the yml has no weights_dir (default ~/.cache/d2m/weights)
  D2M_RANDOM_WEIGHTS   1: run the same models with random weights (tests, demos); outputs say 'weights: random'
  D2M_PROGRESS_INTERVAL_S  seconds between progress lines when not on a terminal and in the run log (30)"""


def _cmd_run(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    config = load_config(args.yml)  # a config error answers before torch and dagster are imported
    from d2m_core.compute.weights_files import check_builtin_weights

    check_builtin_weights(config)  # a missing or corrupt weights file too (custom models: below)
    from d2m_core.selection import selected_assets, verify_weights

    selected_assets(config)  # unknown names, custom_pypath plugins: before dagster is imported
    verify_weights(config)  # and every weights file (the runner checks again: hashes are cached)
    from d2m_assets.commands.display import RunDisplay
    from d2m_assets.commands.runner import run_config_file

    with RunDisplay(sys.stdout, interval_s=args.progress_every) as display:
        summary = run_config_file(args.yml, echo=display.echo)
    display.print_summary(summary)
    return 0 if summary.ok else 1


def _cmd_register(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    load_config(args.yml)
    from d2m_assets.commands.registration import register_config_shards

    registered = register_config_shards(args.yml)
    print(f"{len(registered.stems)} shard(s) of {args.yml} registered as partitions of '{registered.partitions}' "
          f"in the instance at {registered.home} ({registered.added} new)")
    return 0


FILTER_DESCRIPTION = """\
Apply one of DataComp's filtering baselines (its baselines.py flags) to the yml's metadata folder
(output_metadata_dir), as the dataset's filter asset in the Dagster instance at $DAGSTER_HOME (the UI shows
the run, the counts and the score histogram), and write DataComp's uid file (.npy, u8,u8, sorted) to
--save_path. Data files (fastText lid.176.bin, ImageNet-21k ids, WordNet, centroids, ImageNet-1k L/14
embeddings) come from the weights folder: `d2m weights` lists them."""

RESHARD_DESCRIPTION = """\
Write the samples of a uid subset (DataComp's .npy) from the yml's input tars into new webdataset shards
({i:08d}.tar, then {i:08d}_stats.json) in --output-dir, as DataComp's resharder.py does: each kept sample
once per time the subset lists it, samples the metadata recorded as failures never; --apply-blur blurs
the faces of the metadata's face_bboxes. It materializes the dataset's reshard_plan and resharded_shards
assets in the Dagster instance at $DAGSTER_HOME (one partition per output shard, so the UI shows them).
Run it again to resume: shards already written are kept."""


def _filter_spec(args: argparse.Namespace):
    from pydantic import ValidationError

    from d2m_core.config import ConfigError, FilterSpec

    try:
        return FilterSpec(name=args.name, threshold=args.threshold, fraction=args.fraction, arch=args.arch,
                          image_based_scale=args.image_based_scale, batch_size=args.batch_size, asset=args.asset,
                          save_path=os.path.abspath(args.save_path))
    except ValidationError as err:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None


def _cmd_filter(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    load_config(args.yml)
    spec = _filter_spec(args)
    from d2m_assets.commands.subset_runner import filter_config_file

    run = filter_config_file(args.yml, spec)
    if not run.ok:
        print(f"d2m: filter run {run.run_id} failed: see its log in the Dagster UI", file=sys.stderr)
        return 1
    meta = run.metadata
    threshold = f", threshold {meta['threshold']}" if "threshold" in meta else ""
    print(f"{run.asset}: kept {meta['kept']} of {meta['pool_size']} samples ({meta['fraction_kept']:.2%}){threshold}")
    print(f"saving {spec.save_path} with {meta['kept']} entries")
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    load_config(args.yml)
    from d2m_assets.commands.subset_runner import reshard_config_file

    run = reshard_config_file(args.yml, args.subset_file, args.output_dir, shard_size=args.shard_size,
                              apply_blur=args.apply_blur, inject_blur_metadata=args.inject_blur_metadata)
    plan = run.plan
    print(f"selected {plan.total} samples of the subset's {plan.subset_size} ({plan.not_found} not in the metadata) "
          f"from {len(plan.inputs)} input shard(s) into {plan.num_shards} shard(s) in {args.output_dir}"
          + (f"; {len(run.skipped)} {'was' if len(run.skipped) == 1 else 'were'} already written" if run.skipped else ""))
    if not run.ok:
        print(f"d2m: {len(run.failed)} output shard(s) failed: {', '.join(run.failed)} "
              f"({next(iter(run.failed.values()))}); run it again to retry them", file=sys.stderr)
        return 1
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    if args.faults:
        from d2m_core.testdata.faults import MANIFEST, make_fault_shards

        for case in make_fault_shards(args.out, seed=args.seed).values():
            print(f"{case.path}\t{case.what}")
        print(f"expected outcomes per sample: {Path(args.out) / MANIFEST}")
        return 0
    from d2m_core.testdata.synth import make_shards

    paths = make_shards(args.out, shards=args.shards, samples=args.samples, seed=args.seed, start=args.start,
                        max_side=args.max_side, jpeg_quality=args.jpeg_quality, workers=args.workers)
    for path in paths:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from d2m_assets.commands.display import RunDisplay
    from d2m_assets.commands.runner import run_config_file
    from d2m_core.config import load_config
    from d2m_core.testdata.synth import make_shards

    os.chdir(REPO)  # the demo yml's relative paths are relative to the repo root, as the seed resolves them
    config_file = REPO / "configs" / "demo.yml"
    shard_dir = REPO / ".demo" / "shards"
    if not any(shard_dir.glob("*.tar")):
        print(f"making demo shards in {shard_dir}")
        make_shards(shard_dir, shards=args.shards, samples=args.samples)
    with RunDisplay(sys.stdout, interval_s=args.progress_every) as display:
        summary = run_config_file(config_file, echo=display.echo)
    display.print_summary(summary)
    out = load_config(config_file).output_metadata_dir
    python = REPO / ".venv" / "bin" / "python"
    print(f"\noutputs in {out}: {{shard}}.parquet, {{shard}}.npz, {{shard}}.json; look at one:")
    print(f"  {python} -c \"import pandas as pd; print(pd.read_parquet('{out}/{summary.shards[0]}.parquet'))\"")
    print("Dagster UI (on this machine only, http://127.0.0.1:3000):")
    print(f"  DAGSTER_HOME={os.environ['DAGSTER_HOME']} D2M_CONFIG={config_file} D2M_RANDOM_WEIGHTS=1 "
          f"{REPO / '.venv' / 'bin' / 'dagster'} dev -h 127.0.0.1 -w {REPO / 'workspace.yaml'}")
    return 0 if summary.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    if args.stage == "loader":
        from d2m_core.bench import loader_stage
        from d2m_core.reading.shards import expand_shards

        batch_size = load_config(args.yml).batch_size if args.yml else 512
        print(json.dumps(loader_stage(expand_shards(args.shards), processes=args.processes, batch_size=batch_size,
                                      decode=args.decode, device=args.device or "cpu")))
        return 0
    if args.yml is None:
        print(f"d2m: error: --stage {args.stage} needs --yml", file=sys.stderr)
        return 2
    config = load_config(args.yml)
    if args.stage == "run-overhead":
        from d2m_assets.commands.overhead import run_overhead
        from d2m_core.reading.shards import expand_shards

        print(json.dumps(run_overhead(args.yml, expand_shards(_bench_shards(args)), Path(args.yml).name, args.launch)))
        return 0
    from d2m_core.bench import run_benchmark, writer_stage
    from d2m_core.reading.shards import expand_shards

    if args.stage == "writer":
        print(json.dumps(writer_stage(config, expand_shards(args.shards), Path(args.yml).name, args.samples)))
        return 0
    updates = {k: v for k, v in (("device", args.device), ("precision", args.precision), ("gpu_decode", args.gpu_decode))
               if v is not None}
    config = config.model_copy(update=updates)
    if args.stage == "parts":
        from d2m_core.bench import device_parts

        print(json.dumps({"config": Path(args.yml).name} | device_parts(config, expand_shards(_bench_shards(args)), args.shards)))
        return 0
    for line in run_benchmark(config, expand_shards(_bench_shards(args)), Path(args.yml).name, args.repeats):
        print(json.dumps(line), flush=True)
    return 0


def _bench_shards(args: argparse.Namespace) -> str:
    """--shards, made with make-shards first when it holds no tar."""
    shard_dir = Path(args.shards)
    if not any(shard_dir.glob("*.tar")):
        from d2m_core.testdata.synth import make_shards

        make_shards(shard_dir, shards=args.make_shards, samples=args.make_samples)
    return str(shard_dir)


def _cmd_weights(args: argparse.Namespace) -> int:
    from d2m_core.config import load_config

    config = load_config(args.yml) if args.yml else None
    directory = args.dir or (config.weights_dir if config else None)
    if args.action == "download":
        from d2m_core.compute.download import download_missing

        return 1 if download_missing(config, directory, base_url=args.base_url) else 0
    from d2m_core.compute.weights import WeightsError, random_weights_enabled, resolve_weights, weights_dir
    from d2m_core.compute.weights_files import DEDUP_REFERENCE_FILES, MODEL_FILES, REFERENCE_MODEL, weights_inventory

    if args.action == "list":
        print(f"weights folder: {weights_dir(directory)} (weights_dir in the yml, or $D2M_WEIGHTS_DIR)")
        for row in weights_inventory(directory):
            print(f"\n{row['model']}: {row['file']} ({row['format']})\n  goes to: {row['path']}")
            if row["sha256"]:
                print(f"  sha256:  {row['sha256']}")
            elif row.get("sha256_prefix"):
                print(f"  sha256:  {row['sha256_prefix']}... (the release's prefix pin)")
            if row["source"]:
                print(f"  get it:  {row['source']}")
        return 0
    if random_weights_enabled():
        print("d2m: D2M_RANDOM_WEIGHTS is set: unset it to verify real weights", file=sys.stderr)
        return 2
    models = config.models if config else sorted(MODEL_FILES)
    checks = {m: (lambda m=m: _model_weights(m, directory)) for m in models}
    if "dedup-isc-ft-v107" in models:
        checks[REFERENCE_MODEL] = lambda: resolve_weights(REFERENCE_MODEL, DEDUP_REFERENCE_FILES, weights_dir(directory))
    if config is not None:  # the data files of the yml's filters (fastText, WordNet, centroids, ...)
        from d2m_core.subsets.filter_files import files_for, resolve_data_file

        for spec in config.filters:
            for name in files_for(spec.name, spec.image_based_scale):
                checks[f"filter {spec.asset_name}: {name}"] = (
                    lambda n=name, s=spec: resolve_data_file(n, directory, s.data_files.get(n)).as_record())
    failed = 0
    for model, check in checks.items():
        try:
            record = check().record
            print(f"ok       {model}: {record.path} sha256 {record.sha256} ({record.kind})")
        except WeightsError as err:
            failed += 1
            print(f"MISSING  {err}")
    return 1 if failed else 0


def _model_weights(model: str, directory: str | None):
    """A model's weights, verified: built-in ones without importing torch, custom ones through their plugin."""
    from d2m_core.compute.weights import weights_dir
    from d2m_core.compute.weights_files import MODEL_FILES, resolve_builtin_weights

    if model in MODEL_FILES:
        return resolve_builtin_weights(model, weights_dir(directory))
    from d2m_core.compute.models import resolve_model_weights

    return resolve_model_weights(model, directory)


def build_parser() -> argparse.ArgumentParser:
    from d2m_assets.commands import LAUNCHES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="d2m", description="DataComp metadata (dataset2metadata) as Dagster assets",
                                     epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="process the shards of a seed-format yml (the seed's workflow)",
                         description=RUN_DESCRIPTION, epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--yml", required=True, help="the config, in dataset2metadata's yml format")
    run.add_argument("--progress-every", type=float, default=None, metavar="S",
                     help="seconds between progress lines when stdout is not a terminal "
                          "(default: $D2M_PROGRESS_INTERVAL_S or 30)")
    run.set_defaults(func=_cmd_run)

    register = sub.add_parser(
        "register", parents=[common], help="register a yml's shards as partitions, without running them",
        description="Register every tar of the yml's input_tars as a partition in the Dagster instance at "
                    "$DAGSTER_HOME (which must be set), so that `dagster asset materialize --partition SHARD` "
                    "and UI backfills can select them. Nothing is computed.")
    register.add_argument("--yml", required=True, help="the config, in dataset2metadata's yml format")
    register.set_defaults(func=_cmd_register)

    filt = sub.add_parser("filter", parents=[common], help="apply a DataComp filtering baseline: a uid subset (.npy)",
                          description=FILTER_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    filt.add_argument("--yml", required=True, help="the config: its output_metadata_dir is the metadata folder")
    filt.add_argument("--name", required=True, choices=["no_filter", "basic_filter", "text_based", "image_based",
                                                         "image_based_intersect_clip_score", "clip_score", "laion2b"],
                      help="the baseline (DataComp's baselines.py --name)")
    filt.add_argument("--save_path", "--save-path", required=True, help="where to write the uid file (.npy)")
    filt.add_argument("--threshold", type=float, default=None, help="clip_score: keep samples with a score >= this")
    filt.add_argument("--fraction", type=float, default=None, help="clip_score: keep this top fraction of the pool")
    filt.add_argument("--arch", choices=["b32", "l14"], default=None, help="clip_score: which CLIP score")
    filt.add_argument("--image_based_scale", "--image-based-scale", choices=["small", "medium", "large", "xlarge"],
                      default=None, help="image_based: whose pool centroids")
    filt.add_argument("--batch_size", "--batch-size", type=int, default=1024,
                      help="image_based: samples per nearest-centroid batch")
    filt.add_argument("--num_workers", "--num-workers", type=int, default=None, help="accepted for DataComp's "
                      "command lines; d2m reads the shards with its own threads")
    filt.add_argument("--num_gpus", "--num-gpus", type=int, default=None, help="accepted; image_based uses the yml's device")
    filt.add_argument("--asset", default=None, help="the filter asset's name (default: --name; one of the yml's "
                                                     "filters shows in its asset graph)")
    filt.set_defaults(func=_cmd_filter)

    resh = sub.add_parser("reshard", parents=[common], help="write a uid subset's samples as new shards (resumable)",
                          description=RESHARD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    resh.add_argument("--yml", required=True, help="the config: its input_tars are the input, its metadata the samples")
    resh.add_argument("-s", "--subset-file", required=True, help="the uid file (.npy of u8,u8, or raw u8,u8 keys)")
    resh.add_argument("-o", "--output-dir", required=True, help="the output folder (local or s3://)")
    resh.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard (default 10000)")
    resh.add_argument("--apply-blur", action="store_true", help="blur the face boxes of the metadata (face_bboxes) "
                                                                 "and re-encode those images as WebP")
    resh.add_argument("--inject-blur-metadata", action="store_true",
                      help="add each sample's face boxes to its json as face_bboxes")
    resh.set_defaults(func=_cmd_reshard)

    make = sub.add_parser("make-shards", parents=[common], formatter_class=defaults,
                          help="write img2dataset-format test shards from bundled photos",
                          description="Write img2dataset-format webdataset tars (jpg, txt, json with uid, "
                                      "NNNNN_stats.json) made from photos bundled with scikit-image.")
    make.add_argument("out", help="folder to write the tars into (created)")
    make.add_argument("--shards", type=int, default=2, help="number of tars")
    make.add_argument("--samples", type=int, default=32, help="samples per tar")
    make.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    make.add_argument("--start", type=int, default=0, help="index of the first shard (its file name)")
    make.add_argument("--max-side", type=int, default=512, help="longest image side in pixels")
    make.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality, 1-100")
    make.add_argument("--workers", type=int, default=1,
                      help="processes rendering samples (the bytes written are the same for any number)")
    make.add_argument("--faults", action="store_true",
                      help="write the corpus of faulty shards (bad images, broken tars, ...) and faults.json instead")
    make.set_defaults(func=_cmd_make_shards)

    demo = sub.add_parser("demo", parents=[common], formatter_class=defaults,
                          help="make demo shards and materialize the basic assets for them",
                          description="Make small shards in .demo/shards, run configs/demo.yml on them "
                                      "(random weights via `make demo`) and print how to look at the outputs and the UI.")
    demo.add_argument("--shards", type=int, default=3, help="number of demo tars")
    demo.add_argument("--samples", type=int, default=24, help="samples per demo tar")
    demo.add_argument("--progress-every", type=float, default=None, metavar="S",
                      help="seconds between progress lines when stdout is not a terminal")
    demo.set_defaults(func=_cmd_demo)

    weights = sub.add_parser(
        "weights", parents=[common], help="list, download or verify the weights files each model needs",
        description="list: every file, its sha256, where it goes and where to get it. download: fetch the missing "
                    "files from their sources (resumable, sha256-verified before they are moved into place). "
                    "verify: check a folder (exit 1 if anything is missing or corrupt).")
    weights.add_argument("action", nargs="?", choices=["list", "download", "verify"], default="list")
    weights.add_argument("--dir", default=None, help="the weights folder (default: the yml's weights_dir, "
                                                     "$D2M_WEIGHTS_DIR or ~/.cache/d2m/weights)")
    weights.add_argument("--yml", default=None, help="only the models of this config (and its weights_dir)")
    weights.add_argument("--base-url", default=None,
                         help="download: fetch every file from BASE_URL/<file name> instead of its source (a mirror); "
                              "default $D2M_WEIGHTS_BASE_URL")
    weights.set_defaults(func=_cmd_weights)

    bench = sub.add_parser("bench", parents=[common], formatter_class=defaults, help="print throughput as JSON lines")
    bench.add_argument("--stage", choices=["end-to-end", "loader", "writer", "run-overhead", "parts"], default="end-to-end",
                       help="end-to-end (default): the whole pipeline; loader: reading only, images kept encoded; "
                            "writer: the output stage on synthetic model outputs (and the bytes it writes); run-overhead: "
                            "one Dagster run over the shards, launched as the daemon's launchers do, timed from "
                            "launch to model build, first batch and process exit; parts: where a batch's time goes (the "
                            "loader with a consumer that only counts, decoding, resizing, each model)")
    bench.add_argument("--samples", type=int, default=10_000, help="--stage writer: samples per shard")
    bench.add_argument("--yml", default=None, help="the config (needed except for --stage loader: its batch_size)")
    bench.add_argument("--shards", required=True, help="folder of tars (made with make-shards if empty)")
    bench.add_argument("--processes", type=int, default=2, help="--stage loader: reader processes")
    bench.add_argument("--decode", action="store_true",
                       help="--stage loader: the readers decode the images (gpu_decode: readers) and the consumer takes "
                            "their pixels (one packed copy a batch, uploaded to --device, default the CPU)")
    bench.add_argument("--device", default=None, help="override the yml's device ('cpu', 0, 'cuda:1')")
    bench.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=None, help="override the yml's precision")
    bench.add_argument("--gpu-decode", choices=["auto", "on", "off", "readers"], default=None, help="override the yml's gpu_decode")
    bench.add_argument("--make-shards", type=int, default=2, help="shards to make when the folder is empty")
    bench.add_argument("--make-samples", type=int, default=256, help="samples per shard made")
    bench.add_argument("--repeats", type=int, default=3, help="model-only passes over one batch")
    bench.add_argument("--launch", choices=LAUNCHES, default="warm",
                       help="--stage run-overhead: warm (the daemon's steady state): the run goes to a worker the launcher "
                            "started ahead; new: a new run worker process (a daemon's first run; Slurm, Kubernetes)")
    bench.set_defaults(func=_cmd_bench)
    return parser


# Errors a user can fix, each with a message naming the field, file or shard at fault: (module, class).
# A class whose module was never imported cannot have been raised, so only loaded modules are consulted.
USER_ERRORS = (
    ("d2m_core.config", "ConfigError"),
    ("d2m_core.reading.shards", "ShardListError"),
    ("d2m_core.compute.weights", "WeightsError"),
    ("d2m_core.catalog", "UnknownOutputError"),
    ("d2m_core.compute.models", "UnknownModelError"),
    ("d2m_core.compute.plugins", "PluginError"),
    ("d2m_core.outputs.storage", "StorageError"),
    ("d2m_core.compute.download", "DownloadError"),
    ("d2m_core.preflight", "PreflightError"),
    ("d2m_assets.resources", "PartitionNotInInputError"),
    ("d2m_assets.commands.registration", "InstanceError"),
    ("d2m_core.subsets.pool", "PoolError"),
    ("d2m_core.subsets.uids", "UidError"),
    ("d2m_core.subsets.reshard", "ReshardError"),
)


def user_error_message(err: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug."""
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return str(err)
    dagster_errors = sys.modules.get("dagster._core.errors")
    if dagster_errors is not None:
        from d2m_assets.commands.registration import dagster_error_message

        return dagster_error_message(err)
    return None


def _quiet_library_noise() -> None:
    """Warnings that say nothing actionable to a d2m user (kept in the run log where Dagster records them)."""
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    warnings.filterwarnings("ignore", message=".*is currently in preview.*")


class _Once(logging.Filter):
    """Each distinct message once on the terminal (a model warns at the preflight and again in each run;
    the Dagster run logs keep every occurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # Inside a Dagster run, Dagster's handler (on d2m_core) has already rewritten the record's message as
        # "job - run id - step - message"; the terminal shows and compares the message itself.
        original = (getattr(record, "dagster_meta", None) or {}).get("orig_message")
        if original is not None:
            record.msg, record.args = original, ()
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _terminal_logging() -> None:
    """Warnings and errors of any library on stderr, each once; INFO stays in the run logs."""
    if logging.getLogger().handlers:  # called inside a program that set up logging itself (a test run): leave it be
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # loggers Dagster raises to INFO (python_log_level) stay quiet here
        handler.addFilter(_Once())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _terminal_logging()
    _quiet_library_noise()
    if args.debug:  # Dagster's own event lines on the terminal too
        os.environ.setdefault("D2M_CONSOLE_LOG_LEVEL", "DEBUG")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        again = " (shards already written stay materialized: run it again to continue)" if args.command in ("run", "demo") else ""
        print(f"d2m: interrupted{again}", file=sys.stderr, flush=True)
        if argv is None:  # the d2m command itself: a model thread may still be inside torch, which aborts the
            sys.stdout.flush()  # interpreter's shutdown ("terminate called ..."); leave without waiting for it
            os._exit(130)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns errors into one line
        if args.debug:
            raise
        message = user_error_message(err)
        if message is not None:
            print(f"d2m: error: {message}", file=sys.stderr)
            return 2
        print(f"d2m: error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

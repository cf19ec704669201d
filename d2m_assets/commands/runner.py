"""`d2m run`: the seed's workflow on the Dagster graph: register shards, skip done ones, materialize in runs."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dagster import DagsterInstance, ExecuteInProcessResult, materialize

from d2m_assets.datasets import Dataset
from d2m_assets.definitions import DEFAULT_TARS_PER_RUN, build_definitions
from d2m_assets.partitions import GPU_POOL
from d2m_assets.assets.progress import RunPlan, publish, run_failure_line
from d2m_assets.commands.recovery import mark_abandoned_runs, owner_tags
from d2m_assets.yml_paths import record_base_dir
from d2m_core.compute.gpus import gpu_count
from d2m_assets.assets.reporting import latest_versions, recorded_identity
from d2m_core import D2MConfig, catalog, load_config
from d2m_core.outputs.identity import REASONS, asset_identity, weights_by_model
from d2m_core.preflight import preflight
from d2m_core.selection import selected_assets, shard_stats

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
# The run log (event storage) keeps everything; the terminal shows d2m's display, and Dagster's console
# logger only what is critical (D2M_CONSOLE_LOG_LEVEL=INFO shows Dagster's events too; `--debug` sets it).
LOG_CONFIG = {"loggers": {"console": {"config": {"log_level": os.environ.get("D2M_CONSOLE_LOG_LEVEL", "CRITICAL")}}}}
EXPLAINED = 50  # per asset, mismatching shards whose recorded identity is read to say what changed
log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    shards: list[str]
    skipped: list[str] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    failed_shards: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed_runs


def ensure_instance(echo: Callable[[str], None] = print) -> DagsterInstance:
    """The persistent instance at $DAGSTER_HOME (default ./.dagster_home, created with the repo's dagster.yaml)."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path.cwd() / ".dagster_home")
        os.environ["DAGSTER_HOME"] = home
        echo(f"DAGSTER_HOME is not set: using {home}")
    Path(home).mkdir(parents=True, exist_ok=True)
    target = Path(home) / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.is_file():
        shutil.copy(REPO_DAGSTER_YAML, target)
    if (hint := log_level_hint(target)) is not None:
        log.warning(hint)
    instance = DagsterInstance.get()
    if GPU_POOL not in instance.event_log_storage.get_concurrency_keys():  # the user's own limit stays
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, gpu_count())
    return instance


def log_level_hint(dagster_yaml: Path) -> str | None:
    """A sentence when the instance's `python_log_level` is above INFO: then `context.log.info` (d2m's progress
    lines) never reaches the run logs. Instances made from deploy/dagster.yaml before it said INFO have WARNING."""
    try:
        text = dagster_yaml.read_text()
        settings = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError):
        return None  # Dagster itself reports an unreadable dagster.yaml
    level = (settings.get("python_logs") or {}).get("python_log_level") if isinstance(settings, dict) else None
    number = logging.getLevelName(str(level).upper()) if isinstance(level, str) else level
    if not isinstance(number, int) or number <= logging.INFO:
        return None
    line = next((i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith("python_log_level:")), None)
    where = f"{dagster_yaml} line {line}" if line else str(dagster_yaml)
    return (f"{where} sets python_log_level: {level}, which keeps d2m's progress lines out of the run logs in the "
            f"Dagster UI: change it to 'python_log_level: INFO' (as deploy/dagster.yaml has it) and "
            "restart dagster dev / the daemon")


def reasons_to_run(instance: DagsterInstance, dataset: Dataset, config: D2MConfig, stems: Sequence[str],
                   assets: Sequence[str], tars: dict[str, dict], weights: dict[str, str]) -> dict[str, list[str]]:
    """Why each shard must run (state, not file names): an asset not materialized, or materialized from
    another tar, output location or weights than this run would use (its data version differs). An empty
    list: skip it. What changed is looked up for the first EXPLAINED mismatches of each asset."""
    reasons: dict[str, list[str]] = {s: [] for s in stems}
    for asset in assets:
        key = dataset.key(asset)
        recorded = latest_versions(instance, key, stems)
        explained = 0
        for stem in stems:
            if stem not in recorded:
                why = ["not materialized"]
            else:
                identity = asset_identity(config, asset, tars[stem], weights)
                if recorded[stem] == identity.version:
                    continue
                explained += 1
                parts = recorded_identity(instance, key, stem) if explained <= EXPLAINED else None
                why = ([REASONS[p] for p in identity.differences(parts)] if parts else []) or ["another data version"]
            reasons[stem] += [w for w in why if w not in reasons[stem]]
    return reasons


def _interrupted(result: ExecuteInProcessResult) -> bool:
    """Ctrl-C during a run: Dagster records it as a failure (DagsterExecutionInterruptedError) and returns."""
    errors = (getattr(e.event_specific_data, "error", None) for e in result.all_events)
    return any(error is not None and error.cls_name == "DagsterExecutionInterruptedError" for error in errors)


def _shown(stems: Sequence[str], limit: int = 10) -> str:
    return ", ".join(stems[:limit]) + (f", ... ({len(stems) - limit} more)" if len(stems) > limit else "")


def contiguous_chunks(order: Sequence[str], todo: Sequence[str], size: int) -> list[list[str]]:
    """Split `todo` into runs of at most `size` shards that are contiguous in the partition order,
    since a Dagster range run covers every partition between its ends."""
    wanted = set(todo)
    chunks: list[list[str]] = []
    current: list[str] = []
    for key in order:
        if key in wanted and len(current) < size:
            current.append(key)
            continue
        if current:
            chunks.append(current)
        current = [key] if key in wanted else []
    if current:
        chunks.append(current)
    return chunks


def run_config_file(yml: str | Path, *, echo: Callable[[str], None] = print) -> RunSummary:
    """Process every shard of the yml that Dagster has not materialized yet (all of them with reprocess)."""
    yml = Path(yml).resolve()
    config = load_config(yml)
    asset_names = selected_assets(config)
    needs_reference = catalog.REFERENCE_ASSET in asset_names
    asset_names = [a for a in asset_names if a != catalog.REFERENCE_ASSET]  # the only unpartitioned one
    checked = preflight(config)  # tars exist, weights present, output writable: before any state or compute
    stems = [ref.stem for ref in checked.shards]
    dataset = Dataset(name=config.dataset_name, config_path=str(yml))
    echo(f"dataset {dataset.name}: {len(stems)} shard(s) of {config.input_tars} -> {config.output_metadata_dir}")
    instance = ensure_instance(echo)
    record_base_dir(yml)  # the definitions below (and the daemon's) resolve relative paths as this process did
    for run_id in mark_abandoned_runs(instance):  # a killed run still holds its gpu slot: free it first
        echo(f"run {run_id} was left unfinished by a process that is gone: marked failed; its shards run again")
    instance.add_dynamic_partitions(dataset.partitions_name, stems)
    summary = RunSummary(shards=stems)
    if config.reprocess:
        todo = stems
        echo(f"recomputing {len(todo)} shard(s) (reprocess: true)")
    else:
        reasons = reasons_to_run(instance, dataset, config, stems, asset_names, checked.tars,
                                 weights_by_model(checked.weights))
        todo = [s for s in stems if reasons[s]]
        summary.skipped = [s for s in stems if not reasons[s]]
        if summary.skipped:
            echo(f"{len(summary.skipped)} shard(s) already materialized, skipped (same tar, output location and "
                 f"weights): {_shown(summary.skipped)}")
        by_reason: dict[str, list[str]] = {}
        for stem in todo:
            by_reason.setdefault(" and ".join(reasons[stem]), []).append(stem)
        for why, which in by_reason.items():
            echo(f"{len(which)} shard(s) to compute ({why}): {_shown(which)}")
    publish(RunPlan(len(todo), len(summary.skipped)))
    if not todo:
        echo("all shards already processed.")
        return summary
    defs = build_definitions(yml)
    assets = list(defs.assets or [])
    if needs_reference:  # its own run, before the shards that use it
        if config.reprocess or not instance.get_latest_materialization_event(dataset.key(catalog.REFERENCE_ASSET)):
            result = materialize(assets, instance=instance, selection=[dataset.key(catalog.REFERENCE_ASSET)], tags=owner_tags(),
                                 resources=defs.resources, run_config=LOG_CONFIG, raise_on_error=False)
            if _interrupted(result):
                raise KeyboardInterrupt
            if not result.success:
                summary.failed_runs.append(result.run_id)
                echo(f"{catalog.REFERENCE_ASSET} failed: {run_failure_line(result)}")
                return summary
    selection = [dataset.key(a) for a in asset_names]
    chunks = contiguous_chunks(instance.get_dynamic_partitions(dataset.partitions_name), todo, config.tars_per_wds or DEFAULT_TARS_PER_RUN)
    started = time.perf_counter()
    for i, chunk in enumerate(chunks, 1):
        tags = owner_tags() | ({} if len(chunk) == 1 else {RANGE_START: chunk[0], RANGE_END: chunk[-1]})
        result = materialize(assets, instance=instance, selection=selection, resources=defs.resources,
                             partition_key=chunk[0] if len(chunk) == 1 else None, tags=tags,
                             run_config=LOG_CONFIG, raise_on_error=False)
        if _interrupted(result):  # the shards written so far stay materialized; the next d2m run does the rest
            raise KeyboardInterrupt
        summary.run_ids.append(result.run_id)
        last = dataset.key(asset_names[-1])  # each shard is materialized on its own, as soon as it is written
        done = {e.materialization.partition for e in result.get_asset_materialization_events()
                if e.materialization.asset_key == last}
        summary.processed.extend(s for s in chunk if s in done)
        status = ""
        if not result.success:
            summary.failed_runs.append(result.run_id)
            bad = [s for s in chunk if s not in done]
            summary.failed_shards.extend(bad)
            status = f" (failed shards: {', '.join(bad)})" if bad else f" ({run_failure_line(result)})"
        elapsed = time.perf_counter() - started
        samples = sum(shard_stats(config, s).samples_written for s in summary.processed)
        echo(f"[run {i}/{len(chunks)}] shards done {len(summary.processed)}/{len(todo)}{status}; "
             f"{samples} samples, {samples / max(elapsed, 1e-9):.1f} samples/s overall")
    return summary


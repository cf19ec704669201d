"""`d2m run`: the seed's workflow on the Dagster graph: register shards, skip done ones, materialize in runs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetKey, DagsterInstance, materialize

from d2m_assets.definitions import DEFAULT_TARS_PER_RUN, build_definitions
from d2m_assets.partitions import GPU_POOL, SHARDS
from d2m_assets.progress import RunPlan, publish, run_failure_line
from d2m_assets.recovery import mark_abandoned_runs, owner_tags
from d2m_assets.yml_paths import record_base_dir
from d2m_core.gpus import gpu_count
from d2m_core import catalog, expand_shards, load_config
from d2m_core.pipeline import selected_assets, shard_stats, verify_weights

REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "deploy" / "dagster.yaml"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
# The run log (event storage) keeps everything; the terminal shows d2m's display, and Dagster's console
# logger only what is critical (D2M_CONSOLE_LOG_LEVEL=INFO shows Dagster's events too; `--debug` sets it).
LOG_CONFIG = {"loggers": {"console": {"config": {"log_level": os.environ.get("D2M_CONSOLE_LOG_LEVEL", "CRITICAL")}}}}


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
    instance = DagsterInstance.get()
    if GPU_POOL not in instance.event_log_storage.get_concurrency_keys():  # the user's own limit stays
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, gpu_count())
    return instance


def pending_shards(instance: DagsterInstance, stems: Sequence[str], assets: Sequence[str]) -> list[str]:
    """Shards for which any of `assets` has no materialization in the instance (state, not file names)."""
    done: set[str] | None = None
    for name in assets:
        materialized = instance.get_materialized_partitions(AssetKey(name))
        done = materialized if done is None else done & materialized
    return [s for s in stems if s not in (done or set())]


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
    verify_weights(config)  # every weights file, before any shard is touched
    stems = [ref.stem for ref in expand_shards(config.input_tars)]
    instance = ensure_instance(echo)
    record_base_dir(yml)  # the definitions below (and the daemon's) resolve relative paths as this process did
    for run_id in mark_abandoned_runs(instance):  # a killed run still holds its gpu slot: free it first
        echo(f"run {run_id} was left unfinished by a process that is gone: marked failed; its shards run again")
    instance.add_dynamic_partitions(SHARDS, stems)
    summary = RunSummary(shards=stems)
    todo = stems if config.reprocess else pending_shards(instance, stems, asset_names)
    summary.skipped = [s for s in stems if s not in todo]
    publish(RunPlan(len(todo), len(summary.skipped)))
    if summary.skipped:
        echo(f"{len(summary.skipped)} shard(s) already materialized, skipped (reprocess: false)")
    if not todo:
        echo("all shards already processed.")
        return summary
    defs = build_definitions(yml)
    assets = list(defs.assets or [])
    if needs_reference:  # its own run, before the shards that use it
        if config.reprocess or not instance.get_latest_materialization_event(AssetKey(catalog.REFERENCE_ASSET)):
            result = materialize(assets, instance=instance, selection=[AssetKey(catalog.REFERENCE_ASSET)], tags=owner_tags(),
                                 resources=defs.resources, run_config=LOG_CONFIG, raise_on_error=False)
            if not result.success:
                summary.failed_runs.append(result.run_id)
                echo(f"{catalog.REFERENCE_ASSET} failed: {run_failure_line(result)}")
                return summary
    selection = [AssetKey(a) for a in asset_names]
    chunks = contiguous_chunks(instance.get_dynamic_partitions(SHARDS), todo, config.tars_per_wds or DEFAULT_TARS_PER_RUN)
    started = time.perf_counter()
    for i, chunk in enumerate(chunks, 1):
        tags = owner_tags() | ({} if len(chunk) == 1 else {RANGE_START: chunk[0], RANGE_END: chunk[-1]})
        result = materialize(assets, instance=instance, selection=selection, resources=defs.resources,
                             partition_key=chunk[0] if len(chunk) == 1 else None, tags=tags,
                             run_config=LOG_CONFIG, raise_on_error=False)
        summary.run_ids.append(result.run_id)
        last = AssetKey(asset_names[-1])  # each shard is materialized on its own, as soon as it is written
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


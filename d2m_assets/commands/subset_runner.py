"""`d2m filter` and `d2m reshard`: DataComp's baselines.py and resharder.py on a yml's dataset.

`d2m filter` materializes the dataset's filter asset (in the instance at $DAGSTER_HOME, so the UI shows the run,
its counts and histogram) with the baseline the flags describe, and writes the uid file to --save_path.
`d2m reshard` materializes the dataset's `reshard_plan` and `resharded_shards` assets (the UI shows the runs and
one partition per output shard) for the flags' subset and folder; an output shard is skipped only when its files
are there and the instance recorded it for this plan and folder (a shard written by a killed process but never
recorded is written again). Both first mark failed the runs a killed `d2m` process left unfinished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import DagsterEventType, DagsterInstance, materialize

from d2m_assets.assets.subsets import (RESHARD_PER_RUN, RESHARDED, build_filter_asset, build_reshard_assets,
                                       recorded_plan, reshard_partitions)
from d2m_assets.datasets import Dataset
from d2m_assets.assets.progress import run_failure_line
from d2m_assets.commands.runner import LOG_CONFIG, RANGE_END, RANGE_START, contiguous_chunks, ensure_instance
from d2m_assets.commands.recovery import mark_abandoned_runs, owner_tags
from d2m_assets.assets.reporting import DATA_VERSION_TAG
from d2m_core.config import D2MConfig, FilterSpec, ReshardSpec

if TYPE_CHECKING:
    from d2m_core.subsets.reshard import ReshardPlan


@dataclass
class FilterRun:
    ok: bool
    run_id: str
    asset: str
    metadata: dict


def filter_config_file(yml: str | Path, spec: FilterSpec, *, echo: Callable[[str], None] = print) -> FilterRun:
    """Materialize the yml's dataset's filter asset `spec.asset_name` with this baseline; returns its metadata."""
    instance = ensure_instance(echo)  # first: it sets a default DAGSTER_HOME, where the yml's folder is recorded
    _mark_abandoned(instance, echo)
    dataset = Dataset.from_yml(yml)
    config = dataset.load()
    known = next((f for f in config.filters if f.asset_name == spec.asset_name), None)
    if known is not None and not spec.data_files:
        spec = spec.model_copy(update={"data_files": known.data_files})
    asset = build_filter_asset(dataset, spec, config.filter_cron)
    key = dataset.key(spec.asset_name)
    echo(f"dataset {dataset.name}: {spec.name} over {config.output_metadata_dir} -> asset {key.to_user_string()}")
    result = materialize([asset], instance=instance, tags=owner_tags(), run_config=LOG_CONFIG, raise_on_error=False)
    events = [e for e in result.get_asset_materialization_events() if e.materialization.asset_key == key]
    metadata = {k: v.value for k, v in events[-1].materialization.metadata.items()} if events else {}
    return FilterRun(result.success, result.run_id, key.to_user_string(), metadata)


def _mark_abandoned(instance: DagsterInstance, echo: Callable[[str], None]) -> None:
    for run_id in mark_abandoned_runs(instance):
        echo(f"run {run_id} was left unfinished by a process that is gone: marked failed")


@dataclass
class ReshardRun:
    plan: ReshardPlan
    output_dir: str
    written: list[str]  # output shards written now
    skipped: list[str]  # already written for this plan (files there, recorded with the plan's data version)
    failed: dict[str, str]  # output shard -> why
    run_ids: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed


def _upstream_filter(instance: DagsterInstance, dataset: Dataset, config: D2MConfig, subset_file: str) -> str:
    """The filter asset whose uid file or save_path is `subset_file`, for the lineage: one of the yml's filters,
    or one `d2m filter` recorded with that --save_path (its latest materialization); "" if none."""
    from d2m_core.subsets.filters import uid_file_url

    def local(url: str | None) -> Path | None:
        return Path(url).expanduser().resolve() if url and "://" not in url else None

    target = local(subset_file)
    for spec in config.filters:
        if target in (local(uid_file_url(config, spec.asset_name)), local(spec.save_path)):
            return spec.asset_name
    prefix = dataset.key(RESHARDED).path[:-1]
    for key in instance.get_asset_keys(prefix=prefix):
        event = instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
        if "baseline" in meta and target in {local(str(meta[k].value)) for k in ("uid_file", "save_path") if k in meta}:
            return key.path[-1]
    return ""


def _recorded_for(instance: DagsterInstance, dataset: Dataset, names: list[str], version: str) -> set[str]:
    """The output shards whose latest record carries the plan's data version."""
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        dataset.key(RESHARDED), DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG], asset_partitions=names)
    return {n for n, t in tags.items() if t.get(DATA_VERSION_TAG) == version}


def reshard_config_file(yml: str | Path, subset_file: str, output_dir: str, *, shard_size: int = 10_000,
                        apply_blur: bool = False, inject_blur_metadata: bool = False,
                        echo: Callable[[str], None] = print) -> ReshardRun:
    """Materialize the yml's dataset's reshard assets for this subset and folder: the plan, then the output
    shards not yet written, a few per run (each shard is a partition, materialized as soon as it is written)."""
    from d2m_core.subsets import uids
    from d2m_core.subsets.reshard import ReshardError, check_folder, read_plan, shard_done

    instance = ensure_instance(echo)
    _mark_abandoned(instance, echo)
    dataset = Dataset.from_yml(yml)
    config = dataset.load()
    given = output_dir  # shown as the user typed it
    if "://" not in output_dir:  # the plan records it: the UI's backfills resume it from any working directory
        output_dir = str(Path(output_dir).expanduser().resolve())
    subset = uids.load_uid_file(subset_file)  # a bad uid file, another plan, no face boxes: stop before any run
    if apply_blur or inject_blur_metadata:  # blurring needs the face boxes: say so before any run
        from d2m_core.subsets import pool

        shards = pool.list_pool(config.output_metadata_dir)
        if shards:
            pool.resolve_columns(shards[0], ["face_bboxes"])
    check_folder(output_dir, subset, shard_size=shard_size, apply_blur=apply_blur,
                 inject_blur_metadata=inject_blur_metadata)
    spec = ReshardSpec(subset=_upstream_filter(instance, dataset, config, subset_file), output_dir=output_dir,
                       shard_size=shard_size, apply_blur=apply_blur, inject_blur_metadata=inject_blur_metadata)

    def shown(shard) -> None:
        if shard.error is None:
            samples = f"{shard.samples} sample" + ("" if shard.samples == 1 else "s")
            echo(f"wrote {given.rstrip('/')}/{shard.tar.rsplit('/', 1)[-1]}: {samples}" + (f" ({shard.blurred} blurred)" if shard.blurred else ""))
        else:
            echo(f"output shard {shard.name} failed: {shard.error}")

    plan_asset, shards_asset = build_reshard_assets(dataset, spec, subset_url=subset_file, replace=False, progress=shown)
    echo(f"dataset {dataset.name}: reshard of {subset_file} -> {given} as assets "
         f"{plan_asset.key.to_user_string()}, {dataset.key('resharded_shards').to_user_string()}")
    result = materialize([plan_asset], instance=instance, tags=owner_tags(), run_config=LOG_CONFIG, raise_on_error=False)
    if not result.success:
        raise ReshardError(f"the reshard plan failed (run {result.run_id}): {run_failure_line(result)}")
    plan = read_plan(output_dir)
    names = plan.shard_names()
    _, version = recorded_plan(instance, plan_asset.key)
    recorded = _recorded_for(instance, dataset, names, version)
    skipped = [n for i, n in enumerate(names) if n in recorded and shard_done(output_dir, i)]
    todo = [n for n in names if n not in set(skipped)]
    run = ReshardRun(plan, output_dir, [], skipped, {}, [result.run_id])
    order = instance.get_dynamic_partitions(reshard_partitions(dataset).name)
    for chunk in contiguous_chunks(order, todo, RESHARD_PER_RUN):
        tags = owner_tags() | ({} if len(chunk) == 1 else {RANGE_START: chunk[0], RANGE_END: chunk[-1]})
        result = materialize([plan_asset, shards_asset], instance=instance, selection=[shards_asset.key],
                             partition_key=chunk[0] if len(chunk) == 1 else None, tags=tags, run_config=LOG_CONFIG,
                             raise_on_error=False)
        run.run_ids.append(result.run_id)
        done = {e.materialization.partition for e in result.get_asset_materialization_events()}
        run.written += [n for n in chunk if n in done]
        if not result.success:
            why = run_failure_line(result)
            run.failed |= {n: why for n in chunk if n not in done}
    return run

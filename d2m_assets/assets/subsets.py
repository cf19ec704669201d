"""DataComp's next step as assets of a dataset: filters (uid subsets), the reshard plan, resharded shards.

    shard_metadata (all shards) ─► <filter> (one per `filters` entry: DataComp's uid file)
                                      └─► reshard_plan ─► resharded_shards (one partition per output shard)

Filters are unpartitioned (they read every shard's metadata) and re-run on the `filter_cron` cadence once new
shards have been materialized, not once per shard. Resharding runs when asked (UI, or `d2m reshard`): it
copies the whole subset, so a UI backfill of its missing partitions resumes a stopped one.

The partitions of `resharded_shards` are the output shards of the latest `reshard_plan` materialization,
wherever it was made (the yml's `reshard` section, or `d2m reshard`'s flags): the output shards are written
to the folder that plan records, and each records the plan's data version (`plan_version`: the plan and its
folder). A plan that differs from the one recorded before wipes the records of `resharded_shards` (the whole
asset: they were an older plan's), so the UI never shows an older plan's shards as materialized for a new one.
"""

from collections.abc import Callable
from typing import Any

from dagster import (AssetExecutionContext, AssetKey, AssetMaterialization, AssetsDefinition, AssetSpec,
                     BackfillPolicy, DagsterInstance, DataVersion, DynamicPartitionsDefinition, Failure,
                     MaterializeResult, MetadataValue, TableColumn, TableRecord, TableSchema, asset, multi_asset)

from d2m_assets.daemon.automation import filter_condition
from d2m_assets.datasets import Dataset
from d2m_assets.assets.reporting import DATA_VERSION_TAG
from d2m_core import catalog
from d2m_core.config import D2MConfig, FilterSpec, ReshardSpec

RESHARD_PLAN = "reshard_plan"
RESHARDED = "resharded_shards"
RESHARD_PER_RUN = 4  # output shards per run of a resharding backfill


def reshard_partitions(dataset: Dataset) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=dataset.named("reshard"))


def recorded_plan(instance: DagsterInstance, plan_key: AssetKey) -> tuple[str, str] | None:
    """The output folder and data version of the latest `reshard_plan` materialization (None if never)."""
    event = instance.get_latest_materialization_event(plan_key)
    if event is None or event.asset_materialization is None:
        return None
    materialization = event.asset_materialization
    folder = materialization.metadata.get("output_dir")
    version = (materialization.tags or {}).get(DATA_VERSION_TAG)
    return (str(folder.value), version) if folder is not None and version else None


def filter_metadata(result, paths: list[str]) -> dict:
    meta = {"pool_size": result.pool_size, "kept": result.kept, "fraction_kept": round(result.fraction, 6),
            "shards": result.shards, "uid_file": MetadataValue.path(paths[0]), "baseline": result.spec.name,
            "parameters": MetadataValue.json(result.spec.model_dump(exclude={"data_files", "save_path", "asset"})),
            "seconds": round(result.seconds, 3), "dagster/row_count": result.kept}
    if len(paths) > 1:
        meta["save_path"] = MetadataValue.path(paths[1])
    if result.threshold is not None:
        meta["threshold"] = float(result.threshold)
        meta["score_column"] = result.score_column
    rows = result.histogram_rows()
    if rows:
        meta["score_histogram"] = MetadataValue.table(
            [TableRecord({"from": round(lo, 4), "to": round(hi, 4), "samples": n}) for lo, hi, n in rows],
            schema=TableSchema([TableColumn("from", "float"), TableColumn("to", "float"), TableColumn("samples", "int")]))
        meta["score_histogram_chart"] = MetadataValue.md(_histogram_md(rows, result.threshold))
    if result.files:
        meta["data_files"] = MetadataValue.json([f.as_dict() for f in result.files])
    return meta


def _histogram_md(rows: list[tuple[float, float, int]], threshold: float | None) -> str:
    top = max(n for _, _, n in rows) or 1
    lines = ["| score | samples | |", "| --- | ---: | --- |"]
    for lo, hi, n in rows:
        mark = " ◀ threshold" if threshold is not None and lo <= threshold < hi else ""
        lines.append(f"| {lo:.2f} to {hi:.2f} | {n} | {'█' * max(1 if n else 0, round(30 * n / top))}{mark} |")
    return "\n".join(lines)


def build_filter_asset(dataset: Dataset, spec: FilterSpec, cron: str) -> AssetsDefinition:
    @asset(key=dataset.key(spec.asset_name), deps=[dataset.key(catalog.METADATA_ASSET)], group_name=dataset.group,
           kinds={"numpy"}, automation_condition=filter_condition(cron),
           description=f"DataComp's `{spec.name}` baseline over every shard's metadata: its uid file (.npy, u8,u8, sorted)")
    def _filter(context: AssetExecutionContext) -> MaterializeResult:
        from d2m_core.subsets.filters import filter_pool

        result, paths = filter_pool(dataset.load(), spec, progress=context.log.info)
        context.log.info(f"{spec.asset_name}: kept {result.kept} of {result.pool_size} samples -> {paths[0]}")
        return MaterializeResult(metadata=filter_metadata(result, paths))

    return _filter


def build_reshard_assets(dataset: Dataset, spec: ReshardSpec, *, subset_url: str | None = None, replace: bool = True,
                         progress: Callable[[Any], None] | None = None) -> list[AssetsDefinition]:
    """`reshard_plan` and `resharded_shards` for the reshard `spec`: the yml's `reshard` section (its subset is
    the uid file of the filter asset it names; an older plan in the folder is replaced), or `d2m reshard`'s
    flags (`subset_url` given; a folder holding another plan is refused; `progress` gets each shard's `OutputShard`)."""
    partitions = reshard_partitions(dataset)
    plan_key, shards_key = dataset.key(RESHARD_PLAN), dataset.key(RESHARDED)
    deps = [dataset.key(spec.subset)] if spec.subset else []

    @asset(key=plan_key, deps=deps, group_name=dataset.group, kinds={"webdataset"},
           description="Which kept samples go to which output shard (reshard_plan.json), and the output partitions")
    def reshard_plan(context: AssetExecutionContext) -> MaterializeResult:
        from d2m_core.subsets.filters import uid_file_url
        from d2m_core.subsets.reshard import plan_for, plan_version

        config = dataset.load()
        url = subset_url or uid_file_url(config, spec.subset)
        plan, removed = plan_for(config, spec, url, replace=replace)
        version = plan_version(plan, spec.output_dir)
        names = plan.shard_names()
        instance = context.instance
        if (recorded_plan(instance, plan_key) or ("", ""))[1] != version:  # another plan: its shards are not these
            written = instance.get_materialized_partitions(shards_key)
            if written:  # the whole asset: SQLite instances cannot wipe single partitions
                instance.wipe_assets([shards_key])
                context.log.info(f"the plan changed: records of {len(written)} output shard(s) of the older one wiped")
        instance.add_dynamic_partitions(partitions.name, names)
        for stale in set(instance.get_dynamic_partitions(partitions.name)) - set(names):
            instance.delete_dynamic_partition(partitions.name, stale)
        return MaterializeResult(data_version=DataVersion(version), metadata={"output_shards": plan.num_shards, "samples": plan.total,
                                           "subset_size": plan.subset_size, "not_found": plan.not_found,
                                           "pool_size": plan.pool_size, "input_shards": len(plan.inputs),
                                           "removed_stale_files": len(removed), "subset_file": MetadataValue.path(url),
                                           "output_dir": MetadataValue.path(spec.output_dir),
                                           "shard_size": spec.shard_size, "apply_blur": spec.apply_blur,
                                           "inject_blur_metadata": spec.inject_blur_metadata})

    @multi_asset(name=dataset.named(RESHARDED), partitions_def=partitions, group_name=dataset.group,
                 specs=[AssetSpec(shards_key, deps=[plan_key], partitions_def=partitions, skippable=True,
                                  group_name=dataset.group, kinds={"webdataset"},
                                  description="The subset's samples as new webdataset shards ({i:08d}.tar + _stats.json), "
                                              "faces blurred")],
                 backfill_policy=BackfillPolicy.multi_run(RESHARD_PER_RUN))
    def resharded_shards(context: AssetExecutionContext):
        from d2m_core.subsets.reshard import plan_version, read_plan, write_shards

        recorded = recorded_plan(context.instance, plan_key)
        if recorded is None:
            raise Failure(description=f"no reshard plan recorded: materialize {plan_key.to_user_string()} first")
        output_dir, version = recorded
        try:
            current = plan_version(read_plan(output_dir), output_dir)
        except FileNotFoundError:
            current = None
        if current != version:
            raise Failure(description=f"{output_dir} no longer holds the plan {plan_key.to_user_string()} recorded "
                                      "(removed, or replaced by another): materialize it again")
        failed = {}
        for outcome in write_shards(output_dir, context.partition_keys):
            if outcome.error is not None:
                context.log.error(f"output shard {outcome.name} failed: {outcome.error}")
                failed[outcome.name] = outcome.error
            else:
                context.log_event(AssetMaterialization(shards_key, partition=outcome.name, metadata={
                    "dagster/partition_row_count": outcome.samples, "blurred": outcome.blurred,
                    "sources": MetadataValue.json(outcome.sources), "tar": MetadataValue.path(outcome.tar),
                    "seconds": round(outcome.seconds, 3)}, tags={DATA_VERSION_TAG: version}))
            if progress:
                progress(outcome)
        if failed:
            raise Failure(description=f"{len(failed)} output shard(s) failed: {', '.join(failed)}",
                          metadata={"failed": MetadataValue.json(failed)})
        return
        yield  # a generator: materializations are logged per partition above

    return [reshard_plan, resharded_shards]


def build_subset_assets(dataset: Dataset, config: D2MConfig) -> list[AssetsDefinition]:
    """The dataset's filter assets (one per `filters` entry) and, with a `reshard` section, its reshard assets."""
    assets = [build_filter_asset(dataset, spec, config.filter_cron) for spec in config.filters]
    if config.reshard is not None:
        assets += build_reshard_assets(dataset, config.reshard)
    return assets

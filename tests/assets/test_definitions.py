from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from conftest import dataset_of
from d2m_assets import build_definitions
from d2m_assets.commands.runner import contiguous_chunks

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def defs_and_config(shard_dir: Path, write_config):
    path = write_config(shard_dir, tars_per_wds=2)
    return build_definitions(path), path


def _parents(defs, dataset, name: str) -> set[str]:
    """An asset's parents, by catalog name (all within the dataset)."""
    keys = defs.resolve_asset_graph().get(dataset.key(name)).parent_keys
    assert all(k.path[0] == dataset.name for k in keys)
    return {k.path[-1] for k in keys}


def test_lineage(defs_and_config) -> None:
    defs, path = defs_and_config
    ds = dataset_of(path)
    graph = defs.resolve_asset_graph()
    assert _parents(defs, ds, "clip_b32_features") == {"raw_shards"}
    assert _parents(defs, ds, "clip_b32_scores") == {"clip_b32_features"}
    assert _parents(defs, ds, "shard_metadata") == {"clip_b32_features", "clip_b32_scores"}
    assert graph.get(ds.key("clip_b32_features")).partitions_def.name == f"{ds.name}__shards"
    assert graph.get(ds.key("clip_b32_scores")).backfill_policy.max_partitions_per_run == 2


def test_basic_definitions_hold_exactly_the_b32_assets(defs_and_config) -> None:
    defs, path = defs_and_config
    ds = dataset_of(path)
    assert ds.name.startswith("metadata_")  # no `dataset` field: named from output_metadata_dir
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {f"{ds.name}/{a}" for a in ("raw_shards", "clip_b32_features", "clip_b32_scores", "shard_metadata")}
    assert {s.name for s in defs.sensors} == {f"{ds.name}__new_shards_sensor", f"{ds.name}__shard_automation"}
    automation = defs.get_sensor_def(f"{ds.name}__shard_automation")
    targets = automation.asset_selection.resolve(defs.resolve_asset_graph())
    assert {k.path[-1] for k in targets} == {"clip_b32_features", "clip_b32_scores", "shard_metadata"}


def test_two_datasets_in_one_code_location(shard_dir: Path, write_config, tmp_path: Path) -> None:
    first = write_config(shard_dir, dataset="pool_a")
    second = tmp_path / "second.yml"
    second.write_text(first.read_text().replace("pool_a", "pool_b").replace("/metadata", "/metadata_b"))
    defs = build_definitions([first, second])
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"pool_a/clip_b32_scores", "pool_b/clip_b32_scores"} <= keys
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(["pool_b", "shard_metadata"])).partitions_def.name == "pool_b__shards"
    from d2m_core.config import ConfigError

    third = tmp_path / "third.yml"
    third.write_text(first.read_text().replace("/metadata", "/elsewhere"))
    with pytest.raises(ConfigError, match="both name dataset 'pool_a'"):
        build_definitions([first, third])


def _meta(instance: DagsterInstance, key: AssetKey, partition: str) -> dict:
    records = instance.fetch_materializations(key, limit=100).records
    (event,) = [r.asset_materialization for r in records if r.asset_materialization.partition == partition][:1]
    return {k: v.value for k, v in event.metadata.items()}


def test_materialize_single_shard_and_a_range(defs_and_config, tmp_path: Path) -> None:
    defs, path = defs_and_config
    ds = dataset_of(path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["00000", "00001"])
    assets = list(defs.assets)
    selection = [ds.key(a) for a in ("clip_b32_features", "clip_b32_scores", "shard_metadata")]
    result = materialize(assets, instance=instance, resources=defs.resources, selection=selection, partition_key="00000")
    assert result.success
    meta = _meta(instance, ds.key("clip_b32_features"), "00000")
    assert meta["dagster/partition_row_count"] == 8 and meta["samples_failed"] == 1 and meta["samples_read"] == 9
    assert meta["weights"] == "random"
    assert Path(meta["path"]).name == "00000.npz"
    assert (tmp_path / "metadata" / "00000.parquet").is_file()

    ranged = materialize(assets, instance=instance, resources=defs.resources, selection=selection,
                         tags={"dagster/asset_partition_range_start": "00000", "dagster/asset_partition_range_end": "00001"})
    assert ranged.success
    assert _meta(instance, ds.key("shard_metadata"), "00001")["dagster/partition_row_count"] == 9
    assert _meta(instance, ds.key("shard_metadata"), "00000")["dagster/partition_row_count"] == 8
    assert instance.get_materialized_partitions(ds.key("clip_b32_scores")) == {"00000", "00001"}


def test_subset_runs_only_what_is_selected(defs_and_config, tmp_path: Path) -> None:
    defs, path = defs_and_config
    ds = dataset_of(path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["00001"])
    result = materialize(list(defs.assets), instance=instance, resources=defs.resources,
                         selection=[ds.key("clip_b32_features")], partition_key="00001")
    assert result.success
    assert instance.get_materialized_partitions(ds.key("clip_b32_features")) == {"00001"}
    assert not instance.get_materialized_partitions(ds.key("clip_b32_scores"))
    assert not (tmp_path / "metadata" / "00001.parquet").exists()


def test_partition_missing_from_input_fails_naming_it(defs_and_config) -> None:
    defs, path = defs_and_config
    ds = dataset_of(path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["99999"])
    result = materialize(list(defs.assets), instance=instance, resources=defs.resources,
                         selection=[ds.key("clip_b32_features")], partition_key="99999", raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    assert error.cause.cls_name == "PartitionNotInInputError" and "99999" in error.cause.message


def test_chunks_are_contiguous_in_partition_order() -> None:
    order = ["a", "b", "c", "d", "e", "f"]
    assert contiguous_chunks(order, ["a", "b", "c", "e", "f"], 2) == [["a", "b"], ["c"], ["e", "f"]]
    assert contiguous_chunks(order, ["f", "a"], 8) == [["a"], ["f"]]


def test_datacomp_lineage(shard_dir: Path, write_config) -> None:
    defs = build_definitions(REPO_CONFIGS / "datacomp.yml")
    ds = dataset_of(REPO_CONFIGS / "datacomp.yml")
    graph = defs.resolve_asset_graph()
    parents = lambda name: _parents(defs, ds, name)  # noqa: E731
    assert parents("clip_l14_scores") == {"clip_l14_features"}
    assert parents("nsfw_image_scores") == {"clip_l14_features"}
    assert parents("dedup_scores") == {"isc_features", "dedup_reference"}
    for name in ("clip_l14_features", "isc_features", "detoxify_scores", "face_boxes"):
        assert parents(name) == {"raw_shards"}
    assert graph.get(ds.key("dedup_reference")).partitions_def is None
    assert parents("shard_metadata") >= {"clip_b32_scores", "nsfw_image_scores", "dedup_scores", "face_boxes", "detoxify_scores"}


def _check_records(instance: DagsterInstance, ds) -> dict:
    from dagster import AssetCheckKey

    found = {}
    for name in ("row_count", "uids", "features", "scores_in_range", "failure_rate"):
        key = AssetCheckKey(ds.key("shard_metadata"), name)
        records = instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
        found[name] = [(r.event.asset_check_evaluation.partition, r.event.asset_check_evaluation.passed)
                       for r in records if r.event and r.event.asset_check_evaluation]
    return found


def test_checks_per_shard_and_a_failing_check_fails_the_run(shard_dir: Path, write_config) -> None:
    path = write_config(shard_dir, max_failure_rate=0.05)
    defs, ds = build_definitions(path), dataset_of(path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["00000", "00001"])
    selection = [ds.key(a) for a in ("clip_b32_features", "clip_b32_scores", "shard_metadata")]
    ok = materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=selection, partition_key="00001")
    assert ok.success
    assert {name: runs[0] for name, runs in _check_records(instance, ds).items()} == {
        n: ("00001", True) for n in ("row_count", "uids", "features", "scores_in_range", "failure_rate")}
    meta = _meta(instance, ds.key("shard_metadata"), "00001")
    assert -1 <= meta["oai-clip-vit-b32-score/p50"] <= 1 and "oai-clip-vit-b32-score/p95" in meta

    ranged = materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=selection,
                         tags={"dagster/asset_partition_range_start": "00000", "dagster/asset_partition_range_end": "00001"},
                         raise_on_error=False)
    assert not ranged.success  # 1 of 9 samples of 00000 failed: above the 5% threshold
    history = _check_records(instance, ds)["failure_rate"]
    assert ("00000", False) in history and ("00001", True) in history[:3]
    assert instance.get_materialized_partitions(ds.key("shard_metadata")) == {"00000", "00001"}


def test_a_bad_shard_does_not_fail_the_others_of_its_run(shard_dir: Path, write_config, tmp_path: Path) -> None:
    broken = tmp_path / "tars"
    broken.mkdir()
    (broken / "00002.tar").write_bytes(b"not a tar" * 100)
    tars = [str(shard_dir / "00000.tar"), str(broken / "00002.tar"), str(shard_dir / "00001.tar")]
    path = write_config(shard_dir, input_tars=tars)
    defs, ds = build_definitions(path), dataset_of(path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ds.partitions_name, ["00000", "00002", "00001"])
    selection = [ds.key(a) for a in ("clip_b32_features", "clip_b32_scores", "shard_metadata")]
    result = materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=selection, raise_on_error=False,
                         tags={"dagster/asset_partition_range_start": "00000", "dagster/asset_partition_range_end": "00001"})
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data
    assert "1 of 3 shard(s) failed: 00002" in failure.user_failure_data.description
    for asset in ("clip_b32_features", "shard_metadata"):
        assert instance.get_materialized_partitions(ds.key(asset)) == {"00000", "00001"}
    assert (tmp_path / "metadata" / "00001.parquet").is_file() and not (tmp_path / "metadata" / "00002.parquet").exists()

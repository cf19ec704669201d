"""S3 end to end on a real S3 API server (moto, loopback): the sensor finds tars, assets write to the bucket."""

from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
from dagster import DagsterInstance, build_sensor_context, materialize

from conftest import dataset_of
from d2m_assets import build_definitions


def test_sensor_finds_tars_on_s3_and_outputs_land_in_the_bucket(s3_server, shard_dir: Path, write_config) -> None:
    for name in ("00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"):
        s3_server.upload_file(str(shard_dir / name), "pool", f"tars/{name}")
    s3_server.upload_file(str(shard_dir / "00001.tar"), "pool", "tars/00002.tar")  # no stats yet: incomplete
    config = write_config(shard_dir, input_tars="s3://pool/tars", output_metadata_dir="s3://pool/metadata")
    defs, ds = build_definitions(config), dataset_of(config)
    instance = DagsterInstance.ephemeral()
    sensor = defs.get_sensor_def(f"{ds.name}__new_shards_sensor")
    result = sensor(build_sensor_context(instance=instance, resources=defs.resources, definitions=defs))
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001"]  # stored by the sensor itself
    raw = instance.fetch_materializations(ds.key("raw_shards"), limit=10, ascending=True).records
    assert [r.asset_materialization.metadata["url"].value for r in raw] == ["s3://pool/tars/00000.tar",
                                                                           "s3://pool/tars/00001.tar"]
    assert all(r.asset_materialization.metadata["tar"].value["etag"] for r in raw)  # the listing's ETag
    selection = [ds.key(a) for a in ("clip_b32_features", "clip_b32_scores", "shard_metadata")]
    ranged = materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=selection,
                         tags={"dagster/asset_partition_range_start": "00000", "dagster/asset_partition_range_end": "00001"})
    assert ranged.success

    fs, url = fsspec.core.url_to_fs("s3://pool/metadata")
    parquets = [x for x in fs.ls(url) if ".parquet" in x]  # as DataComp's apply_filter.py
    assert sorted(Path(p).name for p in parquets) == ["00000.parquet", "00001.parquet"]
    for path in parquets:
        df = pd.read_parquet(path, filesystem=fs)
        features = np.load(fs.open(path.split(".parquet")[0] + ".npz"))["oai-clip-vit-b32-image"]
        assert len(df) == len(features) > 0 and df["uid"].str.len().eq(32).all()
    assert not [k for k in fs.find("pool") if k.endswith(".tmp")]

    s3_server.upload_file(str(shard_dir / "00001_stats.json"), "pool", "tars/00002_stats.json")
    sensor(build_sensor_context(instance=instance, cursor=result.cursor, resources=defs.resources, definitions=defs))
    assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001", "00002"]

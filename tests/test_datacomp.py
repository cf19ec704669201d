"""The seed's datacomp.yml (all six models) through `d2m run`, read back exactly as DataComp's tools read it."""

import json
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, run_cli, tar_samples
from d2m_core.testdata.synth import make_shards


@pytest.fixture(scope="module")
def datacomp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard of 3 samples, batch 2 (so the last batch holds one sample), random weights."""
    root = tmp_path_factory.mktemp("datacomp")
    make_shards(root / "shards", shards=1, samples=3, max_side=256, start=7)
    config = yaml.safe_load((REPO / "configs" / "datacomp.yml").read_text())
    config |= {"input_tars": str(root / "shards" / "*.tar"), "output_metadata_dir": str(root / "metadata"),
               "batch_size": 2, "device": "cpu"}
    (root / "datacomp.yml").write_text(yaml.safe_dump(config))
    result = run_cli(["d2m", "run", "--yml", str(root / "datacomp.yml")], {"DAGSTER_HOME": str(root / "home")}, root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return root


def test_datacomp_readers_read_it_unchanged(datacomp_run: Path) -> None:
    fs, url = fsspec.core.url_to_fs(str(datacomp_run / "metadata"))
    parquets = [x for x in fs.ls(url) if ".parquet" in x]  # as baselines/apply_filter.py
    assert len(parquets) == 1
    root = parquets[0].split(".parquet")[0]
    df = pd.read_parquet(parquets[0], columns=["uid", "text", "clip_l14_similarity_score"], filesystem=fs)
    l14 = np.load(fs.open(root + ".npz"))["l14_img"]
    assert l14.shape == (len(df), 768) and l14.dtype == np.float32
    keys = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in df["uid"]], np.dtype("u8,u8"))
    assert len(np.unique(keys)) == 3
    samples = tar_samples(datacomp_run / "shards" / "00007.tar")
    assert df["uid"].tolist() == [s["json"]["uid"] for s in samples]
    assert df["text"].tolist() == [s["json"]["caption"] for s in samples]
    for column in ("clip_b32_similarity_score", "clip_l14_similarity_score", "face_bboxes", "dedup"):
        assert column in pd.read_parquet(parquets[0], filesystem=fs).columns


def test_every_output_has_its_shape_range_and_type(datacomp_run: Path) -> None:
    out = datacomp_run / "metadata"
    table = pq.read_table(out / "00007.parquet")
    assert table.column_names == ["clip_b32_similarity_score", "clip_l14_similarity_score", "nsfw-detoxify-score",
                                  "nsfw-image-score", "face_bboxes", "dedup", "uid", "url", "text",
                                  "original_width", "original_height", "sha256"]
    for name in ("clip_b32_similarity_score", "clip_l14_similarity_score", "nsfw-detoxify-score", "nsfw-image-score", "dedup"):
        assert table.schema.field(name).type == pa.float32()
    assert table.schema.field("face_bboxes").type == pa.list_(pa.list_(pa.float64()))
    df = table.to_pandas()
    assert df["nsfw-detoxify-score"].between(0, 1).all() and df["nsfw-image-score"].between(0, 1).all()
    assert df["dedup"].between(-1, 1).all()
    for boxes in df["face_bboxes"]:
        assert all(len(b) == 4 and all(0 <= v <= 1 for v in b) for b in boxes)
    npz = np.load(out / "00007.npz")
    shapes = {k: npz[k].shape for k in npz.files}
    assert shapes == {"b32_img": (3, 512), "b32_txt": (3, 512), "l14_img": (3, 768), "l14_txt": (3, 768),
                      "dedup-isc-ft-v107-image": (3, 256)}
    for key in npz.files:
        assert np.allclose(np.linalg.norm(npz[key], axis=1), 1, atol=1e-4)
    assert np.allclose(df["clip_l14_similarity_score"], (npz["l14_img"] * npz["l14_txt"]).sum(1), atol=1e-5)
    log = json.loads((out / "00007.json").read_text())
    assert log["number of samples"] == 3 and log["samples_failed"] == 0
    assert set(log["weights"]) == {"oai-clip-vit-b32", "oai-clip-vit-l14", "nsfw-detoxify", "faces-scrfd10g",
                                   "dedup-isc-ft-v107", "nsfw-image-oai-clip-vit-l-14", "dedup-reference"}
    assert {w["kind"] for w in log["weights"].values()} == {"random"}

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d2m_core.config import parse_config
from d2m_core.outputs.storage import write_bytes_atomic
from d2m_core.outputs.writers import write_datacomp_files

SAMPLES = pa.table({
    "key": ["a", "b"],
    "uid": ["0" * 32, "f" * 32],
    "json": [json.dumps({"uid": "0" * 32, "caption": "a dog", "original_width": 640}),
             json.dumps({"uid": "f" * 32, "caption": "a cat", "original_width": 320})],
})
STATS = {"samples_read": 3, "samples_written": 2, "samples_failed": 1,
         "failures": [{"key": "c", "uid": None, "reason": "cannot decode image"}],
         "timings": {"model_s": 1.5, "loader_wait_s": 0.25}, "weights": [{"model": "oai-clip-vit-b32", "kind": "random"}]}
ARRAYS = {("clip_b32_scores", "score"): np.array([0.25, -0.5], np.float32),
          ("clip_b32_features", "image"): np.eye(2, 512, dtype=np.float32),
          ("clip_b32_features", "text"): np.eye(2, 512, dtype=np.float32)}


def _config(tmp_path: Path, datacomp: bool):
    return parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 2, "device": "cpu",
                         "input_tars": "x.tar", "output_metadata_dir": str(tmp_path),
                         "postprocess_columns": ["oai-clip-vit-b32-score"],
                         "postprocess_features": ["oai-clip-vit-b32-image", "oai-clip-vit-b32-text"],
                         "additional_fields": ["uid", "caption", "original_width"], "use_datacomp_keys": datacomp})


@pytest.mark.parametrize("datacomp", [False, True])
def test_files_columns_and_names(tmp_path: Path, datacomp: bool) -> None:
    paths = write_datacomp_files(_config(tmp_path, datacomp), "00007", SAMPLES, STATS, lambda a, f: ARRAYS[(a, f)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007.json", "00007.npz", "00007.parquet"]
    table = pq.read_table(paths["parquet"])
    score, text, img, txt = ("clip_b32_similarity_score", "text", "b32_img", "b32_txt") if datacomp else \
        ("oai-clip-vit-b32-score", "caption", "oai-clip-vit-b32-image", "oai-clip-vit-b32-text")
    assert table.column_names == [score, "uid", text, "original_width"]
    assert table.schema.field(score).type == pa.float32()
    assert table.schema.field("original_width").type == pa.int64()
    assert table.column(text).to_pylist() == ["a dog", "a cat"]
    npz = np.load(paths["npz"])
    assert sorted(npz.files) == sorted([img, txt]) and npz[img].dtype == np.float32 and npz[img].shape == (2, 512)
    log = json.loads(Path(paths["json"]).read_text())
    assert log["number of samples"] == 2 and log["sample time (s)"] == 1.5 and log["loader time (s)"] == 0.25
    assert (log["samples_read"], log["samples_written"], log["samples_failed"]) == (3, 2, 1)
    assert log["failures"] == STATS["failures"] and log["weights"]["oai-clip-vit-b32"]["kind"] == "random"


def test_misaligned_rows_are_refused(tmp_path: Path) -> None:
    arrays = dict(ARRAYS) | {("clip_b32_scores", "score"): np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="3 rows for 2 samples"):
        write_datacomp_files(_config(tmp_path, False), "00007", SAMPLES, STATS, lambda a, f: arrays[(a, f)])


def test_parsed_jsons_in_memory_give_the_same_parquet(tmp_path: Path) -> None:
    """The writer thread hands over the samples' parsed jsons (a None for a sample without one): DataComp's
    parquet comes out byte for byte as when the stored json strings are parsed again."""
    jsons = [json.loads(j) for j in SAMPLES.column("json").to_pylist()] + [None]
    samples = pa.concat_tables([SAMPLES, pa.table({"key": ["c"], "uid": ["1" * 32], "json": pa.array([None], pa.string())})])
    arrays = {k: np.concatenate([v, v[:1]]) for k, v in ARRAYS.items()}
    parsed = write_datacomp_files(_config(tmp_path / "parsed", True), "00007", samples, STATS, lambda a, f: arrays[(a, f)])
    held = write_datacomp_files(_config(tmp_path / "held", True), "00007", samples, STATS, lambda a, f: arrays[(a, f)],
                                jsons=jsons)
    assert Path(held["parquet"]).read_bytes() == Path(parsed["parquet"]).read_bytes()
    with pytest.raises(ValueError, match="2 sample jsons for 3 samples"):
        write_datacomp_files(_config(tmp_path / "short", True), "00007", samples, STATS, lambda a, f: arrays[(a, f)],
                             jsons=jsons[:2])


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"
    write_bytes_atomic(str(target), b"one")
    write_bytes_atomic(str(target), b"two")
    assert target.read_bytes() == b"two" and [p.name for p in target.parent.iterdir()] == ["x.bin"]

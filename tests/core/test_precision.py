"""Reduced precision stays within the DESIGN's fidelity bound: features within cosine 0.99 of fp32."""

from pathlib import Path

from d2m_core.bench import fidelity
from d2m_core.config import parse_config
from d2m_core.reading.shards import ShardRef


def test_bf16_features_stay_within_cosine_099_of_fp32(shard_dir: Path) -> None:
    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 8, "device": "cpu",
                           "precision": "bf16", "input_tars": "x.tar", "output_metadata_dir": "/unused"})
    line = fidelity(config, [ShardRef("00001", str(shard_dir / "00001.tar"))])
    assert line["precision"] == "bfloat16" and line["batch"] == 8
    assert set(line["min_cosine_vs_fp32"]) == {"oai-clip-vit-b32/image", "oai-clip-vit-b32/text"}
    assert line["ok"] and min(line["min_cosine_vs_fp32"].values()) >= 0.99, line

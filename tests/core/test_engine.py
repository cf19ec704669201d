from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tar_samples
from d2m_core.config import parse_config
from d2m_core.engine import Engine
from d2m_core.loader import Batch, Loader, ShardEnd, ShardStart
from d2m_core.pipeline import build_engine
from d2m_core.shards import ShardRef
from d2m_core.transforms import ClipImageTransform


def _refs(shard_dir: Path) -> list[ShardRef]:
    return [ShardRef(s, str(shard_dir / f"{s}.tar")) for s in ("00000", "00001")]


def test_loader_brackets_shards_and_keeps_a_last_batch_of_one(shard_dir: Path) -> None:
    items = list(Loader(_refs(shard_dir), batch_size=4, transforms=[ClipImageTransform()], needs_text=True, nworkers=2))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["ShardStart", "Batch", "Batch", "Batch", "ShardEnd"] * 2
    batches = [i for i in items if isinstance(i, Batch)]
    assert [b.samples_read for b in batches] == [4, 4, 1, 4, 4, 1]
    assert batches[-1].images["clip-aug"].shape == (1, 3, 224, 224)
    assert batches[1].failures[0].key == "000000004" and "cannot decode" in batches[1].failures[0].reason
    assert isinstance(items[0], ShardStart) and isinstance(items[4], ShardEnd)


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 2, "batch_size": 4, "device": "cpu",
                           "input_tars": "unused.tar", "output_metadata_dir": "/unused"})
    return build_engine(config, ["clip_b32_features"])[0]


def test_one_pass_gives_aligned_unit_norm_features_and_records_failures(engine: Engine, shard_dir: Path) -> None:
    progress = []
    results = list(engine.run(_refs(shard_dir), progress.append))
    assert [p.shards_done for p in progress] == [1, 2]
    first, second = results
    expected_keys = [s["key"] for s in tar_samples(shard_dir / "00000.tar") if s["key"] != "000000004"]
    assert first.keys == expected_keys
    assert first.uids == [s["json"]["uid"] for s in tar_samples(shard_dir / "00000.tar") if s["key"] != "000000004"]
    assert first.stats.samples_read == 9 and first.stats.samples_written == 8 and first.stats.samples_failed == 1
    failure = first.stats.failures[0]
    assert failure.key == "000000004" and failure.uid is not None and "cannot decode" in failure.reason
    for result, rows in ((first, 8), (second, 9)):
        out = result.outputs["oai-clip-vit-b32"]
        assert out["image"].shape == (rows, 512) and out["text"].shape == (rows, 512)
        assert out["image"].dtype == np.float32
        assert np.allclose(np.linalg.norm(out["image"], axis=1), 1, atol=1e-5)
        assert np.allclose(np.linalg.norm(out["text"], axis=1), 1, atol=1e-5)


def test_rows_do_not_depend_on_batching(engine: Engine, shard_dir: Path) -> None:
    ref = _refs(shard_dir)[1]
    batched = next(engine.run([ref])).outputs["oai-clip-vit-b32"]["image"]
    engine.batch_size = 1
    try:
        single = next(engine.run([ref])).outputs["oai-clip-vit-b32"]["image"]
    finally:
        engine.batch_size = 4
    assert np.allclose(batched, single, atol=1e-4)


def test_unreadable_shard_is_reported_and_others_complete(engine: Engine, shard_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"garbage" * 100)
    results = list(engine.run([ShardRef("broken", str(bad)), _refs(shard_dir)[1]]))
    assert results[0].error is not None and "broken.tar" in results[0].error
    assert results[1].error is None and results[1].stats.samples_written == 9

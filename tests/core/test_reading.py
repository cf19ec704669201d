from pathlib import Path

import pytest

from conftest import replace_member, tar_samples
from d2m_core.reading import ShardReadError, iter_samples
from d2m_core.shards import ShardRef


def test_samples_in_tar_order_with_members(shard_dir: Path) -> None:
    samples = list(iter_samples(ShardRef("00001", str(shard_dir / "00001.tar"))))
    expected = tar_samples(shard_dir / "00001.tar")
    assert [s.key for s in samples] == [e["key"] for e in expected]
    for s, e in zip(samples, expected):
        assert s.json == e["json"] and s.uid == e["json"]["uid"]
        assert s.image is not None and s.text == e["json"]["caption"] and s.problem is None


def test_missing_image_and_bad_json_are_problems(tmp_path: Path, shard_dir: Path) -> None:
    tar = tmp_path / "00009.tar"
    tar.write_bytes((shard_dir / "00001.tar").read_bytes())
    replace_member(tar, "extra.txt", b"a caption without image")
    replace_member(tar, "000010001.json", b"{not json")
    samples = {s.key: s for s in iter_samples(ShardRef("00009", str(tar)))}
    assert "no image member" in samples["extra"].problem
    assert "not valid JSON" in samples["000010001"].problem


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path: Path, shard_dir: Path) -> None:
    data = (shard_dir / "00001.tar").read_bytes()
    tar = tmp_path / "cut.tar"
    tar.write_bytes(data[: len(data) // 2])
    samples = list(iter_samples(ShardRef("cut", str(tar))))
    assert samples[-1].key == "<truncated>" and "truncated" in samples[-1].problem
    assert 1 <= len(samples) - 1 < 9


def test_not_a_tar_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardReadError, match="bad.tar"):
        list(iter_samples(ShardRef("bad", str(bad))))

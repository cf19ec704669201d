import shutil
from pathlib import Path

import pytest

from d2m_core.reading.reading import iter_samples
from d2m_core.reading.shards import ShardListError, ShardRef, expand_shards, shard_stem


@pytest.fixture
def tars(tmp_path: Path, shard_dir: Path) -> Path:
    for i in range(3):
        shutil.copy(shard_dir / "00001.tar", tmp_path / f"0000571{7 + i}.tar")
    return tmp_path


def test_single_path_braceexpand_glob_folder_and_list(tars: Path) -> None:
    stems = ["00005717", "00005718", "00005719"]
    assert [r.stem for r in expand_shards(str(tars / "00005718.tar"))] == ["00005718"]
    assert [r.stem for r in expand_shards(str(tars / "000057{17..19}.tar"))] == stems
    assert [r.stem for r in expand_shards(str(tars / "*.tar"))] == stems
    assert [r.stem for r in expand_shards(str(tars))] == stems
    refs = expand_shards([str(tars / "00005719.tar"), str(tars / "00005717.tar")])
    assert [r.stem for r in refs] == ["00005719", "00005717"]
    assert refs[0] == ShardRef("00005719", str(tars / "00005719.tar"))


def test_duplicate_stems_name_both(tars: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tars / "00005717.tar", other / "00005717.tar")
    with pytest.raises(ShardListError, match=r"00005717.*other/00005717.tar"):
        expand_shards([str(tars / "00005717.tar"), str(other / "00005717.tar")])


def test_nothing_matches_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ShardListError, match="no tar matches"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(ShardListError, match="neither"):
        expand_shards(str(tmp_path / "missing"))


def test_pipe_urls_are_named_and_read_like_files(shard_dir: Path) -> None:
    url = f"pipe:cat {shard_dir / '00001.tar'}"
    assert shard_stem(url) == "00001"
    (ref,) = expand_shards(url)
    piped = [s.key for s in iter_samples(ref)]
    direct = [s.key for s in iter_samples(ShardRef("00001", str(shard_dir / "00001.tar")))]
    assert piped == direct and len(direct) == 9


def test_s3_urls_go_through_the_same_path(shard_dir: Path, s3_server) -> None:
    for stem in ("00000", "00001"):
        s3_server.upload_file(str(shard_dir / f"{stem}.tar"), "pool", f"tars/{stem}.tar")
    refs = expand_shards("s3://pool/tars/*.tar")
    assert [(r.stem, r.url) for r in refs] == [("00000", "s3://pool/tars/00000.tar"), ("00001", "s3://pool/tars/00001.tar")]
    assert [r.stem for r in expand_shards("s3://pool/tars/0000{0..1}.tar")] == ["00000", "00001"]
    keys = [s.key for s in iter_samples(refs[1])]
    assert keys == [s.key for s in iter_samples(ShardRef("00001", str(shard_dir / "00001.tar")))]

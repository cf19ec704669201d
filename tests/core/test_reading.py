import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import replace_member, tar_samples
from d2m_core.reading import reading
from d2m_core.reading.reading import TRUNCATED, ReadReport, ShardReadError, count_samples, iter_samples, split_name
from d2m_core.reading.shards import ShardRef


def _ref(path: Path) -> ShardRef:
    return ShardRef(path.stem, str(path))


def _tar(path: Path, members: list[tuple[str, bytes | None]], *, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write members in order; data None makes a directory entry, bytes starting with '->' a symlink."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            elif data.startswith(b"->"):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:].decode()
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def _sample(key: str, uid: str | None = "u" * 32, image: bytes = b"img", **extra: bytes) -> list[tuple[str, bytes]]:
    meta = {"key": key} | ({"uid": uid} if uid is not None else {})
    members = {"jpg": image, "json": json.dumps(meta).encode(), "txt": b"a caption"} | extra
    return [(f"{key}.{ext}", data) for ext, data in members.items()]


def test_samples_in_tar_order_with_members(shard_dir: Path) -> None:
    report = ReadReport(str(shard_dir / "00001.tar"))
    samples = list(iter_samples(ShardRef("00001", str(shard_dir / "00001.tar")), report))
    expected = tar_samples(shard_dir / "00001.tar")
    assert [s.key for s in samples] == [e["key"] for e in expected]
    for s, e in zip(samples, expected):
        assert s.json == e["json"] and s.uid == e["json"]["uid"]
        assert s.image is not None and s.text == e["json"]["caption"] and s.problem is None
    assert report == ReadReport(report.url, samples=9, members=27, directories=0, truncated=None, done=True)


def test_missing_image_and_bad_json_are_problems(tmp_path: Path, shard_dir: Path) -> None:
    tar = tmp_path / "00009.tar"
    tar.write_bytes((shard_dir / "00001.tar").read_bytes())
    replace_member(tar, "extra.txt", b"a caption without image")
    replace_member(tar, "000010001.json", b"{not json")
    samples = {s.key: s for s in iter_samples(ShardRef("00009", str(tar)))}
    assert "not a sample" in samples["extra"].problem
    assert "not valid JSON" in samples["000010001"].problem and samples["000010001"].uid is None


def test_json_and_uid_rules(tmp_path: Path) -> None:
    members = (_sample("a") + _sample("b", uid=None) + _sample("c", uid="") + [("d.jpg", b"x"), ("d.txt", b"t")]
               + _sample("e")[1:] + _sample("f", **{"json": b"[1]"}) + _sample("g", **{"json": b'{"uid": "\\ud800x"}'}))
    samples = {s.key: s for s in iter_samples(_ref(_tar(tmp_path / "j.tar", members)))}
    assert samples["a"].problem is None and samples["a"].uid == "u" * 32
    assert samples["b"].problem == "json has no uid" and samples["b"].uid is None
    assert "uid is not a non-empty string" in samples["c"].problem
    assert samples["d"].problem == "no json member, so no uid"
    assert samples["e"].problem.startswith("no image member") and samples["e"].uid == "u" * 32
    assert "not an object" in samples["f"].problem
    assert samples["g"].uid == "\ufffdx" and samples["g"].problem is None  # lone surrogate escape replaced


def test_grouping_strays_directories_duplicates_and_links(tmp_path: Path) -> None:
    members = ([("./", None), ("README.md", b"# hi"), ("LICENSE", b"MIT")] + _sample("k1") + [("sub/", None)]
               + _sample("sub/k2") + _sample("k1") + _sample("k3")[1:] + [("k3.jpg", b"->/etc/passwd")]
               + [("../../evil/k4.JPG", b"img"), ("../../evil/k4.json", b'{"uid": "v"}'), ("/abs/k5.jpg", b"i"),
                  ("/abs/k5.json", b'{"uid": "w"}')])
    report = ReadReport("")
    samples = list(iter_samples(_ref(_tar(tmp_path / "g.tar", members)), report))
    assert [s.key for s in samples] == ["README", "LICENSE", "k1", "sub/k2", "k1", "k3", "../../evil/k4", "/abs/k5"]
    problems = [s.problem or "" for s in samples]
    assert "not a sample" in problems[0] and "not a sample" in problems[1]
    assert problems[2] == problems[3] == "" and samples[3].names == ["sub/k2.jpg", "sub/k2.json", "sub/k2.txt"]
    assert problems[4].startswith("duplicate key")
    assert "symlink" in problems[5] and samples[5].image == b""  # never followed
    assert problems[6] == problems[7] == "" and samples[6].image == b"img"
    assert report.directories == 2 and report.members == len(members) - 2 and report.samples == 8
    assert list(tmp_path.iterdir()) == [tmp_path / "g.tar"]


def test_split_name_is_webdatasets() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ["a.jpg", "dir/a.b.JSON", "README", ".hidden", "x.", "a/b/", "../x.txt", "/abs/y.seg.png"]:
        prefix, suffix = base_plus_ext(name)
        assert split_name(name) == (prefix, suffix.lower() if suffix else "")


def test_undecodable_member_names_become_valid_keys(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "l.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in _sample("caf\xe9"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_samples(_ref(tmp_path / "l.tar"))
    assert sample.key == "caf\ufffd" and sample.problem is None


@pytest.mark.parametrize("where", ["mid-member", "member-boundary", "sample-boundary"])
def test_truncated_tar_keeps_samples_before_the_cut(tmp_path: Path, shard_dir: Path, where: str) -> None:
    data = (shard_dir / "00001.tar").read_bytes()
    with tarfile.open(shard_dir / "00001.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    cut = {"mid-member": members["000010004.json"].offset_data + 5,
           "member-boundary": members["000010004.json"].offset,
           "sample-boundary": members["000010005.jpg"].offset}[where]
    tar = tmp_path / "cut.tar"
    tar.write_bytes(data[:cut])
    report = ReadReport(str(tar))
    samples = list(iter_samples(_ref(tar), report))
    assert [s.key for s in samples] == [f"00001{i:04d}" for i in range(5)]  # the sample at the cut is the last
    assert all(s.problem is None for s in samples[:4])
    assert samples[-1].problem.startswith(TRUNCATED) and "may be incomplete" in samples[-1].problem
    assert report.truncated.startswith(TRUNCATED) and report.samples == 5 and report.done


def test_corrupt_header_and_data_after_the_end_are_truncations(tmp_path: Path, shard_dir: Path) -> None:
    with tarfile.open(shard_dir / "00001.tar") as tar:
        header = next(m for m in tar.getmembers() if m.name == "000010002.jpg").offset
    for damage, says in ((slice(header + 148, header + 156), "corrupt member header"),
                         (slice(header, header + 512), "data follows the end-of-archive block")):
        data = bytearray((shard_dir / "00001.tar").read_bytes())
        data[damage] = b"0000000\x00" if damage.stop - damage.start == 8 else bytes(512)
        tar = tmp_path / "bad.tar"
        tar.write_bytes(bytes(data))
        samples = list(iter_samples(_ref(tar)))
        assert [s.problem is None for s in samples] == [True, False]
        assert samples[-1].problem.startswith(TRUNCATED) and says in samples[-1].problem


def test_empty_tars_hold_no_samples(tmp_path: Path) -> None:
    assert count_samples(_ref(_tar(tmp_path / "empty.tar", []))).samples == 0
    report = count_samples(_ref(_tar(tmp_path / "dirs.tar", [("a/", None), ("b/", None)])))
    assert report.samples == 0 and report.directories == 2 and report.truncated is None


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"this is not a tar file at all" * 40])
def test_not_a_tar_names_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    with pytest.raises(ShardReadError, match="bad.tar"):
        list(iter_samples(_ref(bad)))


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ShardReadError, match="missing.tar"):
        list(iter_samples(_ref(tmp_path / "missing.tar")))


def test_cut_before_any_sample_is_unreadable(tmp_path: Path) -> None:
    data = _tar(tmp_path / "dirs.tar", [("a/", None), ("b/", None)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1024])  # two directory headers, no end-of-archive blocks
    with pytest.raises(ShardReadError, match="cut.tar.*no sample could be read"):
        count_samples(_ref(tmp_path / "cut.tar"))


def test_oversized_member_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "MAX_MEMBER_BYTES", 1000)
    samples = list(iter_samples(_ref(_tar(tmp_path / "big.tar", _sample("a", image=b"x" * 5000) + _sample("b")))))
    assert "over the 1000-byte limit" in samples[0].problem and samples[0].image == b""
    assert samples[1].problem is None


def test_a_failing_pipe_is_a_truncation(tmp_path: Path, shard_dir: Path) -> None:
    ref = ShardRef("00001", f"pipe:cat {shard_dir / '00001.tar'}; exit 3")
    samples = list(iter_samples(ref))  # webdataset's pipe raises once the command has exited: how many is timing
    assert 1 <= len(samples) <= 9 and samples[-1].problem.startswith(TRUNCATED) and "exit 3" in samples[-1].problem
    assert all(s.problem is None for s in samples[:-1])
    with pytest.raises(ShardReadError, match="no-such.tar"):
        list(iter_samples(ShardRef("x", f"pipe:cat {tmp_path / 'no-such.tar'}")))


def test_stopping_early_closes_the_stream(shard_dir: Path) -> None:
    samples = iter_samples(ShardRef("00001", str(shard_dir / "00001.tar")))
    next(samples)
    samples.close()  # no error, nothing left open

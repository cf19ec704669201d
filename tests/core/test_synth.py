"""Tests for d2m_core.testdata.synth: synthetic img2dataset-format webdataset shards."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from d2m_core.testdata.synth import make_shards

SHARDS = 2
SAMPLES = 100
MAX_SIDE = 512
JSON_KEYS = {
    "uid", "url", "caption", "key", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "sha256",
}
INT_KEYS = ("width", "height", "original_width", "original_height")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    """All (member name, bytes) of a tar, in archive order."""
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def group_samples(members: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Group consecutive members by key, like webdataset does."""
    samples: list[dict[str, Any]] = []
    for name, data in members:
        key, ext = name.split(".", 1)
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][ext] = data
    return samples


def image_of(sample: dict[str, Any]) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image member."""
    ext = "png" if "png" in sample else "jpg"
    return ext, sample[ext]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One set of shards shared by the read-only tests."""
    out_dir = tmp_path_factory.mktemp("shards")
    return out_dir, make_shards(out_dir, shards=SHARDS, samples=SAMPLES, seed=0, max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def samples(out: tuple[Path, list[Path]]) -> list[dict[str, Any]]:
    """Every sample of every shard, in order, with its json decoded under 'meta'."""
    result = []
    for tar in out[1]:
        for s in group_samples(read_tar(tar)):
            s["meta"] = json.loads(s["json"])
            result.append(s)
    return result


def test_file_names_and_order(out: tuple[Path, list[Path]]) -> None:
    out_dir, tars = out
    assert tars == [out_dir / "00000.tar", out_dir / "00001.tar"]
    expected = {f"{i:05d}{suffix}" for i in range(SHARDS) for suffix in (".tar", ".parquet", "_stats.json")}
    assert {p.name for p in out_dir.iterdir()} == expected  # no temporary files left behind


def test_start_offsets_shard_numbers(tmp_path: Path) -> None:
    tars = make_shards(tmp_path, shards=2, samples=3, start=7)
    assert [p.name for p in tars] == ["00007.tar", "00008.tar"]
    keys = [s["__key__"] for s in group_samples(read_tar(tars[1]))]
    assert keys == ["000080000", "000080001", "000080002"]


def test_start_selects_shards_of_the_same_stream(out: tuple[Path, list[Path]], tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, shards=1, samples=SAMPLES, seed=0, start=1, max_side=MAX_SIDE)
    assert tar.read_bytes() == out[1][1].read_bytes()


def test_stats_json(out: tuple[Path, list[Path]]) -> None:
    out_dir, tars = out
    for tar in tars:
        stats_path = out_dir / f"{tar.stem}_stats.json"
        stats = json.loads(stats_path.read_text())
        assert stats["count"] == SAMPLES
        assert stats["successes"] == SAMPLES
        assert stats["failed_to_download"] == 0
        assert stats["failed_to_resize"] == 0
        assert stats["status"] == "success"
        assert stats["status_dict"] == {"success": SAMPLES}
        assert 0 < stats["start_time"] <= stats["end_time"]
        assert stats["duration"] == pytest.approx(stats["end_time"] - stats["start_time"])
        # stats is written last
        assert stats_path.stat().st_mtime_ns >= (out_dir / f"{tar.stem}.parquet").stat().st_mtime_ns
        assert stats_path.stat().st_mtime_ns >= tar.stat().st_mtime_ns


def test_tar_members_per_sample(out: tuple[Path, list[Path]]) -> None:
    for shard, tar in enumerate(out[1]):
        names = [name for name, _ in read_tar(tar)]
        assert len(names) == 3 * SAMPLES
        for i in range(SAMPLES):
            key = f"{shard:05d}{i:04d}"
            group = names[3 * i : 3 * i + 3]
            # webdataset's TarWriter (used by img2dataset) writes a sample's members sorted by extension
            assert group in (
                [f"{key}.jpg", f"{key}.json", f"{key}.txt"],
                [f"{key}.json", f"{key}.png", f"{key}.txt"],
            )


def test_json_keys_and_types(samples: list[dict[str, Any]]) -> None:
    assert len(samples) == SHARDS * SAMPLES
    for s in samples:
        meta = s["meta"]
        assert set(meta) == JSON_KEYS
        assert meta["key"] == s["__key__"]
        assert meta["status"] == "success"
        assert meta["error_message"] is None
        assert isinstance(meta["caption"], str) and meta["caption"]
        assert meta["caption"] == s["txt"].decode("utf-8")
        assert isinstance(meta["url"], str) and meta["url"].startswith("https://")
        for k in INT_KEYS:
            assert type(meta[k]) is int and meta[k] > 0
        assert meta["exif"] is None or isinstance(json.loads(meta["exif"]), dict)
        assert HEX64.match(meta["sha256"])


def test_uid_format_and_uniqueness(samples: list[dict[str, Any]]) -> None:
    uids = [s["meta"]["uid"] for s in samples]
    assert all(HEX32.match(u) for u in uids)
    assert len(set(uids)) == len(uids)
    assert len({s["meta"]["url"] for s in samples}) == len(uids)


def test_sha256_matches_image_bytes(samples: list[dict[str, Any]]) -> None:
    for s in samples:
        assert hashlib.sha256(image_of(s)[1]).hexdigest() == s["meta"]["sha256"]


def test_size_matches_decoded_image(samples: list[dict[str, Any]]) -> None:
    for s in samples:
        ext, data = image_of(s)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == ("PNG" if ext == "png" else "JPEG")
            assert im.mode in (("RGB", "RGBA") if ext == "png" else ("RGB", "L"))
            assert im.size == (s["meta"]["width"], s["meta"]["height"])
            assert max(im.size) <= MAX_SIDE
            im.load()


def test_parquet_rows_equal_jsons(out: tuple[Path, list[Path]]) -> None:
    out_dir, tars = out
    for tar in tars:
        rows = pq.read_table(out_dir / f"{tar.stem}.parquet").to_pylist()
        metas = [json.loads(s["json"]) for s in group_samples(read_tar(tar))]
        assert rows == metas


def test_deterministic(out: tuple[Path, list[Path]], tmp_path: Path) -> None:
    again = make_shards(tmp_path / "same", shards=SHARDS, samples=SAMPLES, seed=0, max_side=MAX_SIDE)
    for a, b in zip(out[1], again):
        assert a.read_bytes() == b.read_bytes()
        assert pq.read_table(a.with_suffix(".parquet")).equals(pq.read_table(b.with_suffix(".parquet")))
    other = make_shards(tmp_path / "other", shards=1, samples=SAMPLES, seed=1, max_side=MAX_SIDE)
    assert other[0].read_bytes() != out[1][0].read_bytes()


def test_worker_processes_write_the_same_bytes(out: tuple[Path, list[Path]], tmp_path: Path) -> None:
    parallel = make_shards(tmp_path, shards=SHARDS, samples=SAMPLES, seed=0, max_side=MAX_SIDE, workers=2)
    assert [p.name for p in parallel] == [p.name for p in out[1]]
    for a, b in zip(out[1], parallel):
        assert a.read_bytes() == b.read_bytes()
        assert pq.read_table(a.with_suffix(".parquet")).equals(pq.read_table(b.with_suffix(".parquet")))
    with pytest.raises(ValueError, match="workers"):
        make_shards(tmp_path / "none", shards=1, samples=1, workers=0)


def test_variety(samples: list[dict[str, Any]]) -> None:
    modes: set[tuple[str, str]] = set()
    for s in samples:
        ext, data = image_of(s)
        with Image.open(io.BytesIO(data)) as im:
            modes.add((ext, im.mode))
    assert {("jpg", "RGB"), ("jpg", "L"), ("png", "RGBA")} <= modes
    n = len(samples)
    exts = [image_of(s)[0] for s in samples]
    assert 0.03 * n <= exts.count("png") <= 0.25 * n
    metas = [s["meta"] for s in samples]
    sizes = [(m["width"], m["height"]) for m in metas]
    assert len(set(sizes)) > n // 2
    assert any(w > 1.3 * h for w, h in sizes) and any(h > 1.3 * w for w, h in sizes)
    assert any(min(w, h) < 224 for w, h in sizes) and any(max(w, h) >= 400 for w, h in sizes)
    originals = [(m["original_width"], m["original_height"]) for m in metas]
    assert any(o != s for o, s in zip(originals, sizes)) and any(o == s for o, s in zip(originals, sizes))
    assert any(m["exif"] is not None for m in metas) and any(m["exif"] is None for m in metas)
    captions = [m["caption"] for m in metas]
    assert len(set(captions)) > n // 2
    assert any(not c.isascii() for c in captions)
    assert len({len(c.split()) for c in captions}) >= 5
    digests = {hashlib.sha256(image_of(s)[1]).hexdigest() for s in samples}
    assert len(digests) == n


def test_one_sample(tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, shards=1, samples=1)
    names = [name for name, _ in read_tar(tar)]
    assert len(names) == 3 and {"000000000.json", "000000000.txt"} <= set(names)
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 1
    assert json.loads((tmp_path / "00000_stats.json").read_text())["count"] == 1


def test_small_max_side(tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, shards=1, samples=20, max_side=64, jpeg_quality=50)
    for s in group_samples(read_tar(tar)):
        with Image.open(io.BytesIO(image_of(s)[1])) as im:
            assert max(im.size) <= 64


def test_webdataset_reads_shards(out: tuple[Path, list[Path]]) -> None:
    import webdataset as wds

    urls = [str(p) for p in out[1]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"{shard:05d}{i:04d}" for shard in range(SHARDS) for i in range(SAMPLES)]


@pytest.mark.parametrize(
    "kwargs",
    [{"shards": 0}, {"samples": 0}, {"start": -1}, {"max_side": 8}, {"jpeg_quality": 0}, {"jpeg_quality": 101}],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make_shards(tmp_path, **kwargs)


def test_does_not_import_dagster() -> None:
    code = "import sys, d2m_core.testdata.synth; assert 'dagster' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

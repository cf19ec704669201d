from pathlib import Path

from d2m_core.reading.discovery import DiscoveryCursor, discover


def _tar(folder: Path, stem: str, stats: bool = True) -> None:
    (folder / f"{stem}.tar").write_bytes(b"")
    (folder / f"{stem}.parquet").write_bytes(b"")
    if stats:
        (folder / f"{stem}_stats.json").write_text("{}")


def test_a_tar_counts_once_its_stats_file_is_there(tmp_path: Path) -> None:
    _tar(tmp_path, "00000")
    _tar(tmp_path, "00001", stats=False)
    refs, cursor = discover(str(tmp_path), DiscoveryCursor())
    assert [r.stem for r in refs] == ["00000"] and cursor.pending == [str(tmp_path / "00001.tar")]
    refs, cursor = discover(str(tmp_path), DiscoveryCursor.loads(cursor.dumps()), known={"00000"})
    assert refs == []
    (tmp_path / "00001_stats.json").write_text("{}")  # sorts before the cursor: found through `pending`
    _tar(tmp_path, "00002")
    refs, cursor = discover(str(tmp_path), cursor, known={"00000"})
    assert [r.stem for r in refs] == ["00001", "00002"] and cursor.pending == []


def test_patterns_and_limits(tmp_path: Path) -> None:
    for i in range(5):
        _tar(tmp_path, f"0000{i}", stats=i != 3)
    refs, _ = discover(str(tmp_path / "0000{0..4}.tar"), DiscoveryCursor(), known={"00000"}, limit=2)
    assert [r.stem for r in refs] == ["00001", "00002"]
    refs, cursor = discover(str(tmp_path), DiscoveryCursor(), limit=3)
    assert [r.stem for r in refs] == ["00000", "00001", "00002"]
    refs, cursor = discover(str(tmp_path), cursor, known={"00000", "00001", "00002"})
    assert [r.stem for r in refs] == ["00004"] and cursor.pending == [str(tmp_path / "00003.tar")]


def test_full_rescan_catches_tars_that_arrived_out_of_order(tmp_path: Path) -> None:
    _tar(tmp_path, "00005")
    refs, cursor = discover(str(tmp_path), DiscoveryCursor())
    _tar(tmp_path, "00001")  # sorts before the cursor and was never listed
    cursor.scans = 98
    assert discover(str(tmp_path), cursor, known={"00005"})[0] == []
    refs, _ = discover(str(tmp_path), DiscoveryCursor(after=cursor.after, scans=99), known={"00005"})
    assert [r.stem for r in refs] == ["00001"]

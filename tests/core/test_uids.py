"""DataComp's uid file: dtype, order, round trip through its uid-to-key rule."""

from pathlib import Path

import numpy as np
import pytest

from d2m_core.subsets import uids


def _random_uids(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(n)]


def test_keys_follow_datacomps_rule_and_sort_as_it_does(tmp_path: Path) -> None:
    values = _random_uids(500) + ["0" * 32, "f" * 32, "00000000000000010000000000000000"]
    keys = uids.uid_keys(values)
    datacomp = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in values], np.dtype("u8,u8"))
    assert keys.dtype == np.dtype("u8,u8") and (keys == datacomp).all()
    path = tmp_path / "subset.npy"
    uids.save_uid_file(str(path), keys[::-1])
    loaded = np.load(path)
    assert loaded.dtype == np.dtype("u8,u8")
    expected = datacomp.copy()
    expected.sort()
    assert (loaded == expected).all()
    assert [tuple(map(int, k)) for k in loaded] == sorted((int(u[:16], 16), int(u[16:], 16)) for u in values)
    assert sorted(uids.key_to_uid(k) for k in loaded) == sorted(values)
    assert (uids.load_uid_file(str(path)) == expected).all()


def test_multiplicity_counts_repeats_as_the_resharder() -> None:
    values = _random_uids(4, seed=1)
    subset = uids.sort_keys(uids.uid_keys([values[0], values[2], values[2]]))
    assert uids.multiplicity(subset, uids.uid_keys(values)).tolist() == [1, 0, 2, 0]


def test_bad_uids_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(uids.UidError, match="'abc'"):
        uids.uid_keys(["abc"], where="x.parquet")
    with pytest.raises(uids.UidError, match="zz"):
        uids.uid_keys(["zz" + "0" * 30])
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.arange(4, dtype=np.int64))
    with pytest.raises(uids.UidError, match="dtype"):
        uids.load_uid_file(str(wrong))


def test_arrow_column_keys_equal_the_string_rule() -> None:
    import pyarrow as pa

    values = _random_uids(300, seed=2)
    column = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
    assert (uids.column_keys(column) == uids.uid_keys(values)).all()
    assert (uids.column_keys(pa.array(values).slice(7, 50)) == uids.uid_keys(values[7:57])).all()
    assert (uids.column_keys(pa.array(values, pa.large_string())) == uids.uid_keys(values)).all()
    with pytest.raises(uids.UidError, match="'abc'"):
        uids.column_keys(pa.array(values[:3] + ["abc"]))
    with pytest.raises(uids.UidError, match="zz"):
        uids.column_keys(pa.array(["zz" + "0" * 30]))
    with pytest.raises(uids.UidError, match="without a uid"):
        uids.column_keys(pa.array([values[0], None]))


def test_sort_matches_numpys_structured_sort_with_ties() -> None:
    rng = np.random.default_rng(5)
    keys = np.empty(5000, uids.UID_DTYPE)
    keys["f0"] = rng.integers(0, 50, len(keys), dtype=np.uint64)  # many equal high halves
    keys["f1"] = rng.integers(0, 2**64, len(keys), dtype=np.uint64)
    expected = keys.copy()
    expected.sort()
    assert (uids.sort_keys(keys) == expected).all()

"""DataComp's uid files: 32-hex-digit uids as (high, low) uint64 pairs, dtype `u8,u8`, sorted, `np.save`d.

DataComp's rule (baselines/apply_filter.py, resharder.py): key = (int(uid[:16], 16), int(uid[16:32], 16));
the file is a NumPy `.npy` of that structured dtype, sorted lexicographically (high, then low), one entry per
kept sample (a uid listed n times is resharded n times).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from d2m_core import storage

UID_DTYPE = np.dtype("u8,u8")
UID_HEX_DIGITS = 32


class UidError(ValueError):
    """A uid that is not 32 hex digits, or a uid file of the wrong type; the message names it."""


def uid_keys(uids: Sequence[str] | np.ndarray, *, where: str = "") -> np.ndarray:
    """The `u8,u8` keys of 32-hex-digit uid strings, in the given order (vectorised)."""
    uids = list(uids)
    if not uids:
        return np.zeros(0, UID_DTYPE)
    joined = "".join(uids)
    if len(joined) != UID_HEX_DIGITS * len(uids) or any(len(u) != UID_HEX_DIGITS for u in uids):
        bad = next((u for u in uids if not isinstance(u, str) or len(u) != UID_HEX_DIGITS), None)
        raise UidError(f"{where + ': ' if where else ''}uid {bad!r} is not {UID_HEX_DIGITS} hex digits")
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        bad = next(u for u in uids if not _is_hex(u))
        raise UidError(f"{where + ': ' if where else ''}uid {bad!r} is not {UID_HEX_DIGITS} hex digits") from None
    halves = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    keys = np.empty(len(uids), UID_DTYPE)
    keys["f0"], keys["f1"] = halves[:, 0], halves[:, 1]
    return keys


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
        return True
    except ValueError:
        return False


def key_to_uid(key: np.void | tuple[int, int]) -> str:
    """The 32-hex-digit uid of one key (the inverse of uid_keys)."""
    high, low = int(key[0]), int(key[1])
    return f"{high:016x}{low:016x}"


def sort_keys(keys: np.ndarray) -> np.ndarray:
    """Keys sorted as DataComp sorts them (`uids.sort()` on the structured array: high, then low)."""
    out = np.array(keys, UID_DTYPE, copy=True)
    out.sort()
    return out


def save_uid_file(url: str, keys: np.ndarray) -> None:
    """Write keys (sorted here) as DataComp's `.npy`; local or s3://, complete or absent."""
    buf = io.BytesIO()
    np.save(buf, sort_keys(keys))
    storage.write_bytes_atomic(url, buf.getvalue())


def load_uid_file(url: str) -> np.ndarray:
    """A uid file as DataComp's resharder accepts it: a `.npy` of dtype `u8,u8` (checked), or raw `u8,u8` bytes;
    returned sorted (lookups need it; DataComp's files already are)."""
    data = storage.read_bytes(url)
    if data[:6] == b"\x93NUMPY":
        keys = np.load(io.BytesIO(data), allow_pickle=False)
        if keys.dtype != UID_DTYPE:
            raise UidError(f"{url}: dtype {keys.dtype}, expected {UID_DTYPE} (DataComp's uid file)")
        return sort_keys(keys.reshape(-1))
    if len(data) % UID_DTYPE.itemsize:
        raise UidError(f"{url}: neither a .npy nor a whole number of 16-byte u8,u8 keys")
    return sort_keys(np.frombuffer(data, UID_DTYPE))


def multiplicity(subset: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """How many times each key occurs in a sorted subset (DataComp's searchsorted right - left)."""
    if not len(keys) or not len(subset):
        return np.zeros(len(keys), np.int64)
    return (np.searchsorted(subset, keys, "right") - np.searchsorted(subset, keys, "left")).astype(np.int64)

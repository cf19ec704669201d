"""The exact k-th largest score of a pool in bounded memory (the threshold of a top-fraction filter).

DataComp loads every score of the pool (`-np.sort(-scores)[int(n * fraction)]`): 51 GB of float32 at
12.8B samples. Here the same value is found by radix selection over the scores' order-preserving integer
keys: each pass streams the column shard by shard, counting keys per 16-bit digit below the prefix fixed
so far (a 65,536-bin histogram), and fixes one more digit; once the bin that holds the rank has at most
`collect_limit` values, a last pass collects just those and picks the value exactly. Memory: one column of
one shard plus the histogram (and at most `collect_limit` values), whatever the pool size. float32 scores
take two passes; float64 (the seed's parquets) usually two as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

DIGIT_BITS = 16
COLLECT_LIMIT = 1 << 22  # values gathered in the last pass at most (32 MB of float64)

Columns = Callable[[], Iterable[np.ndarray]]  # a fresh stream of the score column, one array per shard


@dataclass(frozen=True)
class Selection:
    """The k-th largest value (0-based rank) of n values, and how many passes over the pool it took."""

    value: float
    rank: int
    count: int
    passes: int


def ordered_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers ordered like the floats (IEEE 754: flip all bits of negatives, the sign of the rest)."""
    if values.dtype == np.float32:
        bits, unsigned, sign = values.view(np.int32), np.uint32, np.uint32(1 << 31)
    elif values.dtype == np.float64:
        bits, unsigned, sign = values.view(np.int64), np.uint64, np.uint64(1 << 63)
    else:
        raise TypeError(f"scores must be float32 or float64, not {values.dtype}")
    raw = bits.view(unsigned)
    return np.where(bits < 0, ~raw, raw | sign)


def kth_largest(columns: Columns, rank: int | Callable[[int], int], *, collect_limit: int = COLLECT_LIMIT) -> Selection:
    """The value at 0-based `rank` of the scores sorted in decreasing order: exactly
    `-np.sort(-all_scores)[rank]` with all scores in memory (scores must not be NaN). `rank` may be a
    function of the pool size (known after the first pass). A rank past the last score (DataComp fails
    there: fraction 1.0) gives -inf, which keeps every sample."""
    dtype: np.dtype | None = None
    total = 0
    prefix, fixed = 0, 0  # the top `fixed` bits of the wanted key, and how many are fixed
    passes = 0
    want = 0  # rank within the current bin, counted from the top
    while True:
        passes += 1
        counts = np.zeros(1 << DIGIT_BITS, np.int64)
        seen = 0
        for column in columns():
            if dtype is None:
                dtype = column.dtype
                bits = dtype.itemsize * 8
            if column.dtype != dtype:
                raise TypeError(f"score column changes type between shards: {dtype} and {column.dtype}")
            keys = _in_bin(ordered_keys(column), prefix, fixed, bits) if fixed else ordered_keys(column)
            if passes == 1:
                total += column.size
            seen += keys.size
            shift = bits - fixed - DIGIT_BITS
            counts += np.bincount((keys >> keys.dtype.type(shift)).astype(np.int64) & ((1 << DIGIT_BITS) - 1),
                                  minlength=1 << DIGIT_BITS)
        if dtype is None or total == 0:
            raise ValueError("no scores in the pool")
        if passes == 1:
            rank = rank(total) if callable(rank) else rank
            want = rank
            if rank >= total:
                return Selection(float("-inf"), rank, total, passes)
        if rank < 0:
            raise ValueError(f"rank {rank} out of range for {total} scores")
        from_top = np.cumsum(counts[::-1])
        digit_from_top = int(np.searchsorted(from_top, want, side="right"))
        digit = (1 << DIGIT_BITS) - 1 - digit_from_top
        above = int(from_top[digit_from_top - 1]) if digit_from_top else 0
        want -= above
        prefix = (prefix << DIGIT_BITS) | digit
        fixed += DIGIT_BITS
        in_bin = int(counts[digit])
        if fixed == bits:
            return Selection(_key_value(prefix, dtype), rank, total, passes)
        if in_bin <= collect_limit:
            passes += 1
            gathered = [c[_in_bin_mask(ordered_keys(c), prefix, fixed, bits)] for c in columns()]
            values = np.concatenate(gathered)
            values = -np.sort(-values)
            return Selection(values[want].item(), rank, total, passes)


def _in_bin_mask(keys: np.ndarray, prefix: int, fixed: int, bits: int) -> np.ndarray:
    return (keys >> keys.dtype.type(bits - fixed)) == keys.dtype.type(prefix)


def _in_bin(keys: np.ndarray, prefix: int, fixed: int, bits: int) -> np.ndarray:
    return keys[_in_bin_mask(keys, prefix, fixed, bits)]


def _key_value(key: int, dtype: np.dtype) -> float:
    """The float whose ordered key is `key` (the inverse of ordered_keys)."""
    bits = dtype.itemsize * 8
    sign = 1 << (bits - 1)
    raw = key ^ sign if key & sign else ~key & ((1 << bits) - 1)
    unsigned = np.uint32 if bits == 32 else np.uint64
    return np.array([raw], unsigned).view(dtype)[0].item()


def fraction_rank(count: int, fraction: float) -> int:
    """DataComp's rank of the threshold: int(n * fraction) (the threshold is the value at that rank)."""
    return int(count * fraction)

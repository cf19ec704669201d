"""Finding complete img2dataset tars as they arrive: a tar counts once its `NNNNN_stats.json` sits beside it.

Listing is incremental: a cursor remembers the greatest key listed and the tars seen without their stats
file yet, so each scan of a folder or an S3 prefix lists only what is new and re-checks only the pending.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Container, Iterable
from dataclasses import asdict, dataclass, field

import fsspec

from d2m_core.reading.shards import ShardListError, ShardRef, expand_shards, shard_stem

STATS_SUFFIX = "_stats.json"
FULL_RESCAN_EVERY = 100
ListAfter = Callable[[str, str | None], Iterable[str]]  # (prefix URL, after key) -> URLs sorted by key


@dataclass
class DiscoveryCursor:
    after: str | None = None  # greatest URL listed so far
    pending: list[str] = field(default_factory=list)  # tars listed before their stats file appeared
    scans: int = 0  # every FULL_RESCAN_EVERY-th scan lists everything again (tars that arrived out of order)
    recheck: int = 0  # the sensor's place in the registered tars: where its next re-check of their identity starts

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str | None) -> "DiscoveryCursor":
        return cls(**json.loads(text)) if text else cls()


def stats_url(tar_url: str) -> str:
    return tar_url[: -len(".tar")] + STATS_SUFFIX


def is_prefix(input_tars: str | list[str]) -> bool:
    """A folder or an s3:// prefix (listed incrementally), as opposed to patterns and lists (expanded)."""
    if not isinstance(input_tars, str) or input_tars.startswith("pipe:"):
        return False
    if any(c in input_tars for c in "*?[{") or input_tars.endswith(".tar"):
        return False
    return True


def list_local_after(prefix: str, after: str | None) -> list[str]:
    """Sorted entries of a local folder whose path sorts after `after` (one directory read, no stat calls)."""
    with os.scandir(prefix) as entries:
        names = sorted(os.path.join(prefix, e.name) for e in entries)
    return [n for n in names if after is None or n > after]


def list_fsspec_after(prefix: str, after: str | None) -> list[str]:
    fs, path = fsspec.core.url_to_fs(prefix)
    fs.invalidate_cache(path)
    scheme = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    names = sorted(scheme + p for p in fs.ls(path, detail=False))
    return [n for n in names if after is None or n > after]


def discover(input_tars: str | list[str], cursor: DiscoveryCursor, *, known: Container[str] = frozenset(),
             list_after: ListAfter | None = None, limit: int = 25_000) -> tuple[list[ShardRef], DiscoveryCursor]:
    """Complete tars not reported before, in key order (at most `limit`), and the cursor to pass next time.

    Shards whose stem is in `known` (already registered) are skipped.
    `list_after` lists a prefix after a key (S3 callers pass one using ListObjectsV2 StartAfter);
    patterns and lists are expanded whole each time; a full rescan every FULL_RESCAN_EVERY scans
    catches tars that arrived out of key order.
    """
    if not is_prefix(input_tars):  # a fixed set: check each tar's stats file every time
        refs = [r for r in expand_shards(input_tars)
                if r.stem not in known and _exists(stats_url(r.url)) and (r.url.startswith("pipe:") or _exists(r.url))]
        return refs[:limit], DiscoveryCursor(scans=cursor.scans + 1)
    lister = list_after or (list_local_after if "://" not in str(input_tars) else list_fsspec_after)
    full = cursor.scans % FULL_RESCAN_EVERY == FULL_RESCAN_EVERY - 1
    listed = list(lister(str(input_tars).rstrip("/"), None if full else cursor.after))
    names = set(listed)
    complete: list[str] = []
    pending: list[str] = []
    for url in cursor.pending:  # tars seen earlier without stats: check each once more
        (complete if _exists(stats_url(url)) else pending).append(url)
    new_after = cursor.after
    for url in listed:
        if url.endswith(".tar"):
            (complete if stats_url(url) in names or _exists(stats_url(url)) else pending).append(url)
        new_after = url if new_after is None or url > new_after else new_after
    complete = sorted(u for u in complete if shard_stem(u) not in known)
    reported, deferred = complete[:limit], complete[limit:]
    if deferred:  # resume after the last reported tar; what lies beyond is listed again next time
        new_after = reported[-1]
        pending = [u for u in pending if u <= new_after]
    refs = [ShardRef(shard_stem(u), u) for u in reported]
    stems: dict[str, str] = {}
    for ref in refs:
        if ref.stem in stems:
            raise ShardListError(f"two tars share the shard name {ref.stem!r}: {stems[ref.stem]} and {ref.url}")
        stems[ref.stem] = ref.url
    return refs, DiscoveryCursor(after=new_after, pending=sorted(set(pending)), scans=cursor.scans + 1)


def _exists(url: str) -> bool:
    if "://" not in url:
        return os.path.exists(url)
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path.rsplit("/", 1)[0])  # a cached listing would hide a stats file written since
    return fs.exists(path)

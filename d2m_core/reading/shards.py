"""Shard listing: expand `input_tars` (path, folder, braceexpand, glob, list, s3://, pipe:) into named shards."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Iterable

import braceexpand

GLOB_CHARS = "*?["


class ShardListError(ValueError):
    """input_tars names nothing usable, or two tars share a stem."""


@dataclass(frozen=True)
class ShardRef:
    """One input tar: its partition key (the tar's stem) and the URL it is read from."""

    stem: str
    url: str


def shard_stem(url: str) -> str:
    """The partition key of a tar URL: '.../00001308.tar' -> '00001308'; for pipe: the last *.tar token."""
    target = url
    if url.startswith("pipe:"):
        tokens = [t for t in shlex.split(url[len("pipe:") :]) if t.endswith(".tar")]
        if not tokens:
            raise ShardListError(f"cannot name the shard of {url!r}: no *.tar in the pipe command")
        target = tokens[-1]
    name = PurePosixPath(target.split("?", 1)[0]).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _expand_one(pattern: str) -> list[str]:
    if pattern.startswith("pipe:"):
        return list(braceexpand.braceexpand(pattern))
    urls: list[str] = []
    import fsspec  # here, not at import: a reader process opening local tars never needs it

    for item in braceexpand.braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(item)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(c in item for c in GLOB_CHARS):
            found = sorted(fs.glob(path))
            if not found:
                raise ShardListError(f"no tar matches {item!r}")
            urls.extend(prefix + p for p in found if p.endswith(".tar"))
        elif item.endswith(".tar"):
            urls.append(item)
        elif fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not found:
                raise ShardListError(f"no *.tar in folder {item!r}")
            urls.extend(prefix + p for p in found)
        else:
            raise ShardListError(f"input {item!r} is neither a .tar, a folder of tars nor a pattern")
    return urls


def expand_shards(input_tars: str | Iterable[str]) -> list[ShardRef]:
    """All shards named by `input_tars`, in the given order (sorted within a glob or folder).

    Two different tars with the same stem are an error naming both; the same URL twice is listed once.
    """
    patterns = [input_tars] if isinstance(input_tars, str) else list(input_tars)
    refs: dict[str, ShardRef] = {}
    for pattern in patterns:
        for url in _expand_one(pattern):
            ref = ShardRef(stem=shard_stem(url), url=url)
            seen = refs.get(ref.stem)
            if seen is not None and seen.url != url:
                raise ShardListError(f"two tars share the shard name {ref.stem!r}: {seen.url} and {url}")
            refs.setdefault(ref.stem, ref)
    if not refs:
        raise ShardListError(f"input_tars {input_tars!r} names no tar")
    return list(refs.values())


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the tar: pipe: through webdataset's gopen, a local path (no scheme) with open(), the
    same file fsspec's local file system opens, everything else through fsspec."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if "://" not in url:
        return open(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()

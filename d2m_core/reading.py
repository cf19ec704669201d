"""Tar reading: one pass over an img2dataset tar with webdataset, grouped into samples by key."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from d2m_core.shards import ShardRef, open_shard

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")  # the seed's rename order: image="jpg;png;jpeg;webp"


class ShardReadError(RuntimeError):
    """The shard cannot be opened or is not a tar at all; names the file."""


@dataclass
class RawSample:
    """The members of one sample as stored: encoded image bytes, caption text, parsed json."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    problem: str | None = None  # set when the sample cannot be used (missing image, bad json, ...)

    @property
    def uid(self) -> str | None:
        uid = self.json.get("uid") if self.json else None
        return str(uid) if uid is not None else None

    @property
    def image(self) -> bytes | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return self.members[ext]
        return None

    @property
    def text(self) -> str | None:
        data = self.members.get("txt")
        return None if data is None else data.decode("utf-8", errors="replace")


def _finish(sample: RawSample) -> RawSample:
    if "json" in sample.members:
        try:
            parsed = json.loads(sample.members["json"])
            sample.json = parsed if isinstance(parsed, dict) else None
            if sample.json is None:
                sample.problem = "json member is not an object"
        except ValueError as err:
            sample.problem = f"json member is not valid JSON: {err}"
    if sample.problem is None and sample.image is None:
        sample.problem = f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"
    return sample


def iter_samples(shard: ShardRef) -> Iterator[RawSample]:
    """Yield the samples of a tar in tar order; a sample's members are consecutive, as webdataset expects.

    Raises ShardReadError if the tar cannot be opened or read from the start. A tar that breaks part way
    yields the samples before the break, then a RawSample with key '<truncated>' carrying the reason.
    """
    try:
        stream = open_shard(shard.url)
    except (OSError, ValueError) as err:
        raise ShardReadError(f"cannot open shard {shard.url}: {err}") from err
    current: RawSample | None = None
    count = 0
    try:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is not None and (prefix != current.key or suffix.lower() in current.members):
                yield _finish(current)
                count += 1
                current = None
            if current is None:
                current = RawSample(key=prefix)
            current.members[suffix.lower()] = member["data"]
        if current is not None:
            yield _finish(current)
            count += 1
    except (tarfile.TarError, OSError, EOFError) as err:
        if count == 0 and current is None:
            raise ShardReadError(f"shard {shard.url} is not a readable tar: {err}") from err
        if current is not None:
            yield _finish(current)
        yield RawSample(key="<truncated>", problem=f"tar is truncated or corrupt after {count} samples: {err}")
    finally:
        stream.close()

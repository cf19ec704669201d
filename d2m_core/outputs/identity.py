"""What produced a shard's asset: the input tar (URL, size, mtime or ETag), where its files go, and the
weights (sha256) of the models it ran. Recorded with every materialization; a shard is skipped only when
all of it matches what a run would use now.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.outputs.records import WeightsRecord
from d2m_core.reading.shards import ShardRef

# The parts of an identity, each recorded as its own digest so that a mismatch says what changed.
PARTS = ("tar", "output", "weights")


def tar_identities(refs: Sequence[ShardRef]) -> dict[str, dict[str, Any] | None]:
    """Each tar's identity by stem: local {url, size, mtime_ns}; object stores {url, size, etag} (one listing
    per folder); pipe: {url} only. None for a tar that does not exist."""
    found: dict[str, dict[str, Any] | None] = {}
    remote: dict[str, list[ShardRef]] = {}
    for ref in refs:
        if ref.url.startswith("pipe:"):
            found[ref.stem] = {"url": ref.url}
        elif "://" not in ref.url or ref.url.startswith("file://"):
            path = ref.url.removeprefix("file://")
            try:
                st = os.stat(path)
            except OSError:
                found[ref.stem] = None
                continue
            found[ref.stem] = {"url": ref.url, "size": st.st_size, "mtime_ns": st.st_mtime_ns} if os.path.isfile(path) else None
        else:
            remote.setdefault(ref.url.rsplit("/", 1)[0], []).append(ref)
    for folder, members in remote.items():
        fs, path = fsspec.core.url_to_fs(folder)
        fs.invalidate_cache(path)
        try:
            listing = {entry["name"].rsplit("/", 1)[-1]: entry for entry in fs.ls(path, detail=True)}
        except FileNotFoundError:
            listing = {}
        for ref in members:
            entry = listing.get(ref.url.rsplit("/", 1)[-1])
            etag = (entry or {}).get("ETag") or (entry or {}).get("etag")
            found[ref.stem] = None if entry is None else {"url": ref.url, "size": entry.get("size"),
                                                         "etag": str(etag).strip('"') if etag else None}
    return found


def weights_by_model(records: Iterable[WeightsRecord]) -> dict[str, str]:
    """model -> sha256 of its weights ('random' for random weights)."""
    return {r.model: (r.sha256 or r.kind) for r in records}


def asset_models(config: D2MConfig, asset: str) -> list[str]:
    """The weights an asset's output depends on, by model name (shard_metadata: all of the config's)."""
    if asset == catalog.METADATA_ASSET:
        return sorted({m for a in catalog.assets_for_config(config.models, config.postprocess_columns,
                                                             config.postprocess_features)
                       if a != catalog.METADATA_ASSET for m in asset_models(config, a)})
    if asset == catalog.REFERENCE_ASSET:
        return [catalog.REFERENCE_WEIGHTS]
    if asset in catalog.SCORE_ASSETS:
        models = [m for p in catalog.SCORE_ASSETS[asset].parents for m in asset_models(config, p)]
        return [*models, *filter(None, [catalog.model_for_asset(asset)])]
    model = catalog.model_for_asset(asset)
    return [model] if model else []


@dataclass(frozen=True)
class Identity:
    """One shard asset's identity: a digest per part (tar, output, weights) and the whole as data version."""

    parts: dict[str, str]
    detail: dict[str, Any]

    @property
    def version(self) -> str:
        return version_of(self.parts)

    def differences(self, recorded: dict[str, str]) -> list[str]:
        """What differs from a recorded identity (its parts), e.g. ['tar', 'weights']."""
        return [p for p in PARTS if recorded.get(p) != self.parts.get(p)]


def asset_identity(config: D2MConfig, asset: str, tar: dict[str, Any] | None, weights: dict[str, str]) -> Identity:
    """The identity of `asset` of one shard: its tar, where it is written, and its models' weights."""
    output = {"artifacts": config.artifacts_root}
    if asset == catalog.METADATA_ASSET:
        output |= {"output_metadata_dir": config.output_metadata_dir, "columns": list(config.postprocess_columns),
                   "features": list(config.postprocess_features), "fields": list(config.additional_fields or []),
                   "datacomp_keys": config.use_datacomp_keys}
    used = {m: weights.get(m, "unknown") for m in asset_models(config, asset)}
    detail = {"tar": tar, "output": output, "weights": used}
    return Identity(parts={p: _digest(detail[p]) for p in PARTS}, detail=detail)


def version_of(parts: dict[str, str]) -> str:
    """The data version of an identity, from the digests of its parts."""
    return _digest(parts)


def tar_digest(tar: dict[str, Any] | None) -> str:
    """The tar part of an identity (what the discovery sensor records when it registers or re-checks a tar)."""
    return _digest(tar)


REASONS = {"tar": "its tar changed", "output": "the output location changed", "weights": "the weights changed"}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

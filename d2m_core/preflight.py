"""Checks before any state or compute: every named tar exists, the output location is writable, the weights
are present. Each failure is one line naming the path and what to do.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.outputs.identity import tar_identities
from d2m_core.outputs.records import WeightsRecord
from d2m_core.reading.shards import ShardRef, expand_shards
from d2m_core.selection import verify_weights

PROBE_PREFIX = ".d2m-write-probe-"


class PreflightError(ValueError):
    """An input, output or weights problem found before anything ran; the message is one line."""


@dataclass
class Preflight:
    """What a run will use: its shards with their tars' identities, and the weights records."""

    shards: list[ShardRef]
    tars: dict[str, dict[str, Any]]
    weights: list[WeightsRecord]


def check_inputs(config: D2MConfig) -> tuple[list[ShardRef], dict[str, dict[str, Any]]]:
    """Every tar input_tars names, with its identity; raises naming the first missing tar."""
    refs = expand_shards(config.input_tars)
    found = tar_identities(refs)
    missing = [r for r in refs if found.get(r.stem) is None]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PreflightError(f"input tar not found: {missing[0].url}{more}; download it or fix input_tars "
                             f"({config.input_tars!r})")
    return refs, {stem: identity for stem, identity in found.items() if identity is not None}


def check_output(config: D2MConfig) -> None:
    """Write and delete a probe file in output_metadata_dir and in the artifacts folder."""
    for folder in dict.fromkeys([config.output_metadata_dir, config.artifacts_root]):
        probe = storage.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}")
        try:
            storage.write_bytes_atomic(probe, b"d2m")
            storage.remove(probe)
        except OSError as err:
            cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
            reason = cause.strerror or str(cause)
            raise PreflightError(f"output folder {folder} is not writable ({reason}); fix its permissions or "
                                 "set output_metadata_dir to a writable folder") from None


def preflight(config: D2MConfig) -> Preflight:
    """All checks, cheapest first: inputs, weights (each file hashed once), then the output probe."""
    refs, tars = check_inputs(config)
    weights = verify_weights(config)
    check_output(config)
    return Preflight(shards=refs, tars=tars, weights=weights)

"""Plain records shared by the engine, the writers and the assets: failures, weights used, shard stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckOutcome:
    """One per-shard check's result (d2m_core.outputs.validation), recorded as a Dagster check evaluation."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleFailure:
    """A sample that could not be used: never dropped silently, always recorded with its reason."""

    key: str
    uid: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WeightsRecord:
    """Which weights a model ran with, as far as d2m knows: "official" (the sha256 the seed or the upstream
    release pins matched; `source` is that release), "user" (a file nobody upstream pins: its path and sha256,
    no source, no claim of origin), "random" (tests, demos, benchmarks), "custom" (a plugin's own weights)."""

    model: str
    kind: str  # "official" | "user" | "random" | "custom"
    path: str | None = None
    sha256: str | None = None
    source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ShardStats:
    """Counts and timings of one shard's pass; samples_read == samples_written + samples_failed."""

    shard: str
    samples_read: int = 0
    samples_written: int = 0
    failures: list[SampleFailure] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def samples_failed(self) -> int:
        return len(self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "samples_read": self.samples_read,
            "samples_written": self.samples_written,
            "samples_failed": self.samples_failed,
            "failures": [f.as_dict() for f in self.failures],
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardStats":
        return cls(
            shard=data["shard"],
            samples_read=int(data["samples_read"]),
            samples_written=int(data["samples_written"]),
            failures=[SampleFailure(**f) for f in data.get("failures", [])],
            timings=dict(data.get("timings", {})),
        )


@dataclass
class ShardOutcome:
    """What happened to one shard for one asset: counts, files written, or the error that stopped it."""

    stem: str
    stats: ShardStats | None = None
    paths: dict[str, str] = field(default_factory=dict)
    weights: list[WeightsRecord] = field(default_factory=list)
    samples_per_s: float = 0.0
    error: str | None = None
    checks: list[CheckOutcome] = field(default_factory=list)  # when shard_metadata was written
    quantiles: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # asset-specific facts for its materialization

    @property
    def weights_kind(self) -> str:
        """The least verified kind among the weights used: random, then user, custom, official; none if none."""
        kinds = {w.kind for w in self.weights}
        return next((k for k in ("random", "user", "custom", "official") if k in kinds), "none")

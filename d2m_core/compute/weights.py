"""Local model weights: where they live, sha256 checks, clear errors, and the random-weights opt-in."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from d2m_core.outputs.records import WeightsRecord

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_ENV = "D2M_RANDOM_WEIGHTS"
WEIGHTS_DIR_ENV = "D2M_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "d2m" / "weights"


class WeightsError(RuntimeError):
    """A weights file is missing or does not match its sha256; the message says which and how to get it."""


@dataclass(frozen=True)
class PixelNorm:
    """The input normalisation a network was trained with, on 0-255 pixel values: (p - mean) / std."""

    mean: float
    std: float


@dataclass(frozen=True)
class WeightsFile:
    """One accepted file for a model: its name in the weights directory, format, the sha256 the seed or the
    upstream release publishes (None when it publishes none), where the official file is, and (for models whose
    input scale depends on the file) its input normalisation. `sha256_prefix`: the only pin some releases give
    (torch.hub names files by the first 8 hex digits of their sha256)."""

    filename: str
    format: str  # e.g. "openai-jit", "open_clip"
    sha256: str | None
    source: str
    input_norm: PixelNorm | None = None
    sha256_prefix: str | None = None


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a model will load: a verified file, or random initialisation when asked for."""

    record: WeightsRecord
    file: WeightsFile | None = None

    @property
    def is_random(self) -> bool:
        return self.record.kind == "random"

    @property
    def path(self) -> Path:
        assert self.record.path is not None, "random weights have no file"
        return Path(self.record.path)


def random_weights_enabled() -> bool:
    """True when D2M_RANDOM_WEIGHTS asks for random weights of the real architectures."""
    return os.environ.get(RANDOM_WEIGHTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def weights_dir(configured: str | None = None) -> Path:
    """The weights directory: the config's `weights_dir`, else $D2M_WEIGHTS_DIR, else ~/.cache/d2m/weights."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_DIR


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed once per process for an unchanged file (the preflight check and each
    model load of a run verify the same multi-GB files)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(model: str, accepted: list[WeightsFile], directory: Path) -> ResolvedWeights:
    """Find and verify the first accepted file present in `directory`, or return random weights if enabled.

    What the record says is what is known (`WeightsRecord.kind`):
    - "official": the entry pins the file's sha256 (or the release's sha256 prefix) and the file matches; the
      record carries the release's source. A file that does not match raises WeightsError.
    - "user": nothing upstream pins the file; its sha256 is recorded, with no source (no claim of origin).
      A `<file>.sha256` sidecar, if present, must match it (a check against corruption, not of origin).
    - "random": D2M_RANDOM_WEIGHTS asked for random weights.
    """
    if random_weights_enabled():
        log.warning("%s: using RANDOM weights (%s=1); outputs are flagged 'weights: random'", model, RANDOM_WEIGHTS_ENV)
        return ResolvedWeights(WeightsRecord(model=model, kind="random"))
    for spec in accepted:
        path = directory / spec.filename
        if not path.is_file():
            continue
        actual = sha256_of(path)
        if spec.sha256 is not None or spec.sha256_prefix is not None:
            pin = spec.sha256 or spec.sha256_prefix or ""
            if not actual.startswith(pin.lower()) or (spec.sha256 is not None and actual != spec.sha256.lower()):
                raise WeightsError(
                    f"{model}: {path} has sha256 {actual}, expected {pin}{'' if spec.sha256 else '...'} "
                    f"(the release's pin); the file is corrupt or not the right one: download it again from "
                    f"{spec.source}"
                )
            record = WeightsRecord(model=model, kind="official", path=str(path), sha256=actual, source=spec.source)
            return ResolvedWeights(record, spec)
        sidecar = path.with_name(path.name + ".sha256")
        if sidecar.is_file():
            expected = sidecar.read_text().split()[0].strip().lower()
            if actual != expected:
                raise WeightsError(f"{model}: {path} has sha256 {actual}, but {sidecar} says {expected}: "
                                   f"the file is corrupt or not the one the sidecar describes")
        else:
            log.warning("%s: %s is user-supplied (upstream pins no sha256); recording sha256 %s", model, path, actual)
        record = WeightsRecord(model=model, kind="user", path=str(path), sha256=actual)
        return ResolvedWeights(record, spec)
    wanted = " or ".join(str(directory / s.filename) for s in accepted)
    sources = "; ".join(f"{s.filename}: {s.source}" for s in accepted)
    raise WeightsError(
        f"{model}: weights not found: put {wanted} (`d2m weights download --yml <your yml>` fetches every "
        f"missing file; sources: {sources}), set weights_dir / ${WEIGHTS_DIR_ENV} to the folder holding them, "
        f"or set {RANDOM_WEIGHTS_ENV}=1 to run with random weights (tests, demos)"
    )


def plugin_weights(model: str, path: str) -> ResolvedWeights:
    """A custom_pypath model's weights record: it loads its own weights."""
    return ResolvedWeights(WeightsRecord(model=model, kind="custom", source=path))

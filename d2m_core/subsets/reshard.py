"""Reshard the original tars to a uid subset (DataComp's resharder.py), one output shard at a time.

The plan (`plan_reshard`) reads each metadata shard's uid column once and counts, per input shard, how many
samples the subset keeps (a uid listed n times in the subset file is kept n times, as `<uid>-0` ...
`<uid>-{n-1}`). Kept samples are numbered in input order (input shards sorted, tar order within one);
output shard i holds numbers [i * shard_size, (i + 1) * shard_size). So each output shard is written on its
own (`write_output_shard`): a killed reshard resumes at the shards not yet written, and each is the same
whenever it is written.

Only samples that are rows of the metadata are kept: samples the metadata recorded as failures never
appear. Each kept sample keeps its members (its json keeps its uid); with `apply_blur` the image of a sample
with face boxes is blurred and re-encoded as WebP (`blur.py`); with `inject_blur_metadata` its boxes are
added to its json as `face_bboxes`. Output: `{i:08d}.tar`, then `{i:08d}_stats.json` (img2dataset's
fields, written last), each complete or absent; `sample_ids.npy` (the subset) and `reshard_plan.json`.
The output folder is valid d2m input.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from d2m_core.config import D2MConfig, ReshardSpec
from d2m_core.outputs import storage
from d2m_core.reading.reading import ShardReadError, iter_samples
from d2m_core.reading.shards import ShardRef
from d2m_core.subsets import pool, uids
from d2m_core.subsets.blur import BlurError, blur_encoded
from d2m_core.testdata.pausepoints import pause_at

PLAN_FILE = "reshard_plan.json"
SUBSET_COPY = "sample_ids.npy"
OUTPUT_NAME = "{:08d}"


class ReshardError(RuntimeError):
    """The metadata and the tars disagree, or the output folder holds another reshard; names what."""


@dataclass(frozen=True)
class PlanInput:
    """One input shard: where its tar and metadata are, how many samples it contributes, from which number."""

    stem: str
    tar: str
    parquet: str
    json: str
    kept: int
    start: int


@dataclass
class ReshardPlan:
    """Which kept samples go to which output shard, and how they are written."""

    subset_sha256: str
    subset_size: int
    shard_size: int
    apply_blur: bool
    inject_blur_metadata: bool
    inputs: list[PlanInput] = field(default_factory=list)
    pool_size: int = 0

    @property
    def total(self) -> int:
        return self.inputs[-1].start + self.inputs[-1].kept if self.inputs else 0

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    @property
    def not_found(self) -> int:
        """Subset entries no metadata row matched (DataComp's resharder warns about the same count)."""
        return max(0, self.subset_size - self.total)

    def shard_names(self) -> list[str]:
        return [OUTPUT_NAME.format(i) for i in range(self.num_shards)]

    def same_output(self, other: ReshardPlan) -> bool:
        mine, theirs = asdict(self), asdict(other)
        return mine == theirs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total": self.total, "num_shards": self.num_shards, "not_found": self.not_found}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReshardPlan:
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        fields["inputs"] = [PlanInput(**i) for i in fields.get("inputs", [])]
        return cls(**fields)


@dataclass
class OutputShard:
    """What one output shard got: samples, blurred images, source shards, files (or the error that stopped it)."""

    name: str
    samples: int = 0
    blurred: int = 0
    sources: list[str] = field(default_factory=list)
    tar: str = ""
    stats: str = ""
    seconds: float = 0.0
    error: str | None = None


def subset_digest(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys).tobytes()).hexdigest()


def plan_reshard(metadata_dir: str, input_tars: str | list[str], subset: np.ndarray, *, shard_size: int = 10_000,
                 apply_blur: bool = False, inject_blur_metadata: bool = False) -> ReshardPlan:
    """Count the kept samples of each input shard (uid columns only); inputs are the complete metadata shards."""
    from d2m_core.reading.shards import expand_shards

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tars = {ref.stem: ref.url for ref in expand_shards(input_tars)}
    shards = pool.list_pool(metadata_dir)
    if not shards:
        raise pool.PoolError(f"no complete metadata shard in {metadata_dir}")
    if apply_blur or inject_blur_metadata:
        pool.resolve_columns(shards[0], ["face_bboxes"])  # blurring needs the face boxes: say how to get them
    plan = ReshardPlan(subset_digest(subset), int(len(subset)), shard_size, apply_blur, inject_blur_metadata)
    start = 0
    for shard in shards:
        if shard.stem not in tars:
            raise ReshardError(f"metadata shard {shard.stem} has no tar in input_tars {input_tars!r}")
        keys = uids.column_keys(pool.read_columns(shard, ["uid"])["uid"], where=shard.parquet)
        kept = int(uids.multiplicity(subset, keys).sum())
        plan.pool_size += len(keys)
        plan.inputs.append(PlanInput(shard.stem, tars[shard.stem], shard.parquet, shard.json, kept, start))
        start += kept
    return plan


def write_plan(output_dir: str, plan: ReshardPlan, subset: np.ndarray) -> None:
    """Write the plan and the subset copy; a folder holding a different plan is an error (no mixed outputs)."""
    url = storage.join(output_dir, PLAN_FILE)
    if storage.exists(url):
        existing = ReshardPlan.from_dict(storage.read_json(url))
        if not existing.same_output(plan):
            raise ReshardError(f"{output_dir} holds another reshard ({PLAN_FILE} differs: other subset, shard size, "
                               "blur or input): use an empty output folder, or remove it first")
        return
    uids.save_uid_file(storage.join(output_dir, SUBSET_COPY), subset)
    storage.write_json(url, plan.as_dict())


def read_plan(output_dir: str) -> ReshardPlan:
    return ReshardPlan.from_dict(storage.read_json(storage.join(output_dir, PLAN_FILE)))


def plan_version(plan: ReshardPlan, output_dir: str) -> str:
    """What a plan's output shards are: the plan (subset, shard size, blur, inputs) and the folder they go to.
    Recorded as the data version of `reshard_plan` and of each output shard it writes."""
    raw = json.dumps({"plan": plan.as_dict(), "output_dir": output_dir}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def shard_done(output_dir: str, index: int) -> bool:
    return storage.exists(storage.join(output_dir, OUTPUT_NAME.format(index) + "_stats.json"))


def _wanted(plan: ReshardPlan, item: PlanInput, subset: np.ndarray, lo: int, hi: int) -> tuple[dict[str, list[int]], dict[str, list]]:
    """uid -> copy numbers for the kept samples lo..hi-1 of this input (numbers local to it), and their boxes."""
    logical = ["uid"] + (["face_bboxes"] if plan.apply_blur or plan.inject_blur_metadata else [])
    shard = pool.PoolShard(item.stem, item.parquet, item.parquet[: -len(".parquet")] + ".npz", item.json)
    cols = pool.read_columns(shard, logical)
    row_uids = cols["uid"].to_pylist()
    counts = uids.multiplicity(subset, uids.column_keys(cols["uid"], where=item.parquet))
    if int(counts.sum()) != item.kept:
        raise ReshardError(f"{item.parquet} changed since the reshard was planned: rerun the plan")
    wanted: dict[str, list[int]] = {}
    boxes: dict[str, list] = {}
    number = 0
    for row in np.flatnonzero(counts):
        n = int(counts[row])
        first, last = max(lo, number), min(hi, number + n)
        if first < last:
            uid = row_uids[row]
            wanted.setdefault(uid, []).extend(range(first - number, last - number))
            if "face_bboxes" in cols:
                boxes[uid] = cols["face_bboxes"][int(row)].as_py() or []
        number += n
        if number >= hi:
            break
    return wanted, boxes


def _failed_keys(json_url: str) -> set[str]:
    record = storage.read_json(json_url)
    return {f.get("key") for f in record.get("failures", []) if isinstance(f, dict)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_output_shard(plan: ReshardPlan, subset: np.ndarray, output_dir: str, index: int) -> OutputShard:
    """Write output shard `index` from the input tars it draws on: its tar, then its stats json."""
    began = time.time()
    lo, hi = index * plan.shard_size, min(plan.total, (index + 1) * plan.shard_size)
    if not 0 <= lo < hi:
        raise ReshardError(f"output shard {index} is outside the plan's {plan.num_shards} shard(s)")
    name = OUTPUT_NAME.format(index)
    tar_url = storage.join(output_dir, name + ".tar")
    written = blurred = 0
    sources: list[str] = []
    with storage.open_atomic(tar_url) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for item in plan.inputs:
            first, last = max(lo, item.start), min(hi, item.start + item.kept)
            if first >= last:
                continue
            sources.append(item.stem)
            wanted, boxes = _wanted(plan, item, subset, first - item.start, last - item.start)
            failed = _failed_keys(item.json)
            expected = sum(len(v) for v in wanted.values())
            got = 0
            for sample in iter_samples(ShardRef(item.stem, item.tar)):
                if sample.problem is not None or sample.key in failed or sample.uid not in wanted:
                    continue
                copies = wanted.pop(sample.uid)
                members = dict(sample.members)
                sample_boxes = boxes.get(sample.uid) or []
                if sample_boxes and plan.apply_blur:
                    ext = next(e for e in ("jpg", "png", "jpeg", "webp") if e in members)
                    try:
                        members["webp"] = blur_encoded(members.pop(ext), sample_boxes)
                    except BlurError as err:
                        raise ReshardError(f"{item.tar}: sample {sample.key}: {err}") from None
                    blurred += len(copies)
                if sample_boxes and plan.inject_blur_metadata:
                    members["json"] = json.dumps(sample.json | {"face_bboxes": sample_boxes}).encode("utf-8")
                for copy in copies:
                    for ext, data in members.items():
                        _add(tar, f"{sample.uid}-{copy}.{ext}", data)
                got += len(copies)
            if got != expected:
                raise ReshardError(f"{item.tar}: {expected - got} kept sample(s) of the metadata not found in the tar "
                                   f"(uids {', '.join(list(wanted)[:3])}...): the tar changed since its metadata")
            written += got
    ended = time.time()
    stats_url = storage.join(output_dir, name + "_stats.json")
    storage.write_json(stats_url, {
        "count": written, "successes": written, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": round(ended - began, 3), "start_time": began, "end_time": ended,
        "status_dict": {"success": written}, "blurred": blurred, "sources": sources,
        "subset_sha256": plan.subset_sha256})
    return OutputShard(name, written, blurred, sources, tar_url, stats_url, ended - began)


def reshard(metadata_dir: str, input_tars: str | list[str], subset_url: str, output_dir: str, *,
            shard_size: int = 10_000, apply_blur: bool = False, inject_blur_metadata: bool = False,
            shards: Sequence[int] | None = None,
            progress: Callable[[OutputShard], None] | None = None) -> tuple[ReshardPlan, list[OutputShard]]:
    """Plan (or resume) a reshard and write every output shard not yet written; returns what was written now."""
    subset = uids.load_uid_file(subset_url)
    plan = plan_reshard(metadata_dir, input_tars, subset, shard_size=shard_size, apply_blur=apply_blur,
                        inject_blur_metadata=inject_blur_metadata)
    write_plan(output_dir, plan, subset)
    storage.sweep_partial_files(output_dir)  # what a killed reshard left (local folders; a no-op on S3)
    todo = [i for i in (shards if shards is not None else range(plan.num_shards)) if not shard_done(output_dir, i)]
    written = []
    for index in todo:
        written.append(write_output_shard(plan, subset, output_dir, index))
        if progress:
            progress(written[-1])
    return plan, written


def _output_files(output_dir: str) -> list[str]:
    import re

    import fsspec

    fs, root = fsspec.core.url_to_fs(output_dir)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    pattern = re.compile(r"^\d{8}(\.tar|_stats\.json)$")
    return [storage.join(output_dir, n) for n in sorted(names) if pattern.match(n)]


def replace_plan(output_dir: str, plan: ReshardPlan, subset: np.ndarray) -> list[str]:
    """Make `plan` the folder's plan (the asset's way): an older, different plan's output shards are removed
    first, so the folder never holds shards of two plans; returns the files removed."""
    url = storage.join(output_dir, PLAN_FILE)
    if storage.exists(url) and ReshardPlan.from_dict(storage.read_json(url)).same_output(plan):
        return []
    removed = []
    for path in _output_files(output_dir):
        if path.endswith("_stats.json"):  # completion markers first: a shard is never shown complete while removed
            storage.remove(path)
            removed.append(path)
    for path in _output_files(output_dir):
        storage.remove(path)
        removed.append(path)
    uids.save_uid_file(storage.join(output_dir, SUBSET_COPY), subset)
    storage.write_json(url, plan.as_dict())
    return removed


def check_folder(output_dir: str, subset: np.ndarray, *, shard_size: int, apply_blur: bool,
                 inject_blur_metadata: bool) -> None:
    """Refuse, before any work, a folder whose plan is of another subset, shard size or blur (a resume of the
    same reshard passes; a change of input is caught when the plan is written)."""
    url = storage.join(output_dir, PLAN_FILE)
    if not storage.exists(url):
        return
    existing = ReshardPlan.from_dict(storage.read_json(url))
    if (existing.subset_sha256, existing.shard_size, existing.apply_blur, existing.inject_blur_metadata) != (
            subset_digest(subset), shard_size, apply_blur, inject_blur_metadata):
        raise ReshardError(f"{output_dir} holds another reshard ({PLAN_FILE} differs: other subset, shard size or "
                           "blur): use an empty output folder, or remove it first")


def plan_for(config: D2MConfig, spec: ReshardSpec, subset_url: str, *, replace: bool) -> tuple[ReshardPlan, list[str]]:
    """Plan the reshard `spec` of the config's metadata and input tars to the uid file at `subset_url`, and make
    it the output folder's plan: `replace` removes an older plan's shards (the asset of the yml's `reshard`
    section); otherwise a folder holding another plan is refused (`d2m reshard`). Returns the plan and the
    files removed."""
    subset = uids.load_uid_file(subset_url)
    plan = plan_reshard(config.output_metadata_dir, config.input_tars, subset, shard_size=spec.shard_size,
                        apply_blur=spec.apply_blur, inject_blur_metadata=spec.inject_blur_metadata)
    removed = replace_plan(spec.output_dir, plan, subset) if replace else []
    if not replace:
        write_plan(spec.output_dir, plan, subset)
    storage.sweep_partial_files(spec.output_dir)  # what a killed reshard left (local folders; a no-op on S3)
    return plan, removed


def plan_for_config(config: D2MConfig) -> tuple[ReshardPlan, list[str]]:
    """The reshard plan of the config's `reshard` section, from its filter's uid file."""
    from d2m_core.subsets.filters import uid_file_url

    spec = config.reshard
    if spec is None:
        raise ReshardError("the config has no `reshard` section")
    return plan_for(config, spec, uid_file_url(config, spec.subset), replace=True)


def write_shards(output_dir: str, names: Sequence[str]) -> Iterator[OutputShard]:
    """Write these output shards of the folder's plan (its reshard_plan.json and sample_ids.npy); a shard that
    fails does not stop the others."""
    plan = read_plan(output_dir)
    subset = uids.load_uid_file(storage.join(output_dir, SUBSET_COPY))
    for name in names:
        try:
            shard = write_output_shard(plan, subset, output_dir, int(name))
        except (ReshardError, ShardReadError, pool.PoolError, OSError, ValueError) as err:
            shard = OutputShard(name, error=f"{type(err).__name__}: {err}")
        pause_at("reshard-shard-written", name)
        yield shard

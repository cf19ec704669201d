"""DataComp's filtering baselines over a d2m metadata folder: the same uid sets as its apply_filter.py.

Every baseline streams the pool shard by shard, reading only the columns it needs (and `l14_img` of the npz
for the image-based ones); a top-fraction threshold is the exact value DataComp computes, found in bounded
memory (`threshold.kth_largest`). The result is DataComp's uid file content (`u8,u8` keys, sorted) plus
counts and a histogram of the score the baseline thresholds, if any.

| baseline | keeps a sample when |
| --- | --- |
| no_filter | always |
| clip_score | its B/32 or L/14 score >= threshold (or the threshold of the top `fraction`) |
| laion2b | gcld3 says English and its B/32 score >= 0.28 |
| basic_filter | fastText says English, > 2 words (split on whitespace), > 5 characters, shorter image side >= 200, aspect <= 3 |
| text_based | fastText says English and a word's first WordNet synset is an ImageNet-21k class |
| image_based | fastText English, > 1 fastText token, > 5 characters, and its L/14 image feature's nearest pool centroid is nearest to some ImageNet-1k image |
| image_based_intersect_clip_score | clip_score first (threshold or fraction over the whole pool), then image_based |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from d2m_core.config import D2MConfig, FilterSpec
from d2m_core.outputs import storage
from d2m_core.subsets import pool, threshold, uids
from d2m_core.subsets.filter_files import DataFile, files_for, resolve_data_file
from d2m_core.subsets.pool import PoolShard

log = logging.getLogger(__name__)

LAION2B_THRESHOLD = 0.28
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 201)  # score histogram: 0.01 wide bins over CLIP's range
READ_THREADS = 4


@dataclass
class FilterResult:
    """A baseline's outcome: the kept keys (sorted), pool size, threshold used, histogram, data files."""

    spec: FilterSpec
    keys: np.ndarray
    pool_size: int
    shards: int
    threshold: float | None = None
    score_column: str | None = None
    histogram: np.ndarray | None = None  # counts over HISTOGRAM_EDGES (pool), for the score thresholded
    files: list[DataFile] = field(default_factory=list)
    seconds: float = 0.0
    threshold_passes: int = 0

    @property
    def kept(self) -> int:
        return int(len(self.keys))

    @property
    def fraction(self) -> float:
        return self.kept / self.pool_size if self.pool_size else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"baseline": self.spec.name, "pool_size": self.pool_size, "kept": self.kept,
                               "fraction_kept": round(self.fraction, 6), "shards": self.shards,
                               "seconds": round(self.seconds, 3)}
        if self.threshold is not None:
            out |= {"threshold": self.threshold, "score": self.score_column}
        if self.files:
            out["data_files"] = [f.as_dict() for f in self.files]
        return out

    def histogram_rows(self) -> list[tuple[float, float, int]]:
        """Non-empty span of the histogram as (low, high, count) rows."""
        if self.histogram is None or not self.histogram.any():
            return []
        nz = np.flatnonzero(self.histogram)
        lo, hi = nz[0], nz[-1] + 1
        return [(float(HISTOGRAM_EDGES[i]), float(HISTOGRAM_EDGES[i + 1]), int(self.histogram[i])) for i in range(lo, hi)]


def _texts(column: pa.ChunkedArray) -> list[str]:
    return ["" if t is None else t for t in column.to_pylist()]


def _score_key(spec: FilterSpec) -> str | None:
    if spec.name == "laion2b":
        return "clip_b32"
    return {"b32": "clip_b32", "l14": "clip_l14"}.get(spec.arch or "")


class _Baseline:
    """Per-shard decisions of one baseline, its data files loaded once."""

    def __init__(self, spec: FilterSpec, files: dict[str, DataFile], device: Any) -> None:
        self.spec = spec
        self.files = files
        self.score = _score_key(spec)
        self.threshold: float | None = LAION2B_THRESHOLD if spec.name == "laion2b" else spec.threshold
        self.language = None
        if "fasttext" in files:
            from d2m_core.subsets.language import FastTextLanguage

            self.language = FastTextLanguage(files["fasttext"].path)
        self.entities = None
        if spec.name == "text_based":
            from d2m_core.subsets.language import WordNetEntities

            self.entities = WordNetEntities(files["wordnet"].path, files["imagenet21k_wordnet_ids"].path)
        self.centroids = None
        if spec.name.startswith("image_based"):
            from d2m_core.subsets.centroids import CentroidMatcher

            self.centroids = CentroidMatcher(files[f"{spec.image_based_scale}_centroids"].path,
                                             files["in1k_clip_vit_l14"].paths, device, spec.batch_size)

    def columns(self) -> list[str]:
        wanted = ["uid"]
        if self.spec.name == "basic_filter":
            wanted += ["text", "original_width", "original_height"]
        elif self.spec.name in ("text_based", "laion2b") or self.spec.name.startswith("image_based"):
            wanted.append("text")
        if self.score is not None:
            wanted.append(self.score)
        return wanted

    def keep(self, shard: PoolShard) -> tuple[np.ndarray, int, np.ndarray | None]:
        """(kept keys, rows in the shard, histogram of the score column or None)."""
        cols = pool.read_columns(shard, self.columns())
        keys = uids.column_keys(cols["uid"], where=shard.parquet)
        rows = len(keys)
        mask = np.ones(rows, bool)
        hist = None
        if self.score is not None:
            scores = cols[self.score].to_numpy()
            hist = np.histogram(scores, HISTOGRAM_EDGES)[0]
            if self.threshold is not None:
                mask &= scores >= self.threshold
        name = self.spec.name
        if name == "basic_filter":
            mask &= self._basic(cols)
        elif name == "laion2b":
            mask[mask] = _gcld3(_texts(cols["text"]), mask)
        elif name == "text_based":
            texts = _texts(cols["text"])
            mask &= self.language.languages(texts) == "en"
            idx = np.flatnonzero(mask)
            mask[idx] = self.entities.contains([texts[i] for i in idx])
        elif name.startswith("image_based"):
            mask &= self._image_based(shard, cols, mask)
        return (keys if mask.all() else keys[mask]), rows, hist

    def _basic(self, cols: dict[str, pa.ChunkedArray]) -> np.ndarray:
        texts = _texts(cols["text"])
        words = np.array([len(t.split()) for t in texts], np.int64)
        chars = np.array([len(t) for t in texts], np.int64)
        width = cols["original_width"].to_numpy(zero_copy_only=False).astype(np.float64)
        height = cols["original_height"].to_numpy(zero_copy_only=False).astype(np.float64)
        short, long = np.minimum(width, height), np.maximum(width, height)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = long / short
        english = self.language.languages(texts) == "en"
        return english & (words > 2) & (chars > 5) & (short >= 200) & (aspect <= 3.0)

    def _image_based(self, shard: PoolShard, cols: dict[str, pa.ChunkedArray], mask: np.ndarray) -> np.ndarray:
        texts = _texts(cols["text"])
        idx = np.flatnonzero(mask)
        chosen = [texts[i] for i in idx]
        caption_ok = ((self.language.languages(chosen) == "en")
                      & (self.language.token_counts(chosen) > 1)
                      & (np.array([len(t) for t in chosen], np.int64) > 5))
        idx = idx[caption_ok]
        out = np.zeros(len(mask), bool)
        if len(idx):
            features = pool.read_array(shard, "l14_img")
            if len(features) != len(mask):
                raise pool.PoolError(f"{shard.npz}: {len(features)} l14_img rows for {len(mask)} parquet rows")
            out[idx] = self.centroids.near_target(features[idx])
        return out


def _gcld3(texts: list[str], mask: np.ndarray) -> np.ndarray:
    from d2m_core.subsets.language import gcld3_english

    return gcld3_english([t for t, m in zip(texts, mask) if m])


def resolve_files(spec: FilterSpec, config: D2MConfig | None = None) -> dict[str, DataFile]:
    """Every data file the baseline reads, verified, before any shard is read (missing: WeightsError)."""
    weights = config.weights_dir if config else None
    return {name: resolve_data_file(name, weights, spec.data_files.get(name))
            for name in files_for(spec.name, spec.image_based_scale)}


def run_filter(spec: FilterSpec, shards: Sequence[PoolShard], *, config: D2MConfig | None = None,
               device: Any = "cpu", progress: Callable[[str], None] | None = None) -> FilterResult:
    """Apply one baseline to the pool; same uid set as DataComp's apply_filter.py on the same folder."""
    start = time.perf_counter()
    if not shards:
        raise pool.PoolError("no complete metadata shard ({shard}.parquet with its {shard}.json) in the folder")
    files = resolve_files(spec, config)
    baseline = _Baseline(spec, files, device)
    passes = 0
    if spec.fraction is not None:
        selection = threshold.kth_largest(lambda: pool.score_columns(shards, baseline.score),
                                          lambda n: threshold.fraction_rank(n, spec.fraction))
        baseline.threshold = selection.value
        passes = selection.passes
        if progress:
            progress(f"threshold {selection.value!r} at rank {selection.rank} of {selection.count} "
                     f"({selection.passes} passes)")
    kept: list[np.ndarray] = []
    rows = 0
    hist = None
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool_threads:
        for i, (keys, n, h) in enumerate(pool_threads.map(baseline.keep, shards)):
            kept.append(keys)
            rows += n
            if h is not None:
                hist = h if hist is None else hist + h
            if progress and (i + 1) % 100 == 0:
                progress(f"{i + 1}/{len(shards)} shards filtered")
    keys = np.concatenate(kept) if kept else np.zeros(0, uids.UID_DTYPE)
    del kept
    keys = uids.sort_keys(keys)  # DataComp's order (high, then low)
    column = None
    if baseline.score is not None:
        column = pool.resolve_columns(shards[0], [baseline.score])[baseline.score]
    return FilterResult(spec, keys, rows, len(shards), baseline.threshold, column, hist, list(files.values()),
                        time.perf_counter() - start, passes)


def uid_file_url(config: D2MConfig, asset: str) -> str:
    """Where a filter asset keeps its uid file: <artifacts>/filters/<asset>.npy (its summary beside it, .json)."""
    return storage.join(config.artifacts_root, "filters", f"{asset}.npy")


def filter_pool(config: D2MConfig, spec: FilterSpec, *, progress: Callable[[str], None] | None = None) -> tuple[FilterResult, list[str]]:
    """Apply a baseline to the config's metadata folder and write its uid file (and `save_path`, if set)."""
    device = "cpu"
    if spec.name.startswith("image_based"):
        from d2m_core.compute.device import resolve_device

        device = resolve_device(config.device)
    result = run_filter(spec, pool.list_pool(config.output_metadata_dir), config=config, device=device, progress=progress)
    paths = [uid_file_url(config, spec.asset_name)] + ([spec.save_path] if spec.save_path else [])
    for path in paths:
        uids.save_uid_file(path, result.keys)
    storage.write_json(paths[0][: -len(".npy")] + ".json", result.summary() | {"spec": spec.model_dump()})
    return result, paths

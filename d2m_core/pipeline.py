"""What each asset computes, per shard: the feature pass over tars, scores from features, DataComp files.

These are the only calls d2m_assets makes into the library; each yields one `ShardOutcome` per shard.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from d2m_core import catalog, storage
from d2m_core.config import D2MConfig
from d2m_core.device import resolve_device, resolve_dtype
from d2m_core.engine import Engine, Progress, ShardResult
from d2m_core.models import create_model, resolve_model_weights, topo_order
from d2m_core.records import ShardStats, WeightsRecord
from d2m_core.scores import SCORE_FUNCTIONS
from d2m_core.shards import ShardRef
from d2m_core.writers import write_datacomp_files

log = logging.getLogger(__name__)


@dataclass
class ShardOutcome:
    """What happened to one shard for one asset: counts, files written, or the error that stopped it."""

    stem: str
    stats: ShardStats | None = None
    paths: dict[str, str] = field(default_factory=dict)
    weights: list[WeightsRecord] = field(default_factory=list)
    samples_per_s: float = 0.0
    error: str | None = None

    @property
    def weights_kind(self) -> str:
        kinds = {w.kind for w in self.weights}
        return "random" if "random" in kinds else ("real" if kinds else "none")


class UnsupportedConfigError(ValueError):
    """A config field d2m accepts but cannot honour yet."""


def selected_assets(config: D2MConfig) -> list[str]:
    """Validate what the config asks for against the catalog; returns the asset names it selects."""
    if config.custom_pypath:
        raise UnsupportedConfigError("custom_pypath: custom model plugins are not supported yet")
    return catalog.assets_for_config(config.models, config.postprocess_columns, config.postprocess_features)


def artifact_url(config: D2MConfig, asset: str, stem: str, ext: str) -> str:
    return storage.join(config.artifacts_root, asset, f"{stem}.{ext}")


def load_models(config: D2MConfig, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], list[WeightsRecord]]:
    """Verify every model's weights first (nothing is read before all are found), then build each once."""
    order = topo_order(list(names))
    resolved = {name: resolve_model_weights(name, config.weights_dir) for name in order}
    models = {name: create_model(name, device, dtype, resolved[name]) for name in order}
    return models, [resolved[n].record for n in order]


def build_engine(config: D2MConfig, feature_assets: Sequence[str]) -> tuple[Engine, list[WeightsRecord]]:
    selected_assets(config)
    names = [catalog.FEATURE_ASSETS[a].model for a in feature_assets]
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    models, weights = load_models(config, names, device, dtype)
    engine = Engine(models, device=device, dtype=dtype, batch_size=config.batch_size, nworkers=config.nworkers)
    return engine, weights


def _write_pass(config: D2MConfig, result: ShardResult, feature_assets: Sequence[str], weights: list[WeightsRecord]) -> ShardOutcome:
    stem = result.shard.stem
    outcome = ShardOutcome(stem=stem, stats=result.stats, weights=weights, error=result.error)
    if result.error is not None:
        return outcome
    for asset in feature_assets:
        model = catalog.FEATURE_ASSETS[asset].model
        url = artifact_url(config, asset, stem, "npz")
        storage.write_npz(url, result.outputs[model])
        outcome.paths[asset] = url
    table = pa.table({
        "key": pa.array(result.keys, pa.string()),
        "uid": pa.array(result.uids, pa.string()),
        "json": pa.array([json.dumps(j) if j is not None else None for j in result.jsons], pa.string()),
    })
    storage.write_parquet(artifact_url(config, catalog.SAMPLES, stem, "parquet"), table)
    record = result.stats.as_dict() | {"url": result.shard.url, "weights": [w.as_dict() for w in weights]}
    storage.write_json(artifact_url(config, catalog.SAMPLES, stem, "json"), record)
    total = result.stats.timings.get("total_s", 0.0)
    outcome.samples_per_s = result.stats.samples_written / total if total > 0 else 0.0
    return outcome


def compute_features(
    config: D2MConfig,
    shards: Sequence[ShardRef],
    feature_assets: Sequence[str],
    progress: Callable[[Progress], None] | None = None,
) -> Iterator[ShardOutcome]:
    """One pass per shard for all selected feature assets; models load once; files are written in the
    background while the next shard is computed. Yields outcomes in shard order."""
    engine, weights = build_engine(config, feature_assets)
    pending: deque[Future[ShardOutcome]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2m-writer") as writer:
        for result in engine.run(shards, progress):
            pending.append(writer.submit(_write_pass, config, result, list(feature_assets), weights))
            while pending and pending[0].done():
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def shard_stats(config: D2MConfig, stem: str) -> ShardStats:
    """The stored counts and failures of a shard's last feature pass."""
    return ShardStats.from_dict(storage.read_json(artifact_url(config, catalog.SAMPLES, stem, "json")))


def compute_scores(config: D2MConfig, stems: Sequence[str], score_asset: str) -> Iterator[ShardOutcome]:
    """Scores from stored features (never from the tar): one file per shard."""
    spec = catalog.SCORE_ASSETS[score_asset]
    for stem in stems:
        start = time.perf_counter()
        features = {p: storage.read_npz(artifact_url(config, p, stem, "npz")) for p in spec.parents}
        scores = SCORE_FUNCTIONS[score_asset](features)
        url = artifact_url(config, score_asset, stem, "npz")
        storage.write_npz(url, scores)
        rows = len(next(iter(scores.values())))
        elapsed = time.perf_counter() - start
        yield ShardOutcome(stem=stem, paths={score_asset: url}, samples_per_s=rows / max(elapsed, 1e-9),
                           stats=ShardStats(shard=stem, samples_read=rows, samples_written=rows))


def write_metadata(config: D2MConfig, stems: Sequence[str]) -> Iterator[ShardOutcome]:
    """The DataComp files of each shard, from the stored samples, features and scores."""
    for stem in stems:
        stats_record = storage.read_json(artifact_url(config, catalog.SAMPLES, stem, "json"))
        samples = storage.read_parquet(artifact_url(config, catalog.SAMPLES, stem, "parquet"))

        def load(asset: str, field_name: str) -> np.ndarray:
            return storage.read_npz(artifact_url(config, asset, stem, "npz"))[field_name]

        paths = write_datacomp_files(config, stem, samples, stats_record, load)
        stats = ShardStats.from_dict(stats_record)
        weights = [WeightsRecord(**w) for w in stats_record.get("weights", [])]
        yield ShardOutcome(stem=stem, stats=stats, paths=paths, weights=weights)

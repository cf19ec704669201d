"""Throughput benchmark: end to end (models loading included) and model-only samples/s, as JSON records."""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.loader import Batch
from d2m_core.pipeline import build_engine, compute_features, compute_scores, selected_assets, store_reference, write_metadata
from d2m_core.shards import ShardRef
from d2m_core.weights import random_weights_enabled


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def end_to_end(config: D2MConfig, shards: Sequence[ShardRef]) -> dict[str, Any]:
    """Features, scores and DataComp files for `shards` into a scratch folder; time includes model loading."""
    with tempfile.TemporaryDirectory(prefix="d2m-bench-") as scratch:
        config = config.model_copy(update={"output_metadata_dir": scratch, "artifacts_dir": None})
        names = selected_assets(config)
        features = [n for n in names if n in catalog.FEATURE_ASSETS]
        stems = [s.stem for s in shards]
        start = time.perf_counter()
        outcomes = list(compute_features(config, shards, features))
        t_features = time.perf_counter()
        if catalog.REFERENCE_ASSET in names:
            store_reference(config)
        for name in names:
            if name in catalog.SCORE_ASSETS:
                list(compute_scores(config, stems, name))
        list(write_metadata(config, stems))
        total = time.perf_counter() - start
    samples = sum(o.stats.samples_written for o in outcomes if o.stats)
    feature_pass = t_features - start
    shard_totals = [o.stats.timings.get("total_s", 0.0) for o in outcomes if o.stats]
    stage = {k: sum(o.stats.timings.get(k, 0.0) for o in outcomes if o.stats) for k in ("model_s", "loader_wait_s", "decode_s")}
    return {
        "kind": "end_to_end",
        "shards": len(shards),
        "samples": samples,
        "failed": sum(o.stats.samples_failed for o in outcomes if o.stats),
        "seconds": round(total, 3),
        "samples_per_s": round(samples / total, 2),
        "stage_shares": {
            "setup_and_model_load": round(max(feature_pass - sum(shard_totals), 0.0) / total, 3),
            "device_compute": round(stage["model_s"] / total, 3),
            "waiting_for_loader": round(stage["loader_wait_s"] / total, 3),
            "scores_and_files": round((total - feature_pass) / total, 3),
        },
        "decode_thread_s": round(stage["decode_s"], 3),
    }


def model_only(config: D2MConfig, shards: Sequence[ShardRef], repeats: int = 3) -> dict[str, Any]:
    """Samples/s of the device stage alone, on one prepared batch from the first shard."""
    names = selected_assets(config)
    engine, _ = build_engine(config, [n for n in names if n in catalog.FEATURE_ASSETS])
    batch = next(item for item in engine.loader(shards[:1]) if isinstance(item, Batch) and len(item))
    engine.forward(batch)  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(repeats):
        engine.forward(batch)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    elapsed = time.perf_counter() - start
    return {"kind": "model_only", "batch": len(batch), "samples_per_s": round(repeats * len(batch) / elapsed, 2)}


def run_benchmark(config: D2MConfig, shards: Sequence[ShardRef], config_name: str, repeats: int = 3) -> list[dict[str, Any]]:
    from d2m_core.device import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    common = {
        "device": _device_name(device),
        "config": config_name,
        "models": config.models,
        "batch_size": config.batch_size,
        "nworkers": config.nworkers,
        "precision": str(resolve_dtype(config.precision, device)).replace("torch.", ""),
        "weights": "random" if random_weights_enabled() else "real",
    }
    return [common | end_to_end(config, shards), common | model_only(config, shards, repeats)]

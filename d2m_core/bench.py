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
from d2m_core.pipeline import build_engine, process_shards, selected_assets, store_reference
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
        start = time.perf_counter()
        if catalog.REFERENCE_ASSET in names:
            store_reference(config)
        outcomes = list(process_shards(config, shards, names))
        total = time.perf_counter() - start
    failed_shards = [o.stem for o in outcomes if o.error]
    if failed_shards:
        raise RuntimeError(f"benchmark shards failed: {failed_shards}")
    samples = sum(o.stats.samples_written for o in outcomes if o.stats)
    stage = {k: sum(o.stats.timings.get(k, 0.0) for o in outcomes if o.stats) for k in ("model_s", "loader_wait_s", "decode_s", "total_s")}
    return {
        "kind": "end_to_end",
        "shards": len(shards),
        "samples": samples,
        "failed": sum(o.stats.samples_failed for o in outcomes if o.stats),
        "seconds": round(total, 3),
        "samples_per_s": round(samples / total, 2),
        "stage_shares": {  # of the wall time; the rest is model loading, setup and the last shard's files
            "device_compute": round(stage["model_s"] / total, 3),
            "waiting_for_loader": round(stage["loader_wait_s"] / total, 3),
            "outside_the_pass": round(max(total - stage["total_s"], 0.0) / total, 3),
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
        "gpu_decode": config.gpu_decode,
        "weights": "random" if random_weights_enabled() else "real",
    }
    return [common | end_to_end(config, shards), common | model_only(config, shards, repeats)]

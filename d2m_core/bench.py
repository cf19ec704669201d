"""Throughput benchmark: end to end (models loading included) and model-only samples/s, as JSON records."""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from d2m_core import catalog
from d2m_core.compute.pipeline import build_engine, process_shards, store_reference
from d2m_core.compute.weights import random_weights_enabled
from d2m_core.config import D2MConfig
from d2m_core.reading.loader import Batch, Loader
from d2m_core.reading.shards import ShardRef
from d2m_core.selection import selected_assets


def machine_load() -> dict[str, Any]:
    """The 1-minute load average and core count: figures from a shared machine need both."""
    import os

    return {"load_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}


def loader_stage(shards: Sequence[ShardRef], *, processes: int, batch_size: int = 512, decode: bool = False,
                 device: str | int = "cpu") -> dict[str, Any]:
    """The loader as the GPU path uses it (images handed over encoded, to be decoded on the device; with
    `decode`, decoded by the readers and packed into one buffer a batch, uploaded to `device`, as `gpu_decode:
    readers` does before resizing), with a consumer that only counts: samples/s, and the CPU time the consuming
    process spends per sample."""
    import resource

    from d2m_core.compute.device import resolve_device

    target = resolve_device(device)
    loader = Loader(shards, batch_size=batch_size, transforms=[], needs_text=True, nworkers=2, readers=processes,
                    decode_device=target if decode else None, decode_in_readers=decode)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, start = time.process_time(), time.perf_counter()
    samples = first_samples = 0
    first = None
    for item in loader:
        if isinstance(item, Batch):
            samples += item.samples_read
            if first is None:
                first, first_samples = time.perf_counter() - start, samples
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    steady = (samples - first_samples) / max(seconds - (first or 0.0), 1e-9)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the readers, reaped by the loader
    readers_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {"stage": "loader", "processes": processes, "decode": decode, "device": str(target), "shards": len(shards),
            "batch_size": batch_size,
            "samples": samples, "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1),
            "main_cpu_us_per_sample": round(cpu / max(samples, 1) * 1e6, 2),
            "first_batch_s": round(first or 0.0, 3), "samples_per_s_after_first_batch": round(steady, 1),
            # CPU a reader spends per sample (process start included): 1e6 / this = one reader's rate on a free core
            "reader_cpu_us_per_sample": round(readers_cpu / max(samples, 1) * 1e6, 2)} | machine_load()


def writer_stage(config: D2MConfig, shards: Sequence[ShardRef], config_name: str, samples: int = 10_000,
                 repeats: int = 2) -> dict[str, Any]:
    """The output stage alone, as the writer thread runs it per shard (features stored, scores, DataComp's
    files, checks), on shards of `samples` rows: random unit features, the json of real samples, unique uids.
    Also the bytes d2m writes per shard against DataComp's {shard}.parquet + {shard}.npz."""
    import os
    import uuid

    from d2m_core.compute.engine import RAGGED, ShardResult
    from d2m_core.compute.models import model_class
    from d2m_core.compute.pipeline import build_scorer, computed_features, finish_shard, write_feature_pass
    from d2m_core.outputs.records import ShardStats
    from d2m_core.reading.reading import iter_samples

    names = selected_assets(config)
    features = [a for a in names if a in catalog.FEATURE_ASSETS]
    usable = [s.json for s in iter_samples(shards[0]) if s.problem is None]
    uids = [uuid.UUID(int=random_bits).hex for random_bits in np.random.default_rng(0).integers(0, 2**63, samples)]
    jsons = [dict(usable[i % len(usable)], uid=uids[i]) for i in range(samples)]
    rng = np.random.default_rng(1)
    outputs: dict[str, dict[str, Any]] = {}
    for asset in features:
        model = catalog.FEATURE_ASSETS[asset].model
        outputs[model] = {}
        for field, width in model_class(model).output_fields.items():
            if width == RAGGED:
                outputs[model][field] = [[[0.1, 0.2, 0.3, 0.4]] * int(n) for n in rng.integers(0, 3, samples)]
            elif width == 0:
                outputs[model][field] = rng.random(samples, dtype=np.float32)
            else:
                rows = rng.standard_normal((samples, width), dtype=np.float32)
                outputs[model][field] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="d2m-bench-writer-") as scratch:
        config = config.model_copy(update={"output_metadata_dir": scratch, "artifacts_dir": None})
        if catalog.REFERENCE_ASSET in names:
            store_reference(config)
        scorers = {a: build_scorer(config, a) for a in catalog.SCORE_ASSETS if a in names}
        start = time.perf_counter()
        for i in range(-1, repeats):  # shard -1 warms up (imports, first allocations), untimed
            if i == 0:
                start = time.perf_counter()
            stem = f"{i:05d}"
            stats = ShardStats(shard=stem, samples_read=samples, samples_written=samples)
            result = ShardResult(shard=ShardRef(stem, f"synthetic/{stem}.tar"), stats=stats, keys=[f"{stem}{k:05d}" for k in range(samples)],
                                 uids=uids, jsons=jsons, outputs=outputs)
            outcome = finish_shard(config, write_feature_pass(config, result, features, []), scorers,
                                   catalog.METADATA_ASSET in names, computed_features(result, features), result.jsons)
            if outcome.error is not None:
                raise RuntimeError(f"writer benchmark shard failed: {outcome.error}")
        seconds = time.perf_counter() - start
        sizes = {os.path.relpath(os.path.join(d, f), scratch): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(scratch) for f in files if f.startswith("00000")}
    written = sum(sizes.values())
    datacomp = sum(sizes.get(f"00000.{ext}", 0) for ext in ("parquet", "npz"))
    return {"stage": "writer", "config": config_name, "samples_per_shard": samples, "shards": repeats,
            "seconds": round(seconds, 3), "samples_per_s": round(samples * repeats / seconds, 1),
            "bytes_per_sample_written": round(written / samples, 1),
            "datacomp_bytes_per_sample": round(datacomp / samples, 1),
            "written_vs_datacomp": round(written / max(datacomp, 1), 4), "files": sizes} | machine_load()


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
    stage = {k: sum(o.stats.timings.get(k, 0.0) for o in outcomes if o.stats)
             for k in ("model_s", "loader_wait_s", "decode_s", "total_s", "dispatch_s", "sync_s", "engine_cpu_s")}
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
        # the engine thread's model time: issuing the models (CPU, GIL waits), waiting for the device; its CPU time
        "engine_thread_s": {k: round(stage[f"{k}_s"], 3) for k in ("dispatch", "sync", "engine_cpu")},
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
    result = {"kind": "model_only", "batch": len(batch), "samples_per_s": round(repeats * len(batch) / elapsed, 2)}
    if engine.device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2)
    return result


def fidelity(config: D2MConfig, shards: Sequence[ShardRef], samples: int = 64) -> dict[str, Any]:
    """Per model output, the minimum cosine between the configured precision's features and fp32's, on the
    same prepared batch (the DESIGN asks for at least 0.99)."""
    names = [n for n in selected_assets(config) if n in catalog.FEATURE_ASSETS]
    small = config.model_copy(update={"batch_size": min(samples, config.batch_size)})
    engine, _ = build_engine(small, names)
    batch = next(item for item in engine.loader(shards[:1]) if isinstance(item, Batch) and len(item))
    ours = engine.forward(batch)
    if engine.dtype == torch.float32:
        return {"kind": "fidelity", "precision": "float32", "min_cosine_vs_fp32": 1.0}
    reference_engine, _ = build_engine(small.model_copy(update={"precision": "fp32"}), names)
    reference = reference_engine.forward(batch)
    cosines = {}
    for model, fields in ours.items():
        for field, values in fields.items():
            if isinstance(values, list) or values.ndim != 2:
                continue  # boxes and scalar scores: compared through the features they come from
            a, b = values.astype("float64"), reference[model][field].astype("float64")
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            cosines[f"{model}/{field}"] = round(float(cos.min()), 5)
    return {"kind": "fidelity", "precision": str(engine.dtype).replace("torch.", ""), "batch": len(batch),
            "min_cosine_vs_fp32": cosines, "ok": all(c >= 0.99 for c in cosines.values())}


def run_benchmark(config: D2MConfig, shards: Sequence[ShardRef], config_name: str, repeats: int = 3) -> list[dict[str, Any]]:
    from d2m_core.compute.device import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    common = {
        "device": _device_name(device),
        "config": config_name,
        "models": config.models,
        "batch_size": config.batch_size,
        "nworkers": config.nworkers,
        "precision": str(resolve_dtype(config.precision, device)).replace("torch.", ""),
        "gpu_decode": config.gpu_decode,
        "weights": "random" if random_weights_enabled() else "files",
    }
    return [common | end_to_end(config, shards), common | model_only(config, shards, repeats),
            common | fidelity(config, shards)]


def device_parts(config: D2MConfig, shards: Sequence[ShardRef], shard_dir: str, batches: int = 3) -> dict[str, Any]:
    """Where a batch's time goes, part by part (the device synchronised around each): the loader as a run uses
    it with a consumer that only counts (what the device stage could be fed), decoding and resizing in one
    thread (resizing batched and per image size), and each model's share of `Engine.forward`."""
    from d2m_core.reading import batched_resize, fastpath

    names = selected_assets(config)
    engine, _ = build_engine(config, [n for n in names if n in catalog.FEATURE_ASSETS])
    device, transforms = engine.device, [t.name for t in engine.image_transforms]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start, samples, prepared = time.perf_counter(), 0, None
    for item in engine.loader(shards):
        if isinstance(item, Batch) and len(item):
            samples += len(item)
            prepared = prepared or item
    loader_s = time.perf_counter() - start
    result: dict[str, Any] = {"kind": "device_parts", "transforms": transforms, "decode_on_device": engine.decode_on_device,
                              "decode_in_readers": engine.decode_in_readers, "loader_samples": samples, "loader_samples_per_s": round(samples / loader_s, 1)}
    if prepared is None:
        return result
    batched = batched_resize.applies(device)  # else (the CPU) prepare_tensors takes the per-size path anyway
    parts: dict[str, list[float]] = {"decode": [], "resize_per_size": []} | ({"resize_batched": []} if batched else {})
    data = fastpath.read_images(shard_dir, batches * config.batch_size)
    for k in range(0, len(data), config.batch_size):
        sync()
        t0 = time.perf_counter()
        decoded = fastpath.decode_batch(data[k: k + config.batch_size], device)
        sync()
        parts["decode"].append(time.perf_counter() - t0)
        result.setdefault("decoded_by", decoded.by_backend())
        images = [i for i in decoded.images if i is not None and fastpath.aspect_failure(*i.shape[-2:]) is None]
        if not transforms:
            continue
        for label, max_side in (("resize_batched", batched_resize.MAX_SIDE), ("resize_per_size", 0)):
            if label not in parts or (label == "resize_per_size" and k):
                continue  # once is enough: the slow path
            saved, batched_resize.MAX_SIDE = batched_resize.MAX_SIDE, max_side
            try:
                sync()
                t0 = time.perf_counter()
                fastpath.prepare_tensors(images, transforms)
                sync()
                parts[label].append(time.perf_counter() - t0)
            finally:
                batched_resize.MAX_SIDE = saved
    result |= {f"{label}_ms_per_batch": [round(1000 * s, 1) for s in seconds] for label, seconds in parts.items()}
    result["batched_resize_applies"] = batched
    engine.forward(prepared)  # warm-up
    timings: dict[str, float] = {}
    repeats = 3
    for _ in range(repeats):
        engine.forward(prepared, timings)
    result["forward_ms_per_batch"] = {part: round(1000 * s / repeats, 2) for part, s in timings.items()}
    result["batch"] = len(prepared)
    result["model_only_samples_per_s"] = round(repeats * len(prepared) / sum(timings.values()), 1)
    return result

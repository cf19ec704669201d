"""What the shard assets compute, per shard: the feature pass over tars, scores from features, DataComp files
and their checks (`process_shards`), and the dedup reference set (`store_reference`).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from d2m_core import catalog
from d2m_core.compute.compiled import static_models
from d2m_core.compute.device import resolve_device, resolve_dtype
from d2m_core.compute.engine import MODEL_BUILD_DONE, MODEL_BUILD_START, Engine, Progress, ShardResult
from d2m_core.compute.models import create_model, model_class, resolve_model_weights, topo_order
from d2m_core.compute.models.isc import dedup_scores, load_reference_embeddings, reference_norms
from d2m_core.compute.scores import ClipScorer, FunctionScorer, Scorer
from d2m_core.compute.weights import resolve_weights, weights_dir
from d2m_core.compute.weights_files import DEDUP_REFERENCE_FILES, REFERENCE_MODEL
from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.outputs.jsontext import json_texts
from d2m_core.outputs.records import ShardOutcome, ShardStats, WeightsRecord
from d2m_core.outputs.reference import reference_record, reference_url
from d2m_core.outputs.validation import inspect_shard
from d2m_core.outputs.writers import write_datacomp_files, writes_npz
from d2m_core.reading.fastpath import supports
from d2m_core.reading.loader import DEFAULT_READERS
from d2m_core.reading.shards import ShardRef
from d2m_core.selection import artifact_url, selected_assets, stored_stats
from d2m_core.testdata.pausepoints import pause_at

log = logging.getLogger(__name__)

RANDOM_REFERENCE_ROWS = 10_000


def load_models(config: D2MConfig, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], list[WeightsRecord]]:
    """Verify every model's weights first (nothing is read before all are found), then build each once."""
    order = topo_order(list(names))
    resolved = {name: resolve_model_weights(name, config.weights_dir) for name in order}
    models = {name: create_model(name, device, dtype, resolved[name]) for name in order}
    return models, [resolved[n].record for n in order]


def build_engine(config: D2MConfig, feature_assets: Sequence[str], device: torch.device | None = None,
                 read_ahead: Sequence[ShardRef] = ()) -> tuple[Engine, list[WeightsRecord]]:
    """Models for these feature assets, on `device` (default: the config's), loaded once. With `read_ahead`,
    when the readers tokenize (`readers_tokenize`: their start-up imports torch, seconds), they start on those
    shards first, so that start-up and their first batches overlap the model build; the engine's `run` over
    them takes them over (`Engine.close` stops them otherwise). Readers that do not tokenize start in a
    fraction of a second, and reading ahead would only take cores from the build (0.7 s later to the first
    batch on 2 cores)."""
    selected_assets(config)
    names = [catalog.FEATURE_ASSETS[a].model for a in feature_assets]
    device = device or resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    engine = Engine({name: model_class(name) for name in names}, device=device, dtype=dtype, batch_size=config.batch_size,
                    nworkers=config.nworkers)
    engine.decode_on_device = device_preprocessing(config, device, [t.name for t in engine.image_transforms])
    engine.decode_in_readers = engine.decode_on_device and config.gpu_decode == "readers"
    engine.readers = reader_processes(config.reader_processes, engine.decode_in_readers)
    engine.decode_share = config.reader_decode_share
    engine.text_in_readers = readers_tokenize(device)
    started = time.perf_counter()
    try:
        if read_ahead and engine.text_in_readers:
            engine.read_ahead(read_ahead)
        log.info("%s: building models %s on %s", MODEL_BUILD_START, ", ".join(names), device)
        models, weights = load_models(config, names, device, dtype)
        static_models(models, config.batch_size, device, dtype, compile=config.torch_compile, graphs=config.cuda_graphs)
        engine.use(models)
    except BaseException:
        engine.close()
        raise
    log.info("%s in %.2f s", MODEL_BUILD_DONE, time.perf_counter() - started)
    return engine, weights


def reader_processes(setting: int | str, decode: bool) -> int:
    """The reader processes for `reader_processes`: a number as it is; auto: 2 (reading alone keeps up with a
    GPU), or, when they decode, every core this process may use but 4 (on an H200's 16 cores, 12 decoded
    4,952 samples/s and 16 fewer: the rest go to the loader threads, the models and the writer), 2 at least."""
    if setting != "auto":
        return int(setting)
    if not decode:
        return DEFAULT_READERS
    return max(DEFAULT_READERS, len(os.sched_getaffinity(0)) - 4)


def readers_tokenize(device: torch.device) -> bool:
    """Whether the reader processes tokenize captions: on CUDA, which keeps the tokenizer's GIL time off the
    device stage's process."""
    return device.type == "cuda"


def device_preprocessing(config: D2MConfig, device: torch.device, transforms: Sequence[str]) -> bool:
    """Whether the loader preprocesses images (decodes and resizes them) on `device`, for `gpu_decode`:
    auto = on CUDA; on; readers (the reader processes decode with PIL, the device resizes); off. Only the
    built-in transforms have a device implementation: with a plugin's, the PIL path; with no image
    transforms there is nothing to decode."""
    on_device = config.gpu_decode in ("on", "readers") or (config.gpu_decode == "auto" and device.type == "cuda")
    return bool(transforms) and on_device and supports(transforms)


def datacomp_npz_url(config: D2MConfig, stem: str) -> str:
    return storage.join(config.output_metadata_dir, f"{stem}.npz")


def datacomp_held(config: D2MConfig, asset: str) -> dict[str, str]:
    """Field -> key in DataComp's `{shard}.npz`, for the asset's outputs that postprocess_features lists as they
    are: each feature is stored once, there (and read back from there); the asset's other outputs go to
    `<artifacts>/<asset>/{shard}.npz`."""
    held = {}
    for name in config.postprocess_features:
        out = catalog.output_name(name, feature=True)
        if out.asset == asset and out.compute is None:
            held[out.field] = out.column(config.use_datacomp_keys)
    return held


def stored_outputs(config: D2MConfig, stem: str, asset: str) -> dict[str, np.ndarray]:
    """A feature asset's stored outputs for one shard (packed fields): its artifact npz, if it has one, and
    its fields held in DataComp's npz (only those arrays are decompressed)."""
    url = artifact_url(config, asset, stem, "npz")
    arrays = storage.read_npz(url) if storage.exists(url) else {}
    held = datacomp_held(config, asset)
    shared_url = datacomp_npz_url(config, stem)
    if held and (not set(held) <= set(arrays) or storage.exists(shared_url)):  # older layouts: artifact only
        shared = storage.read_npz(shared_url, set(held.values()))
        arrays |= {field: shared[key] for field, key in held.items() if key in shared}
    return arrays


def _write_features(config: D2MConfig, result: ShardResult, feature_assets: Sequence[str]) -> dict[str, str]:
    """Each feature asset's outputs, stored once: the fields DataComp's npz holds there, the others in the
    asset's artifact npz. Returns the file of each asset."""
    stem, paths = result.shard.stem, {}
    shared: dict[str, np.ndarray] = {}
    for asset in feature_assets:
        fields = result.outputs[catalog.FEATURE_ASSETS[asset].model]
        held = datacomp_held(config, asset)
        shared |= {key: fields[field] for field, key in held.items()}
        rest = {field: value for field, value in fields.items() if field not in held}
        paths[asset] = datacomp_npz_url(config, stem)
        if rest or not held:
            paths[asset] = artifact_url(config, asset, stem, "npz")
            storage.write_npz(paths[asset], rest)
    if shared:
        url = datacomp_npz_url(config, stem)
        others = {k for a in catalog.FEATURE_ASSETS for k in datacomp_held(config, a).values()} - set(shared)
        if others and storage.exists(url):  # features of assets this pass did not compute stay as they are
            rows = len(result.keys)
            shared = {k: v for k, v in storage.read_npz(url, others).items() if len(v) == rows} | shared
        storage.write_npz(url, shared)
    return paths


def write_feature_pass(config: D2MConfig, result: ShardResult, feature_assets: Sequence[str], weights: list[WeightsRecord]) -> ShardOutcome:
    stem = result.shard.stem
    outcome = ShardOutcome(stem=stem, stats=result.stats, weights=weights, error=result.error)
    if result.error is not None:
        return outcome
    outcome.paths |= _write_features(config, result, feature_assets)
    table = pa.table({
        "key": pa.array(result.keys, pa.string()),
        "uid": pa.array(result.uids, pa.string()),
        "json": pa.array(json_texts(result.jsons), pa.string()),
    })
    storage.write_parquet(artifact_url(config, catalog.SAMPLES, stem, "parquet"), table, compression="zstd")
    record = result.stats.as_dict() | {"url": result.shard.url, "weights": [w.as_dict() for w in weights]}
    storage.write_json(artifact_url(config, catalog.SAMPLES, stem, "json"), record)
    total = result.stats.timings.get("total_s", 0.0)
    outcome.samples_per_s = result.stats.samples_written / total if total > 0 else 0.0
    return outcome


def computed_features(result: ShardResult, feature_assets: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """A pass's features as `stored_outputs` reads them back once written (the same arrays, in memory)."""
    return {a: storage.pack_fields(result.outputs[catalog.FEATURE_ASSETS[a].model]) for a in feature_assets}


def finish_shard(config: D2MConfig, outcome: ShardOutcome, scorers: dict[str, Scorer], metadata: bool,
                 computed: dict[str, dict[str, np.ndarray]] | None = None,
                 jsons: Sequence[dict[str, Any] | None] | None = None) -> ShardOutcome:
    """After a shard's features are stored: its scores (from `computed`, the features the pass just stored,
    else read back), then DataComp's files (additional_fields from `jsons`, the samples' parsed jsons the pass
    just stored, else parsed from the stored samples table) and their checks (the writer thread's work). A
    failure is recorded on the outcome; the other shards go on."""
    if outcome.error is not None:
        return outcome
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2m-checks") as reader:
            npz = datacomp_npz_url(config, outcome.stem)
            # The checks read DataComp's npz as stored; when this shard's DataComp files leave it as it is,
            # it is read (inflated, outside the GIL) while the scores and the parquet are written.
            early = reader.submit(storage.read_npz, npz) if metadata and config.postprocess_features \
                and not writes_npz(config, npz) else None
            for asset, scorer in scorers.items():
                outcome.paths[asset] = score_shard(config, outcome.stem, asset, scorer, computed)
                outcome.weights += scorer.weights
            if metadata:
                outcome.paths |= write_shard_metadata(config, outcome.stem, jsons)
                outcome.checks, outcome.quantiles = inspect_shard(config, outcome.stem,
                                                                  early.result() if early else None)
    except Exception as err:  # this shard fails with its reason; the others go on
        log.exception("shard %s failed", outcome.stem)
        outcome.error = f"{type(err).__name__}: {err}"
    pause_at("shard-complete", outcome.stem)  # test-only; returns at once unless a test set it
    return outcome


def process_shards(
    config: D2MConfig,
    shards: Sequence[ShardRef],
    assets: Sequence[str],
    progress: Callable[[Progress], None] | None = None,
    device: torch.device | None = None,
    progress_every_s: float = 30.0,
) -> Iterator[ShardOutcome]:
    """Everything `assets` asks for, shard by shard, in shard order: one pass over each tar for the feature
    assets (models loaded once), then scores from the stored features, then DataComp's files and their checks.

    The models run in a background thread and each shard's files are written in another while the next
    shard is computed; each shard is yielded as soon as its files are complete (not when the next one is),
    and `progress` is called from the caller's thread. A shard that fails (unreadable tar, full disk, ...)
    is reported with its error; the other shards go on.
    """
    features = [a for a in catalog.FEATURE_ASSETS if a in assets]
    scorers = {a: build_scorer(config, a) for a in catalog.SCORE_ASSETS if a in assets}
    metadata = catalog.METADATA_ASSET in assets

    def finish(outcome: ShardOutcome) -> ShardOutcome:
        return finish_shard(config, outcome, scorers, metadata)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2m-writer") as writer:
        if not features:
            yield from writer.map(lambda ref: finish(ShardOutcome(stem=ref.stem, stats=stored_stats(config, ref.stem))), shards)
            return
        engine, weights = build_engine(config, features, device, read_ahead=shards)
        write = lambda r: finish_shard(config, write_feature_pass(config, r, features, weights), scorers,  # noqa: E731
                                       metadata, computed_features(r, features), r.jsons)
        try:
            yield from _computed_and_written(engine, shards, writer, write, progress, progress_every_s)
        finally:
            engine.close()


_END = object()


def _computed_and_written(engine: Engine, shards: Sequence[ShardRef], writer: ThreadPoolExecutor,
                          write: Callable[[ShardResult], ShardOutcome],
                          progress: Callable[[Progress], None] | None, progress_every_s: float) -> Iterator[ShardOutcome]:
    """Run the engine in a thread, hand each result to `writer`, and yield each outcome once written.

    Everything reaches the caller through one queue (progress reports, written shards, the end, an error),
    so the caller's thread does all the reporting while the models run and the files are written.
    """
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def compute() -> None:
        submitted = 0
        try:
            if engine.device.type == "cuda":  # the current device is per thread
                torch.cuda.set_device(engine.device)
            for result in engine.run(shards, events.put, progress_every_s):
                writer.submit(write, result).add_done_callback(events.put)
                submitted += 1
                if stop.is_set():
                    break
        except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there
            events.put(err)
        events.put((_END, submitted))

    thread = threading.Thread(target=compute, name="d2m-compute", daemon=True)
    thread.start()
    yielded, total = 0, None
    try:
        while total is None or yielded < total:
            item = events.get()
            if isinstance(item, Future):
                yielded += 1
                yield item.result()
            elif isinstance(item, Progress):
                if progress is not None:
                    progress(item)
            elif isinstance(item, BaseException):
                raise item
            else:
                total = item[1]
    finally:
        stop.set()  # the caller stopped early: no further shard is started


def store_reference(config: D2MConfig) -> ShardOutcome:
    """Copy the dedup reference embeddings (DataComp's eval_dedup_embeddings.pt) into the artifacts, verified,
    recording whether its rows are unit norm (dedup scores use them as stored, as the seed does)."""
    resolved = resolve_weights(REFERENCE_MODEL, DEDUP_REFERENCE_FILES, weights_dir(config.weights_dir))
    if resolved.is_random:
        rng = np.random.default_rng(0)
        reference = rng.standard_normal((RANDOM_REFERENCE_ROWS, 256)).astype(np.float32)
        reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    else:
        reference = load_reference_embeddings(resolved.path)
    url = reference_url(config)
    norms = reference_norms(reference)
    storage.write_npz(url, {"reference": reference})
    storage.write_json(url[: -len(".npz")] + ".json",
                       resolved.record.as_dict() | {"rows": int(reference.shape[0])} | norms)
    stats = ShardStats(shard=catalog.REFERENCE_ASSET, samples_read=len(reference), samples_written=len(reference))
    return ShardOutcome(stem=catalog.REFERENCE_ASSET, stats=stats, paths={catalog.REFERENCE_ASSET: url},
                        weights=[resolved.record], metadata=norms)


def build_scorer(config: D2MConfig, score_asset: str) -> Scorer:
    """The scorer of a score asset, with its weights (NSFW head) or reference set (dedup) loaded once."""
    if score_asset in ("clip_b32_scores", "clip_l14_scores"):
        return ClipScorer(catalog.SCORE_ASSETS[score_asset].parents[0])
    if score_asset == "nsfw_image_scores":
        model = catalog.model_for_asset(score_asset)
        resolved = resolve_model_weights(model, config.weights_dir)
        head = create_model(model, torch.device("cpu"), torch.float32, resolved)
        return FunctionScorer("clip_l14_features", "image", head.score, [resolved.record])
    if score_asset == "dedup_scores":
        url = reference_url(config)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url} is missing: materialize {catalog.REFERENCE_ASSET} first")
        reference = storage.read_npz(url)["reference"]
        record = reference_record(config)
        return FunctionScorer("isc_features", "image", lambda f: dedup_scores(f, reference), [record])
    raise KeyError(f"no scorer for {score_asset!r}")


def score_shard(config: D2MConfig, stem: str, score_asset: str, scorer: Scorer,
                computed: dict[str, dict[str, np.ndarray]] | None = None) -> str:
    """One shard's scores from its stored features (never from the tar): those of `computed` (a pass's
    features, just stored) as they are, the others read back; returns the file written."""
    parents = [p for p in catalog.SCORE_ASSETS[score_asset].parents if p in catalog.FEATURE_ASSETS]
    features = {p: computed[p] if computed and p in computed else stored_outputs(config, stem, p) for p in parents}
    url = artifact_url(config, score_asset, stem, "npz")
    storage.write_npz(url, scorer(features))
    storage.write_json(artifact_url(config, score_asset, stem, "json"), {"weights": [w.as_dict() for w in scorer.weights]})
    return url


def model_outputs(model: str, arrays: dict[str, np.ndarray]) -> Any:
    """A model's stored outputs for one shard (its asset's npz) in the seed's shape: a tensor, or a tuple."""
    names = sorted({k.split(".")[0] for k in arrays}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))
    declared = list(getattr(model_class(model), "output_fields", {}) or names)
    values = tuple(_as_tensor(storage.unpack_field(arrays, n)) for n in declared)
    return values[0] if len(values) == 1 else values


def _as_tensor(value: np.ndarray | list) -> Any:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def write_shard_metadata(config: D2MConfig, stem: str, jsons: Sequence[dict[str, Any] | None] | None = None) -> dict[str, str]:
    """The DataComp files of one shard, from the stored samples, features and scores (and `jsons`, the
    samples' parsed jsons when the caller holds them: as stored, without parsing them again)."""
    stats_record = storage.read_json(artifact_url(config, catalog.SAMPLES, stem, "json"))
    for asset in selected_assets(config):
        if asset in catalog.SCORE_ASSETS:
            stats_record["weights"] += storage.read_json(artifact_url(config, asset, stem, "json"))["weights"]
    # Its json column is parsed for DataComp's additional_fields unless the caller holds the parsed jsons.
    samples = storage.read_parquet(artifact_url(config, catalog.SAMPLES, stem, "parquet"),
                                   None if jsons is None else ["uid"])

    @functools.cache
    def arrays(asset: str) -> dict[str, np.ndarray]:  # each stored file read (and decompressed) once
        if asset in catalog.FEATURE_ASSETS:
            return stored_outputs(config, stem, asset)
        return storage.read_npz(artifact_url(config, asset, stem, "npz"))

    def load(asset: str, field_name: str) -> np.ndarray | list:
        return storage.unpack_field(arrays(asset), field_name)

    def outputs() -> dict[str, Any]:
        return {m: model_outputs(m, arrays(catalog.MODEL_ASSETS[m])) for m in config.models
                if catalog.MODEL_ASSETS.get(m) in catalog.FEATURE_ASSETS}

    return write_datacomp_files(config, stem, samples, stats_record, load, outputs, jsons)

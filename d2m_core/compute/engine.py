"""The engine: one pass per shard; each batch goes through every selected model on the device, in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from d2m_core.compute.device import to_device
from d2m_core.compute.models import topo_order
from d2m_core.outputs.records import ShardStats
from d2m_core.reading.loader import DEFAULT_READERS, Batch, Loader, ShardEnd, ShardStart
from d2m_core.reading.shards import ShardRef
from d2m_core.reading.tokens import READER_TEXT_PREPROCESSORS
from d2m_core.reading.transforms import IMAGE_TRANSFORMS, TEXT_PREPROCESSORS
from d2m_core.testdata.pausepoints import pause_at

log = logging.getLogger(__name__)
# d2m's own timeline of a run (INFO lines of the d2m_core logger, which the run log records with their time):
# `d2m bench --stage run-overhead` reads them back.
MODEL_BUILD_START, MODEL_BUILD_DONE, FIRST_BATCH = "model build start", "model build done", "first batch"


class DeviceOutOfMemoryError(RuntimeError):
    """A single sample does not fit in the device's memory: the batch cannot be split any further."""

RAGGED = -1  # an output_fields width: one variable-length list per sample (face boxes)
Field = np.ndarray | list  # (N,), (N, width) float32, or a list of N per-sample lists


@dataclass
class ShardResult:
    """Everything one shard's pass produced, rows aligned with `keys` (tar order)."""

    shard: ShardRef
    stats: ShardStats
    keys: list[str] = field(default_factory=list)
    uids: list[str | None] = field(default_factory=list)
    jsons: list[dict[str, Any] | None] = field(default_factory=list)
    outputs: dict[str, dict[str, Field]] = field(default_factory=dict)  # model -> field -> rows
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    """Reported while a shard runs (every `progress_every_s`) and when it ends: how far, and how fast."""

    shard: str
    shards_done: int
    shards_total: int
    samples: int  # written so far in this shard
    samples_per_s: float
    error: str | None
    finished: bool = True


@dataclass
class _Open:
    """A shard being computed: its result so far, output chunks, and when it started / last reported."""

    result: ShardResult
    parts: dict[str, dict[str, list[Field]]]
    t_start: float
    t_report: float


class Engine:
    """Runs already-built models over shards; device and dtype are explicit, models are loaded once.

    What the models read (inputs, preprocessors, dependencies) comes from their classes' attributes, so an
    engine may be made from the model classes, start reading (`read_ahead`) while the models build, and be
    handed the built models (`use`) before it runs."""

    def __init__(self, models: dict[str, Any], *, device: torch.device, dtype: torch.dtype, batch_size: int, nworkers: int,
                 readers: int = DEFAULT_READERS) -> None:
        self.order = topo_order(list(models), lambda n: models[n].dependencies)
        self.issue_order = issue_order(self.order, models)
        self.models = models
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.nworkers = nworkers
        self.readers = readers
        pairs = [(inp, pre) for m in self.order for inp, pre in zip(models[m].raw_inputs, models[m].preprocessors)]
        self.image_transforms = [IMAGE_TRANSFORMS[pre] for inp, pre in dict.fromkeys(pairs) if inp == "image"]
        self.text_preprocessors = {pre: TEXT_PREPROCESSORS[pre]() for inp, pre in dict.fromkeys(pairs) if inp == "text"}
        self.decode_on_device = False  # the GPU fast path: decode and resize in the loader, on `device`
        self.decode_in_readers = False  # with it, the reader processes decode (PIL); the loader uploads and resizes
        self.decode_share = 1.0  # of the batches, when the readers decode; the loader decodes the rest on the device
        self.text_in_readers = False  # GPU runs: the reader processes tokenize (READER_TEXT_PREPROCESSORS)
        self._ahead: Loader | None = None

    def use(self, models: dict[str, Any]) -> None:
        """The built models, for an engine made from their classes (same names)."""
        if set(models) != set(self.models):
            raise ValueError(f"models {sorted(models)} are not the engine's {sorted(self.models)}")
        self.models = dict(models)

    def read_ahead(self, shards: Sequence[ShardRef]) -> Loader:
        """Start the reader processes for `shards` now; `run` over the same shards takes them over."""
        self.close()
        self._ahead = self.loader(shards)
        self._ahead.start()
        return self._ahead

    def close(self) -> None:
        """Stop readers started by `read_ahead` that no run took over."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def _loader_for(self, shards: Sequence[ShardRef]) -> Loader:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.shards == list(shards):
            return ahead
        if ahead is not None:
            ahead.close()
        return self.loader(shards)

    def loader(self, shards: Sequence[ShardRef]) -> Loader:
        return Loader(
            shards,
            batch_size=self.batch_size,
            transforms=self.image_transforms,
            needs_text=bool(self.text_preprocessors),
            nworkers=self.nworkers,
            pin_memory=self.device.type == "cuda",
            decode_device=self.device if self.decode_on_device else None,
            readers=self.readers,
            text_preprocessors=[n for n in self.text_preprocessors if n in READER_TEXT_PREPROCESSORS]
            if self.text_in_readers else [],
            decode_in_readers=self.decode_in_readers,
            decode_share=self.decode_share,
        )

    def issue(self, batch: Batch, timings: dict[str, float] | None = None) -> _Issued:
        """Issue all models on one batch (`issue_order`) and, on CUDA, the copies of their outputs to pinned host
        memory, without waiting for the device: `collect` waits for this batch's work only, so the engine can
        issue the next batch first. With `timings`, adds each part's seconds to it ("inputs", then one entry
        per model; the device is synchronised around each part, so only a benchmark asks for them)."""
        start, cpu = time.perf_counter(), time.thread_time()
        clock = _PartClock(self.device, timings)
        inputs: dict[tuple[str, str], Any] = {}
        for t in self.image_transforms:
            pixels = batch.images[t.name].to(self.device, non_blocking=True)
            if pixels.is_cuda and batch.images[t.name].is_cuda:  # made on a loader stream: keep it alive here
                pixels.record_stream(torch.cuda.current_stream(self.device))
            inputs[("image", t.name)] = t.finish(pixels, batch.aux.get(t.name), self.dtype)
        for name, preprocess in self.text_preprocessors.items():
            text = batch.text_inputs[name] if name in batch.text_inputs else preprocess(batch.texts)
            inputs[("text", name)] = to_device(text, self.device) if isinstance(text, torch.Tensor) else text
        clock.lap("inputs")
        raw: dict[str, Any] = {}
        with torch.inference_mode():
            for name in self.issue_order:
                model = self.models[name]
                args = [inputs[(i, p)] for i, p in zip(model.raw_inputs, model.preprocessors)]
                args += [raw[d] for d in model.dependencies]
                raw[name] = model(*args)
                clock.lap(name)
            values = {name: [_to_host(v) for v in (raw[name] if isinstance(raw[name], (tuple, list)) else (raw[name],))]
                      for name in self.order}
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return _Issued(values, ready, time.perf_counter() - start, time.thread_time() - cpu)

    def collect(self, issued: _Issued, phases: dict[str, float] | None = None) -> dict[str, dict[str, Field]]:
        """A batch's outputs once the device has made them: model -> field -> (B, ...) float32 arrays (or
        per-sample lists). With `phases`, adds `dispatch_s` (issuing: CPU work, and waits for the GIL), `sync_s`
        (waiting here for the device) and `engine_cpu_s` (this thread's CPU time in both)."""
        if issued.rows is not None:
            return issued.rows
        start, cpu = time.perf_counter(), time.thread_time()
        if issued.ready is not None:
            issued.ready.synchronize()
        rows = {name: {f: _to_rows(v) for f, v in zip(self.models[name].output_fields, values)}
                for name, values in issued.values.items()}
        if phases is not None:
            for key, value in (("dispatch_s", issued.dispatch_s), ("sync_s", time.perf_counter() - start),
                               ("engine_cpu_s", issued.cpu_s + time.thread_time() - cpu)):
                phases[key] = phases.get(key, 0.0) + value
        return rows

    def forward(self, batch: Batch, timings: dict[str, float] | None = None,
                phases: dict[str, float] | None = None) -> dict[str, dict[str, Field]]:
        """`issue`, then `collect`: all models on one batch, its outputs as rows."""
        return self.collect(self.issue(batch, timings), phases)

    def issue_fitting(self, batch: Batch, phases: dict[str, float] | None = None) -> _Issued:
        """`issue`, but a batch that runs out of device memory is computed in halves (`forward_fitting`)."""
        try:
            return self.issue(batch)
        except Exception as err:  # noqa: BLE001 - only out-of-memory errors are handled, the rest re-raised
            if not is_out_of_memory(err):
                raise
            reason = " ".join(str(err).split())[:200]
        return _Issued({}, None, 0.0, 0.0, rows=self._halves(batch, reason, phases))

    def forward_fitting(self, batch: Batch, phases: dict[str, float] | None = None) -> dict[str, dict[str, Field]]:
        """`forward`, but a batch that runs out of device memory is split in half and each half retried
        (recursively, in order); a single sample that still does not fit raises DeviceOutOfMemoryError."""
        return self.collect(self.issue_fitting(batch, phases), phases)

    def _halves(self, batch: Batch, reason: str, phases: dict[str, float] | None) -> dict[str, dict[str, Field]]:
        """A batch that ran out of device memory, computed in two halves (each split again as needed). Called
        outside the except block, so the failed attempt's tensors (held by the traceback) are freed first."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        size = len(batch)
        if size == 1:
            raise DeviceOutOfMemoryError(
                f"sample {batch.keys[0]} of shard {batch.shard} does not fit in {self.device} memory even alone "
                f"(batch_size {self.batch_size}, precision {self.dtype}): {reason}")
        half = (size + 1) // 2
        log.warning("shard %s: batch of %d split into %d + %d after out of memory on %s (%s)",
                    batch.shard, size, half, size - half, self.device, reason)
        first = self.forward_fitting(_slice(batch, 0, half), phases)
        second = self.forward_fitting(_slice(batch, half, size), phases)
        return {model: {name: _join(rows, second[model][name]) for name, rows in fields.items()}
                for model, fields in first.items()}

    def run(self, shards: Sequence[ShardRef], progress: Callable[[Progress], None] | None = None,
            progress_every_s: float = 30.0) -> Iterator[ShardResult]:
        """Yield one ShardResult per shard, in shard order; an unreadable shard yields a result with `error` set.
        Shards read at once (one per reader process) are computed batch by batch as their batches arrive; each
        batch is issued before the previous one's outputs are collected, so the device always has one queued."""
        open_: dict[str, _Open] = {}
        finished: dict[str, ShardResult] = {}
        order = [s.stem for s in shards]
        done, first_batch = 0, True
        pending: _Pending | None = None  # the batch issued last, collected once the next one is issued

        def collect(pending: _Pending) -> None:
            self._collect(pending)
            state = pending.state
            if progress is not None and time.perf_counter() - state.t_report >= progress_every_s:
                state.t_report = time.perf_counter()
                written = len(state.result.keys)
                progress(Progress(pending.batch.shard, done, len(shards), written,
                                  written / max(state.t_report - state.t_start, 1e-9), None, finished=False))

        t_wait = time.perf_counter()
        for item in self._loader_for(shards):
            now = time.perf_counter()
            if isinstance(item, ShardStart):
                result = ShardResult(shard=item.shard, stats=ShardStats(shard=item.shard.stem))
                result.stats.timings = {"loader_wait_s": 0.0, "decode_s": 0.0, "model_s": 0.0, "dispatch_s": 0.0,
                                        "sync_s": 0.0, "engine_cpu_s": 0.0}
                parts = {m: {f: [] for f in self.models[m].output_fields} for m in self.order}
                open_[item.shard.stem] = _Open(result, parts, now, now)
            elif isinstance(item, Batch):
                state = open_[item.shard]
                if first_batch:
                    first_batch = False
                    log.info("%s: %d samples of shard %s", FIRST_BATCH, len(item), item.shard)
                timings = state.result.stats.timings
                timings["loader_wait_s"] += now - t_wait
                timings["decode_s"] += item.decode_s
                issued = self._issue(state.result, item)
                timings["model_s"] += time.perf_counter() - now
                if pending is not None:
                    collect(pending)
                pending = _Pending(state, item, issued) if issued is not None else None
                pause_at("shard-computing", item.shard)  # test-only; returns at once unless a test set it
            elif isinstance(item, ShardEnd):
                if pending is not None:
                    collect(pending)
                    pending = None
                state = open_.pop(item.shard.stem)
                state.result.error = item.error
                self._finish(state.result, state.parts)
                state.result.stats.timings["total_s"] = now - state.t_start
                done += 1
                if progress is not None:
                    written = state.result.stats.samples_written
                    progress(Progress(item.shard.stem, done, len(shards), written,
                                      written / max(now - state.t_start, 1e-9), item.error))
                finished[item.shard.stem] = state.result
                while order and order[0] in finished:
                    yield finished.pop(order.pop(0))
            t_wait = time.perf_counter()

    def _issue(self, result: ShardResult, batch: Batch) -> _Issued | None:
        """Count the batch's samples and failures and issue its models (None: no usable sample)."""
        result.stats.samples_read += batch.samples_read
        result.stats.failures.extend(batch.failures)
        if len(batch) == 0:
            return None
        return self.issue_fitting(batch, result.stats.timings)

    def _collect(self, pending: _Pending) -> None:
        """The outputs of an issued batch, appended to its shard's rows."""
        start = time.perf_counter()
        result, parts, batch = pending.state.result, pending.state.parts, pending.batch
        outputs = self.collect(pending.issued, result.stats.timings)
        for model, fields in outputs.items():
            for name, rows in fields.items():
                if len(rows) != len(batch):
                    raise RuntimeError(f"{model} returned {len(rows)} rows of {name!r} for a batch of {len(batch)}")
                parts[model].setdefault(name, []).append(rows)  # custom models name fields on first use
        result.keys.extend(batch.keys)
        result.uids.extend(batch.uids)
        result.jsons.extend(batch.jsons)
        result.stats.timings["model_s"] += time.perf_counter() - start

    def _finish(self, result: ShardResult, parts: dict[str, dict[str, list[Field]]]) -> None:
        result.stats.samples_written = len(result.keys)
        for model, fields in parts.items():
            widths = self.models[model].output_fields
            result.outputs[model] = {name: _concat(chunks, widths.get(name, 0)) for name, chunks in fields.items()}


def issue_order(order: list[str], models: dict[str, Any]) -> list[str]:
    """The order to issue the models of a batch in: `order` (dependencies first), but the models that wait for
    the device inside their call (`waits_for_device`: outputs made on the host, or inputs a library checks on
    the host) last, so that the device has every other model's work queued while they wait."""
    def waits(name: str) -> bool:
        return bool(getattr(models[name], "waits_for_device", False))

    return topo_order(sorted(order, key=waits), lambda n: models[n].dependencies)


@dataclass
class _Issued:
    """A batch whose models are issued: each model's outputs (host copies on their way, or host values), the
    event after which they are there, and what issuing cost; or, after an out-of-memory split, its `rows`."""

    values: dict[str, list[Any]]
    ready: torch.cuda.Event | None
    dispatch_s: float
    cpu_s: float
    rows: dict[str, dict[str, Field]] | None = None


@dataclass
class _Pending:
    state: _Open
    batch: Batch
    issued: _Issued


class _PartClock:
    """Seconds per part of `Engine.forward`, when asked for (a no-op otherwise)."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device, self.timings = device, timings
        if timings is not None:
            self._sync()
            self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, part: str) -> None:
        if self.timings is not None:
            self._sync()
            now = time.perf_counter()
            self.timings[part] = self.timings.get(part, 0.0) + now - self.last
            self.last = now


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error, or a RuntimeError saying so (CUDA, cuDNN, MPS and others word it so)."""
    if isinstance(err, DeviceOutOfMemoryError):
        return False
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    """Samples [start, stop) of a batch (views of its tensors); counts and failures stay with the original."""
    return Batch(
        shard=batch.shard,
        keys=batch.keys[start:stop],
        uids=batch.uids[start:stop],
        jsons=batch.jsons[start:stop],
        texts=batch.texts[start:stop],
        text_inputs={name: rows[start:stop] for name, rows in batch.text_inputs.items()},
        images={name: pixels[start:stop] for name, pixels in batch.images.items()},
        aux={name: side[start:stop] for name, side in batch.aux.items()},
    )


def _join(first: Field, second: Field) -> Field:
    if isinstance(first, np.ndarray):
        return np.concatenate([first, np.asarray(second, first.dtype)])
    return list(first) + list(second)


def _to_host(value: Any) -> Any:
    """A CUDA tensor's float32 copy on its way to pinned host memory (issued, not waited for); anything else
    as it is."""
    if isinstance(value, torch.Tensor) and value.is_cuda:
        host = torch.empty(value.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(value.detach().float(), non_blocking=True)
        return host
    return value


def _to_rows(value: Any) -> Field:
    """A model output for one batch as CPU float32 rows, or a plain list for per-sample lists."""
    if isinstance(value, torch.Tensor):
        rows = value.detach().float().cpu().numpy()
        return rows.copy() if value.is_pinned() else rows  # pinned memory goes back to be reused, not kept
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    return list(value)


def _concat(chunks: list[Field], width: int) -> Field:
    if width == RAGGED:
        return [row for chunk in chunks for row in chunk]
    if not chunks:
        return np.zeros((0, width) if width else (0,), np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


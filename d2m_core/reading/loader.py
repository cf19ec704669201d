"""The loader: reads tars in reader processes (`d2m_core.reading.readers`) and prepares image batches in a thread pool.

It hands the device stage each shard's `Batch`es in tar order, bracketed by `ShardStart`/`ShardEnd`; with N
reader processes N shards are read at once and their items interleave. Reading ahead never stops at a shard
boundary, so the device does not wait there.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from d2m_core.outputs.records import SampleFailure
from d2m_core.reading.decoding import DecodeError, decode_image
from d2m_core.reading.readers import RawBatch, ReaderPool, ShardBegins, ShardDone
from d2m_core.reading.shards import ShardRef
from d2m_core.reading.transforms import ImageTransform


@dataclass
class Batch:
    """Up to batch_size usable samples of one shard, with per-transform uint8 image tensors."""

    shard: str
    keys: list[str] = field(default_factory=list)
    uids: list[str | None] = field(default_factory=list)
    jsons: list[dict[str, Any] | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # preprocessed by the readers (B, ...)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # transform -> uint8 (B,3,H,W)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # transform -> per-image side data (B,...)
    failures: list[SampleFailure] = field(default_factory=list)
    samples_read: int = 0
    decode_s: float = 0.0

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class ShardStart:
    shard: ShardRef


@dataclass
class ShardEnd:
    shard: ShardRef
    error: str | None = None  # the shard could not be read at all


Item = Union[ShardStart, Batch, ShardEnd]
_DONE = object()
DEFAULT_READERS = 2  # reader processes


def _caption(data: bytes | None) -> str:
    return "" if data is None else data.decode("utf-8", errors="replace")  # RawSample.text, or ""


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """`tensor` in pinned memory with `pin` (its copy to CUDA then does not wait for the device), else as it is."""
    return tensor.pin_memory() if pin else tensor


def _keep_rows(batch: Batch, raw: RawBatch, rows: list[int], pin: bool) -> None:
    """Keys, uids, jsons, captions and the readers' preprocessed text rows of the samples kept, in batch order
    (the text rows pinned with `pin`, for a copy to CUDA that does not wait for the device)."""
    if len(rows) == len(raw):
        batch.keys, batch.uids, batch.jsons = list(raw.keys), list(raw.uids), list(raw.jsons)
        batch.texts = [_caption(c) for c in raw.captions]
    else:
        keys, uids, jsons, captions = raw.keys, raw.uids, raw.jsons, raw.captions
        batch.keys = [keys[r] for r in rows]
        batch.uids = [uids[r] for r in rows]
        batch.jsons = [jsons[r] for r in rows]
        batch.texts = [_caption(captions[r]) for r in rows]
    for name, array in raw.texts.items():
        batch.text_inputs[name] = _pinned(torch.from_numpy(array[rows]), pin)


def _read_failure(raw: RawBatch, row: int, needs_text: bool) -> str | None:
    """Why the sample in `row` is a failure before any decoding: its problem, or a missing caption."""
    problem = raw.problems[row]
    if problem is None and needs_text and raw.captions[row] is None:
        return "no txt member"
    return problem


def prepare_batch(shard: str, raw: RawBatch, transforms: Sequence[ImageTransform], needs_text: bool, pin: bool) -> Batch:
    """Decode and prepare one batch on the CPU; samples that fail are recorded, never dropped."""
    start = time.perf_counter()
    batch = Batch(shard=shard, samples_read=len(raw))
    pixels: dict[str, list[torch.Tensor]] = {t.name: [] for t in transforms}
    aux: dict[str, list[torch.Tensor]] = {t.name: [] for t in transforms}
    rows: list[int] = []
    for row in range(len(raw)):
        reason = _read_failure(raw, row, needs_text)
        if reason is None and transforms:
            try:
                image = decode_image(raw.images[row])
                prepared = {t.name: t.prepare(image) for t in transforms}
            except DecodeError as err:
                reason = str(err)
            except Exception as err:  # a preprocessing bug on one odd image must not lose the shard
                reason = f"preprocessing failed: {type(err).__name__}: {err}"
            else:
                for name, (tensor, side) in prepared.items():
                    pixels[name].append(tensor)
                    if side is not None:
                        aux[name].append(side)
        if reason is None:
            rows.append(row)
        else:
            batch.failures.append(SampleFailure(raw.keys[row], raw.uids[row], reason))
    _keep_rows(batch, raw, rows, pin)
    for name, tensors in pixels.items():
        if tensors:
            batch.images[name] = _pinned(torch.stack(tensors), pin)
        if aux[name]:
            batch.aux[name] = _pinned(torch.stack(aux[name]), pin)
    batch.decode_s = time.perf_counter() - start
    return batch


def prepare_batch_on_device(
    shard: str, raw: RawBatch, transforms: Sequence[ImageTransform], needs_text: bool, device: torch.device,
) -> Batch:
    """Like prepare_batch, but decoding (nvJPEG on CUDA, PIL fallback) and resizing run batched on `device`; a
    batch its reader decoded (RGB pixels: `gpu_decode: readers`) is only uploaded and resized."""
    from d2m_core.reading.fastpath import pixels_batch, preprocess_batch, preprocess_decoded

    start = time.perf_counter()
    batch = Batch(shard=shard, samples_read=len(raw))
    failures: list[tuple[int, SampleFailure]] = []
    usable: list[int] = []
    for row in range(len(raw)):
        reason = _read_failure(raw, row, needs_text)
        if reason is None:
            usable.append(row)
        else:
            failures.append((row, SampleFailure(raw.keys[row], raw.uids[row], reason)))
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    names = [t.name for t in transforms]
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if raw.shapes is not None and raw.decode_errors is not None:
            decoded = pixels_batch([raw.images[row] for row in usable], [raw.shapes[row] for row in usable],
                                   [raw.decode_errors[row] for row in usable], device)
            result = preprocess_decoded(decoded, names)
        else:
            result = preprocess_batch([raw.images[row] for row in usable], names, device)
    if stream is not None:
        stream.synchronize()
    for position, reason in result.failures.items():
        row = usable[position]
        failures.append((row, SampleFailure(raw.keys[row], raw.uids[row], reason)))
    _keep_rows(batch, raw, [usable[position] for position in result.kept], device.type == "cuda")
    batch.failures = [f for _, f in sorted(failures, key=lambda pair: pair[0])]
    batch.images, batch.aux = result.pixels, result.aux
    batch.decode_s = time.perf_counter() - start
    return batch


class Loader:
    """Iterate `ShardStart, Batch..., ShardEnd` for each shard (shards interleaved when `readers` > 1), with
    bounded read-ahead.

    With `decode_device` set, workers decode and resize on that device (the GPU fast path; with
    `decode_in_readers` the reader processes decode `decode_share` of the batches, and workers upload and
    resize those and decode and resize the rest); otherwise
    with PIL on the CPU, handing uint8 batches (pinned for a CUDA device) to the device stage. With no
    transforms the images are not decoded at all (batches carry the samples' keys, texts and json).
    """

    def __init__(
        self,
        shards: Sequence[ShardRef],
        *,
        batch_size: int,
        transforms: Sequence[ImageTransform],
        needs_text: bool,
        nworkers: int = 2,
        pin_memory: bool = False,
        prefetch_batches: int | None = None,
        decode_device: torch.device | None = None,
        readers: int = DEFAULT_READERS,
        text_preprocessors: Sequence[str] = (),
        decode_in_readers: bool = False,
        decode_share: float = 1.0,
    ) -> None:
        self.shards = list(shards)
        self.batch_size = batch_size
        self.transforms = list(transforms)
        self.needs_text = needs_text
        self.nworkers = max(1, nworkers)
        self.pin_memory = pin_memory
        self.prefetch = prefetch_batches or 2 * self.nworkers + 2
        self.decode_device = decode_device
        self.decode_in_readers = decode_in_readers and decode_device is not None  # only the device path takes pixels
        self.decode_share = decode_share  # of the batches, with decode_in_readers; the device decodes the rest
        self.readers = max(1, readers)
        self.text_preprocessors = tuple(text_preprocessors)  # run by the readers (READER_TEXT_PREPROCESSORS)
        self.reader_pids: list[int] = []  # of the current iteration (tests check that none outlives it)
        self._started: ReaderPool | None = None

    def start(self) -> None:
        """Start the reader processes now, before iterating: they import, read and tokenize ahead (into their
        rings) while the caller does something else, e.g. build the models. `close` stops them if the loader
        is never iterated; an iteration takes them over (and stops them when it ends)."""
        if self._started is None:
            self._started = ReaderPool(self.shards, batch_size=self.batch_size, processes=self.readers,
                                       text_preprocessors=self.text_preprocessors, decode=self.decode_in_readers,
                                       decode_share=self.decode_share)
            self.reader_pids = self._started.pids

    def close(self) -> None:
        """Stop and reap readers started by `start` and not taken over by an iteration."""
        readers, self._started = self._started, None
        if readers is not None:
            readers.stop()
            readers.close()

    def __iter__(self) -> Iterator[Item]:
        out: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.nworkers, thread_name_prefix="d2m-decode")
        self.start()
        readers, self._started = self._started, None
        assert readers is not None
        dispatcher = threading.Thread(target=self._dispatch, args=(readers, out, pool, stop), name="d2m-dispatch",
                                      daemon=True)
        dispatcher.start()
        # The objects that exist now (modules, models) live as long as the run. Frozen, they are left out of the
        # garbage collector's full collections, which the batches' short-lived objects set off every few hundred
        # batches: each walked every object of the process (0.3 s with what a run worker imports, holding the GIL
        # the device stage needs). Unfrozen when the loop ends.
        gc.freeze()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    future, raw = item
                    batch = future.result()
                    readers.release(raw)  # prepared: its encoded images are no longer needed
                    yield batch
                else:
                    yield item
        finally:
            stop.set()
            readers.stop()
            while dispatcher.is_alive():  # unblock a dispatcher waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    dispatcher.join(timeout=0.05)
            pool.shutdown(wait=True, cancel_futures=True)
            readers.close()
            gc.unfreeze()

    def _put(self, out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _dispatch(self, readers: ReaderPool, out: queue.Queue[Any], pool: ThreadPoolExecutor, stop: threading.Event) -> None:
        try:
            for item in readers:
                if isinstance(item, RawBatch):
                    item = (self._submit(pool, item), item)
                elif isinstance(item, ShardBegins):
                    item = ShardStart(item.shard)
                elif isinstance(item, ShardDone):
                    item = ShardEnd(item.shard, item.error)
                if not self._put(out, item, stop):
                    return
            self._put(out, _DONE, stop)
        except BaseException as err:  # surfaced to the consumer, never swallowed (unless it stopped us)
            if not stop.is_set():
                self._put(out, err, stop)

    def _submit(self, pool: ThreadPoolExecutor, raw: RawBatch) -> Future[Batch]:
        stem = raw.shard.stem
        if self.decode_device is not None:
            return pool.submit(prepare_batch_on_device, stem, raw, self.transforms, self.needs_text, self.decode_device)
        return pool.submit(prepare_batch, stem, raw, self.transforms, self.needs_text, self.pin_memory)

"""The body of a reader process (`d2m_core.reading.readers` starts them and describes the protocol).

Kept apart so that a reader imports only what reading a tar needs: this module, `reading` and the standard
library's tar, json and compression code; no numpy, no multiprocessing, no subprocess (torch only when it
tokenizes captions, PIL only when it decodes images). Its pipes speak `multiprocessing.connection.Connection`'s
framing (a 4-byte big-endian length, or -1 and an 8-byte one), so the parent reads and writes them with Connection.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import signal
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from d2m_core.reading.reading import RawSample, ShardReadError, iter_samples
from d2m_core.reading.shards import ShardRef

COUNTER = struct.Struct("<q")  # a release: the ring is free up to this position
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
Columns = tuple[list[str], list["str | None"], list["str | None"], list["dict[str, Any] | None"], list["bytes | None"],
                list["str | None"], list[int], list[int]]  # a batch on the wire: `columns`


@dataclass
class Job:
    # (index in the run, stem, url, stripe, stripes): of the shard, send only batches b with b % stripes == stripe
    # (the others are read and dropped); readers that decode share a last round's shards so (`readers.plan`)
    shards: list[tuple[int, str, str, int, int]]
    batch_size: int
    ring_bytes: int
    text_preprocessors: tuple[str, ...] = ()  # run here on each batch's captions (READER_TEXT_PREPROCESSORS)
    decode: bool = False  # decode each image here (PIL, `decode_image`): its RGB pixels go through the ring
    decode_share: float = 1.0  # with decode: the share of batches decoded here (`decodes`); the rest stay encoded


class Pipe:
    """One end of a pipe framed as Connection frames it: `send` whole messages, `recv` them, `ready` to poll."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: bytes) -> None:
        size = len(data)
        header = _LENGTH.pack(size) if size <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
        view = memoryview(header + data) if size <= 1 << 16 else None
        if view is None:  # no copy of a large message: its header, then itself
            self._write(memoryview(header))
            view = memoryview(data)
        self._write(view)

    def _write(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view):]

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = os.read(self.fd, left)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def recv(self) -> bytes:
        (size,) = _LENGTH.unpack(self._read(4))
        if size == -1:
            (size,) = _LONG_LENGTH.unpack(self._read(8))
        return self._read(size)

    def ready(self) -> bool:
        return bool(select.select([self.fd], [], [], 0)[0])


class RingWriter:
    """The child's side of the ring: each image is copied there straight from the read buffer as it is read
    (one copy, into memory that is reused), waiting for the parent's releases when the ring is full.

    Writing goes back to the ring's start early, once its first quarter is free again: while the parent keeps
    up, the images cycle through the part of the ring that is already mapped (a page touched for the first
    time costs a fault; the whole ring, about 0.13 s of CPU), and a full ring is used as before."""

    def __init__(self, ring: mmap.mmap, size: int, releases: Pipe) -> None:
        self.ring, self.size, self.releases = ring, size, releases
        self.written = 0  # monotonic positions; physical = position % size
        self.released = 0
        self.sent = 0  # the end of the images and bodies of the batches sent so far
        self.reuse = size // 4

    def drain(self, block: bool) -> None:
        while block or self.releases.ready():
            self.released = max(self.released, COUNTER.unpack(self.releases.recv())[0])
            block = False

    def place(self, image: memoryview) -> tuple[int, int] | bytes:
        """Copy one image into the ring: (offset, length); or its bytes, to travel in the batch's message, when
        the ring cannot hold it (larger than the ring, or the ring is full of the batch being read)."""
        size = len(image)
        start = self.written
        lap = start - start % self.size
        if start - lap + size > self.size or self.released - lap >= max(self.reuse, size):
            start = lap + self.size  # at the ring's beginning: the image would wrap, or that space is free again
        while start + size - self.released > self.size:
            if self.released >= self.sent or size > self.size:  # nothing more will be released
                return bytes(image)
            self.drain(block=True)
        at = start % self.size
        self.ring[at:at + size] = image
        self.written = start + size
        return at, size


def columns(samples: Sequence[RawSample], inline: dict[int, bytes]) -> Columns:
    """A batch on the wire, one list a field (keys, problems, uids, jsons, txt members, image extensions, ring
    offsets, lengths): fewer objects to pickle and unpickle than one record a sample. A usable sample's image
    is at (offset, length) in the ring, or in `inline` by row (offset -1); other samples have offset -2."""
    exts: list[str | None] = []
    offsets: list[int] = []
    lengths: list[int] = []
    for row, raw in enumerate(samples):
        members = raw.members
        ext = raw.usable_image_ext
        at, length = -2, 0
        if ext is not None:
            placed = members[ext]
            if isinstance(placed, tuple):
                at, length = placed
            else:
                at, inline[row] = -1, placed
        exts.append(ext)
        offsets.append(at)
        lengths.append(length)
    return ([raw.key for raw in samples], [raw.problem for raw in samples], [raw.uid for raw in samples],
            [_shared_keys(raw.json) for raw in samples], [raw.members.get("txt") for raw in samples], exts, offsets,
            lengths)


_KEYS: dict[str, str] = {}  # one str object per json key seen: pickled once a message, then referenced


def _shared_keys(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The json with its keys replaced by equal str objects shared by every sample: the batch's message
    pickles each key once (pickle's memo) instead of once a sample, and the parent unpickles fewer objects."""
    if value is None:
        return None
    if len(_KEYS) > 4096:  # jsons with ever-new keys: start over rather than grow
        _KEYS.clear()
    return {_KEYS.setdefault(k, k): v for k, v in value.items()}


Pixels = tuple[list["tuple[int, int] | None"], list["str | None"]]  # per row: (height, width), decode error


def decode_into_ring(samples: Sequence[RawSample], place: Any) -> Pixels:
    """Decode each usable sample's image (`decode_image`, as the loader's PIL path) and put its RGB pixels
    (height x width x 3 bytes) where its encoded bytes were: in the ring through `place`, or inline. Returns
    each row's (height, width) and decode error; an image that fails keeps no member (its error says why)."""
    from d2m_core.reading.decoding import DecodeError, decode_image  # PIL: imported by readers that decode

    shapes: list[tuple[int, int] | None] = []
    errors: list[str | None] = []
    for raw in samples:
        ext = raw.usable_image_ext
        shape, error = None, None
        if ext is not None:
            try:
                image = decode_image(bytes(raw.members[ext]))
            except DecodeError as err:
                error = str(err)
                del raw.members[ext]
            else:
                shape = (image.height, image.width)
                raw.members[ext] = place(memoryview(image.tobytes()))
        shapes.append(shape)
        errors.append(error)
    return shapes, errors


def decodes(number: int, share: float) -> bool:
    """Whether a reader that decodes a `share` of a shard's batches decodes batch `number`: spread evenly
    (0.75: three of every four), the same batches whichever reader reads them."""
    return int((number + 1) * share + 1e-9) > int(number * share + 1e-9)


def place_encoded(samples: Sequence[RawSample], place: Any) -> None:
    """Put each usable sample's encoded image in the ring through `place` (or inline), as a reader that does
    not decode places them while reading."""
    for raw in samples:
        ext = raw.usable_image_ext
        if ext is not None:
            raw.members[ext] = place(memoryview(raw.members[ext]))


def _text_preprocessors(names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}  # the reader then never imports torch
    from d2m_core.reading.tokens import READER_TEXT_PREPROCESSORS

    unknown = [n for n in names if n not in READER_TEXT_PREPROCESSORS]
    if unknown:
        raise ValueError(f"not text preprocessors a reader runs: {unknown} (those are {list(READER_TEXT_PREPROCESSORS)})")
    return {name: READER_TEXT_PREPROCESSORS[name]() for name in names}


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def child_main(argv: Sequence[str]) -> int:
    """A reader process's body: FDS = job pipe, message pipe, ring file, parent pid."""
    job_fd, out_fd, ring_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the readers
    inbox, out = Pipe(job_fd), Pipe(out_fd)
    try:
        job: Job = pickle.loads(inbox.recv())
        ring = mmap.mmap(ring_fd, job.ring_bytes)
        writer = RingWriter(ring, job.ring_bytes, inbox)
        preprocessors = _text_preprocessors(job.text_preprocessors)

        def send_batch(index: int, number: int, samples: list[RawSample], placing: bool) -> None:
            inline: dict[int, bytes] = {}
            pixels = None
            if job.decode and decodes(number, job.decode_share):
                pixels = decode_into_ring(samples, writer.place)
            elif not placing:  # read without the ring: placed now, encoded (the device decodes them)
                place_encoded(samples, writer.place)
            batch = columns(samples, inline)
            texts = {}
            if preprocessors:  # captions decoded only when this reader tokenizes
                captions = [raw.text or "" for raw in samples]
                texts = {name: prepare(captions).numpy() for name, prepare in preprocessors.items()}
            writer.drain(block=False)  # keeps the release pipe from filling up
            body = pickle.dumps((index, number, batch, inline, texts, pixels), protocol=5)
            placed = writer.place(memoryview(body))  # in the ring with the batch's images, or in the message
            out.send(pickle.dumps(("batch", placed, writer.written)))
            writer.sent = writer.written

        for index, stem, url, stripe, stripes in job.shards:
            out.send(pickle.dumps(("start", index)))
            placing = not job.decode and stripes == 1  # encoded images go to the ring as read (else when sent)
            error, buffer, number = None, [], 0
            try:
                for raw in iter_samples(ShardRef(stem, url), image_sink=writer.place if placing else None):
                    buffer.append(raw)
                    if len(buffer) == job.batch_size:
                        if number % stripes == stripe:  # else another reader's batch
                            send_batch(index, number, buffer, placing)
                        buffer, number = [], number + 1
            except ShardReadError as err:
                error = str(err)
            if buffer and number % stripes == stripe:
                send_batch(index, number, buffer, placing)
            out.send(pickle.dumps(("end", index, error)))
        out.send(pickle.dumps(("done",)))
        return 0
    except (BrokenPipeError, EOFError):  # the parent went away or stopped us
        return 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it in the consumer
        import traceback

        try:
            out.send(pickle.dumps(("failed", traceback.format_exc())))
        except OSError:
            pass
        return 1

"""Tar reading in worker processes: each reads whole shards (`d2m_core.reading.reading`) and hands the parent batches
of samples with their images still encoded, the image bytes through a shared-memory ring, so that neither
reading nor copying images costs the parent's CPU (or its GIL).

Each reader is a child process (running `child_main`, which needs only the reading code) given one
anonymous shared-memory file (the ring) and two pipes. Shards are dealt round-robin: reader i reads shards
i, i+N, i+2N, ... in order, so N readers work on N shards at once and their batches arrive interleaved.

Parent -> child: the job (pickled), then release counters (8 bytes each): the ring is free up to there.
Child -> parent: pickled messages: ("start", index), ("batch", index, samples, inline, ring_end, texts),
("end", index, error), ("done",), or ("failed", traceback). Each image is copied into the ring straight from
the tar's read buffer as it is read; a batch's images stay there until the parent releases the batch
(`ReaderPool.release`). An image the ring cannot hold (larger than the ring, or the ring full of the batch
being read) travels in the batch's message (`inline`, by row).

Readers ignore Ctrl-C (the parent stops them), die with the parent (PR_SET_PDEATHSIG), and are stopped
and reaped by `ReaderPool.close` on every exit path: end of the run, an error, Ctrl-C.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from d2m_core.reading.reading import IMAGE_EXTENSIONS, RawSample, ShardReadError, iter_samples
from d2m_core.reading.shards import ShardRef

RING_BYTES = 128 * 2**20  # per reader; a batch of 512 DataComp-like samples is about 22 MB
_COUNTER = struct.Struct("<q")
Meta = tuple[str, str | None, dict[str, Any] | None, bytes | None, str | None, int, int]  # one sample on the wire


class ReaderError(RuntimeError):
    """A reader process failed (a bug or a crash, not a bad tar: those are shard errors)."""


@dataclass
class RawBatch:
    """Up to batch_size samples of one shard as read, images encoded (views into a reader's ring)."""

    shard: ShardRef
    samples: list[RawSample]
    reader: int
    ring_end: int  # release up to here once the images are no longer needed
    texts: dict[str, Any] = field(default_factory=dict)  # text preprocessor -> its (B, ...) array, one row a sample


@dataclass
class ShardBegins:
    shard: ShardRef


@dataclass
class ShardDone:
    shard: ShardRef
    error: str | None


RawItem = ShardBegins | RawBatch | ShardDone


@dataclass
class _Job:
    shards: list[tuple[int, str, str]]  # (index in the run, stem, url)
    batch_size: int
    ring_bytes: int
    text_preprocessors: tuple[str, ...] = ()  # run here on each batch's captions (READER_TEXT_PREPROCESSORS)


# --- the child ---------------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _RingWriter:
    """The child's side of the ring: each image is copied there straight from the read buffer as it is read
    (one copy, into memory that is reused), waiting for the parent's releases when the ring is full."""

    def __init__(self, ring: mmap.mmap, size: int, releases: Connection) -> None:
        self.ring, self.size, self.releases = ring, size, releases
        self.written = 0  # monotonic positions; physical = position % size
        self.released = 0
        self.sent = 0  # the end of the images of the batches sent so far

    def drain(self, block: bool) -> None:
        while block or self.releases.poll():
            self.released = max(self.released, _COUNTER.unpack(self.releases.recv_bytes())[0])
            block = False

    def place(self, image: memoryview) -> tuple[int, int] | bytes:
        """Copy one image into the ring: (offset, length); or its bytes, to travel in the batch's message, when
        the ring cannot hold it (larger than the ring, or the ring is full of the batch being read)."""
        size = len(image)
        start = self.written
        if start % self.size + size > self.size:  # would wrap: start at the ring's beginning
            start += self.size - start % self.size
        while start + size - self.released > self.size:
            if self.released >= self.sent or size > self.size:  # nothing more will be released
                return bytes(image)
            self.drain(block=True)
        at = start % self.size
        self.ring[at:at + size] = image
        self.written = start + size
        return at, size


def _wire(raw: RawSample, inline: dict[int, bytes], row: int) -> Meta:
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw.members), None) if raw.problem is None else None
    at, length = -1, 0
    if ext is not None:
        placed = raw.members[ext]
        if isinstance(placed, tuple):
            at, length = placed
        else:
            inline[row] = placed
    return raw.key, raw.problem, raw.json, raw.members.get("txt"), ext, at, length


def _text_preprocessors(names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}  # the reader then never imports torch
    from d2m_core.reading.tokens import READER_TEXT_PREPROCESSORS

    unknown = [n for n in names if n not in READER_TEXT_PREPROCESSORS]
    if unknown:
        raise ValueError(f"not text preprocessors a reader runs: {unknown} (those are {list(READER_TEXT_PREPROCESSORS)})")
    return {name: READER_TEXT_PREPROCESSORS[name]() for name in names}


def child_main(argv: Sequence[str]) -> int:
    """A reader process's body: FDS = job pipe, message pipe, ring file, parent pid."""
    job_fd, out_fd, ring_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the readers
    inbox, out = Connection(job_fd, writable=False), Connection(out_fd, readable=False)
    try:
        job: _Job = pickle.loads(inbox.recv_bytes())
        ring = mmap.mmap(ring_fd, job.ring_bytes)
        writer = _RingWriter(ring, job.ring_bytes, inbox)
        preprocessors = _text_preprocessors(job.text_preprocessors)

        def send_batch(index: int, samples: list[RawSample]) -> None:
            inline: dict[int, bytes] = {}
            metas = [_wire(raw, inline, row) for row, raw in enumerate(samples)]
            texts = {}
            if preprocessors:  # captions decoded only when this reader tokenizes
                captions = [raw.text or "" for raw in samples]
                texts = {name: prepare(captions).numpy() for name, prepare in preprocessors.items()}
            writer.drain(block=False)  # keeps the release pipe from filling up
            out.send_bytes(pickle.dumps(("batch", index, metas, inline, writer.written, texts), protocol=5))
            writer.sent = writer.written

        for index, stem, url in job.shards:
            out.send_bytes(pickle.dumps(("start", index)))
            error, buffer = None, []
            try:
                for raw in iter_samples(ShardRef(stem, url), image_sink=writer.place):
                    buffer.append(raw)
                    if len(buffer) == job.batch_size:
                        send_batch(index, buffer)
                        buffer = []
            except ShardReadError as err:
                error = str(err)
            if buffer:
                send_batch(index, buffer)
            out.send_bytes(pickle.dumps(("end", index, error)))
        out.send_bytes(pickle.dumps(("done",)))
        return 0
    except (BrokenPipeError, EOFError):  # the parent went away or stopped us
        return 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it in the consumer
        try:
            out.send_bytes(pickle.dumps(("failed", traceback.format_exc())))
        except OSError:
            pass
        return 1


# --- the parent --------------------------------------------------------------------------------------------


_CHILD_MAIN = "import sys; from d2m_core.reading.readers import child_main; sys.exit(child_main(sys.argv[1:]))"


def _ring_file(size: int) -> int:
    """An anonymous shared-memory file of `size` bytes (no name to leak if we are killed)."""
    try:
        fd = os.memfd_create("d2m-reader-ring", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(prefix="d2m-reader-ring-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


class _Reader:
    def __init__(self, job: _Job) -> None:
        ring_fd = _ring_file(job.ring_bytes)
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self.ring = mmap.mmap(ring_fd, job.ring_bytes)
            self.view = memoryview(self.ring)
            args = [str(job_r), str(out_w), str(ring_fd), str(os.getpid())]
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, *args],
                                            pass_fds=(job_r, out_w, ring_fd), stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (job_w, out_r):
                os.close(fd)
            raise
        finally:
            for fd in (job_r, out_w, ring_fd):
                os.close(fd)
        self.jobs = Connection(job_w, readable=False)
        self.messages = Connection(out_r, writable=False)
        self.jobs.send_bytes(pickle.dumps(job, protocol=5))
        self.finished = False


class ReaderPool:
    """`processes` reader processes over `shards`; iterate for ShardBegins / RawBatch / ShardDone items (each
    shard's items in order, shards interleaved), call `release` once a batch's images are used, `close` at the end."""

    def __init__(self, shards: Sequence[ShardRef], *, batch_size: int, processes: int, ring_bytes: int = RING_BYTES,
                 text_preprocessors: Sequence[str] = ()) -> None:
        self.shards = list(shards)
        count = max(1, min(processes, len(self.shards)))
        self._readers: list[_Reader] = []
        try:
            for i in range(count):
                mine = [(j, s.stem, s.url) for j, s in enumerate(self.shards) if j % count == i]
                self._readers.append(_Reader(_Job(mine, batch_size, ring_bytes, tuple(text_preprocessors))))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [r.process.pid for r in self._readers]

    def __iter__(self) -> Iterator[RawItem]:
        live = {r.messages: (i, r) for i, r in enumerate(self._readers)}
        while live:
            for conn in wait(list(live)):
                number, reader = live[conn]
                try:
                    message = pickle.loads(conn.recv_bytes())
                except EOFError:
                    code = reader.process.wait()
                    raise ReaderError(f"reader process {reader.process.pid} exited with status {code} "
                                      "before finishing its shards") from None
                kind = message[0]
                if kind == "batch":
                    yield self._batch(number, reader, message)
                elif kind == "start":
                    yield ShardBegins(self.shards[message[1]])
                elif kind == "end":
                    yield ShardDone(self.shards[message[1]], message[2])
                elif kind == "done":
                    reader.finished = True
                    del live[conn]
                else:
                    raise ReaderError(f"reader process {reader.process.pid} failed:\n{message[1]}")

    def _batch(self, number: int, reader: _Reader, message: tuple) -> RawBatch:
        _, index, metas, inline, end, texts = message
        view = reader.view
        samples = []
        for i, (key, problem, meta_json, text, ext, at, length) in enumerate(metas):
            members: dict[str, Any] = {}
            if ext is not None:
                members[ext] = view[at:at + length] if at >= 0 else inline[i]
            if text is not None:
                members["txt"] = text
            samples.append(RawSample(key=key, members=members, json=meta_json, problem=problem))
        return RawBatch(self.shards[index], samples, number, end, texts)

    def release(self, batch: RawBatch) -> None:
        """The batch's images are no longer needed: its reader may reuse their place in the ring."""
        reader = self._readers[batch.reader]
        if not reader.finished and reader.process.poll() is None:
            try:
                reader.jobs.send_bytes(_COUNTER.pack(batch.ring_end))
            except OSError:
                pass

    def stop(self) -> None:
        """Stop every reader (at once: they only read) and reap it; none is left behind. An iteration
        in another thread then ends (its pipes reach their end)."""
        for reader in self._readers:
            if reader.process.poll() is None:
                reader.process.terminate()
        for reader in self._readers:
            try:
                reader.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reader.process.kill()
                reader.process.wait()

    def close(self) -> None:
        """`stop`, then free the pipes and rings (once no other thread iterates)."""
        self.stop()
        for reader in self._readers:
            for conn in (reader.jobs, reader.messages):
                conn.close()
            try:
                reader.view.release()
                reader.ring.close()
            except BufferError:  # a batch still holds a view: the mapping goes with it
                pass
        self._readers = []


"""Tar reading in worker processes: each reads whole shards (`d2m_core.reading.reading`) and hands the parent batches
of samples with their images still encoded, the image bytes through a shared-memory ring, so that neither
reading nor copying images costs the parent's CPU (or its GIL).

Each reader is a child process (running `reader_child.child_main`, which imports only the reading code) given one
anonymous shared-memory file (the ring) and two pipes. Shards are dealt round-robin: reader i reads shards
i, i+N, i+2N, ... in order, so N readers work on N shards at once and their batches arrive interleaved.
Readers that decode share the shards of a last round that would leave some of them idle (`plan`, `stripes`): the
readers of such a shard each read all of it and decode every k-th batch, and the pool puts the batches back in
tar order.

Parent -> child: the job (pickled), then release counters (8 bytes each): the ring is free up to there.
Child -> parent: pickled messages: ("start", index), ("batch", body, ring_end), ("end", index, error), ("done",),
or ("failed", traceback). A batch's body, (index, number, columns, inline, texts, pixels) pickled, is placed in
the ring after its images (`body` is its (offset, length) there), so that it is written and read once, not
copied through the pipe. Each image is copied into the ring straight from the tar's read buffer as it is read;
a batch's images and body stay there until the parent releases the batch (`ReaderPool.release`). An image or
body the ring cannot hold (larger than the ring, or the ring full of the batch being read) travels in the
message instead (an image in `inline`, by row; the body as `body`'s bytes). A reader that decodes (`decode=True`) puts
each image's RGB pixels there instead, `pixels` giving each row's (height, width) and decode error; with
`decode_share` below 1 it leaves the other batches encoded (`pixels` None), for the device's decoder.

Readers ignore Ctrl-C (the parent stops them), die with the parent (PR_SET_PDEATHSIG), and are stopped
and reaped by `ReaderPool.close` on every exit path: end of the run, an error, Ctrl-C.
"""

from __future__ import annotations

import mmap
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from d2m_core.reading.reader_child import COUNTER, Job
from d2m_core.reading.reading import RawSample
from d2m_core.reading.shards import ShardRef

RING_BYTES = 128 * 2**20  # per reader; a batch of 512 DataComp-like samples is about 22 MB
DECODED_RING_BYTES = 2**30  # per reader that decodes: a batch of 512 images of 512 x 384 px is 302 MB of pixels


class ReaderError(RuntimeError):
    """A reader process failed (a bug or a crash, not a bad tar: those are shard errors)."""


@dataclass
class RawBatch:
    """Up to batch_size samples of one shard as read, a list a field, one row a sample in tar order; images
    encoded (views into a reader's ring)."""

    shard: ShardRef
    reader: int
    ring_end: int  # release up to here once the images are no longer needed
    keys: list[str]
    problems: list[str | None]  # why a sample cannot be used (RawSample.problem), or None
    uids: list[str | None]
    jsons: list[dict[str, Any] | None]
    captions: list[bytes | None]  # the txt members as stored
    images: list[memoryview | bytes | None]  # the encoded image of each sample without a problem
    image_exts: list[str | None]
    texts: dict[str, Any] = field(default_factory=dict)  # text preprocessor -> its (B, ...) array, one row a sample
    # From readers that decode (`decode=True`): `images` are RGB pixels (height x width x 3 bytes), each row's
    # (height, width) in `shapes` and its decode error in `decode_errors` (None where it decoded or has no image).
    shapes: list[tuple[int, int] | None] | None = None
    decode_errors: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, shard: ShardRef, samples: Sequence[RawSample]) -> RawBatch:
        """The batch of samples read in this process (images as bytes; nothing to release)."""
        exts = [s.usable_image_ext for s in samples]
        return cls(shard, -1, 0, [s.key for s in samples], [s.problem for s in samples], [s.uid for s in samples],
                   [s.json for s in samples], [s.members.get("txt") for s in samples],
                   [None if e is None else s.members[e] for s, e in zip(samples, exts)], exts)

    @property
    def samples(self) -> list[RawSample]:
        """The rows as RawSamples (members: the image, if any, and the txt)."""
        out = []
        for row, key in enumerate(self.keys):
            members: dict[str, Any] = {}
            if self.image_exts[row] is not None:
                members[self.image_exts[row]] = self.images[row]
            if self.captions[row] is not None:
                members["txt"] = self.captions[row]
            out.append(RawSample(key=key, members=members, json=self.jsons[row], problem=self.problems[row]))
        return out


@dataclass
class ShardBegins:
    shard: ShardRef


@dataclass
class ShardDone:
    shard: ShardRef
    error: str | None


RawItem = ShardBegins | RawBatch | ShardDone


def stripes(shards: int, processes: int) -> list[int]:
    """How many readers share each of `shards` shards when `processes` readers decode: every reader gets one
    shard's stripe while there are fewer shards than readers (the first shards take the extra readers); one
    reader a shard otherwise."""
    if shards >= processes or shards == 0:
        return [1] * shards
    return [processes // shards + (1 if j < processes % shards else 0) for j in range(shards)]


Task = tuple[int, int, int]  # (shard index, stripe, stripes): batches b of the shard with b % stripes == stripe


def plan(shards: int, processes: int, share: bool) -> list[list[Task]]:
    """Each reader's tasks, in order. Shards are dealt round-robin, one reader a shard; with `share` (readers
    that decode), the shards of a last round that would leave readers idle are shared in stripes instead, so
    that every reader works to the end: 4 shards and 12 readers, 3 a shard; 16 shards, 12 alone, then 3 a shard."""
    full = shards - shards % processes if share else shards  # dealt one reader a shard; the rest shared
    readers: list[list[Task]] = [[(j, 0, 1) for j in range(i, full, processes)] for i in range(processes)]
    reader = 0
    for j, count in zip(range(full, shards), stripes(shards - full, processes)):
        for k in range(count):
            readers[reader].append((j, k, count))
            reader += 1
    return [tasks for tasks in readers if tasks] or [[]]


@dataclass
class _Merge:
    """One shard's batches coming from its readers' stripes, put back in tar order."""

    stripes: int
    started: bool = False
    ended: int = 0  # stripes that sent their "end"
    error: str | None = None
    next: int = 0  # the batch number to hand on next
    waiting: dict[int, RawBatch] = field(default_factory=dict)


_CHILD_MAIN = "import sys; from d2m_core.reading.reader_child import child_main; sys.exit(child_main(sys.argv[1:]))"


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
    def __init__(self, job: Job) -> None:
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

    def __init__(self, shards: Sequence[ShardRef], *, batch_size: int, processes: int, ring_bytes: int | None = None,
                 text_preprocessors: Sequence[str] = (), decode: bool = False, decode_share: float = 1.0) -> None:
        self.shards = list(shards)
        tasks = plan(len(self.shards), max(1, processes), share=decode)
        self._stripes = [1] * len(self.shards)
        for j, _, count in (task for mine in tasks for task in mine):
            self._stripes[j] = count
        ring_bytes = ring_bytes or (DECODED_RING_BYTES if decode else RING_BYTES)
        self._readers: list[_Reader] = []
        try:
            for mine in tasks:
                work = [(j, self.shards[j].stem, self.shards[j].url, stripe, count) for j, stripe, count in mine]
                self._readers.append(_Reader(Job(work, batch_size, ring_bytes, tuple(text_preprocessors), decode,
                                                 decode_share)))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [r.process.pid for r in self._readers]

    def __iter__(self) -> Iterator[RawItem]:
        live = {r.messages: (i, r) for i, r in enumerate(self._readers)}
        merges = [_Merge(count) for count in self._stripes]
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
                    index, position, batch = self._batch(number, reader, message)
                    merge = merges[index]
                    merge.waiting[position] = batch
                    while merge.next in merge.waiting:
                        yield merge.waiting.pop(merge.next)
                        merge.next += 1
                elif kind == "start":
                    merge = merges[message[1]]
                    if not merge.started:
                        merge.started = True
                        yield ShardBegins(self.shards[message[1]])
                elif kind == "end":
                    merge = merges[message[1]]
                    merge.ended += 1
                    merge.error = merge.error or message[2]
                    if merge.ended == merge.stripes:
                        yield ShardDone(self.shards[message[1]], self._finish(merge))
                elif kind == "done":
                    reader.finished = True
                    del live[conn]
                else:
                    raise ReaderError(f"reader process {reader.process.pid} failed:\n{message[1]}")

    def _finish(self, merge: _Merge) -> str | None:
        """The shard's error once all its stripes ended. Batches left waiting behind a gap (readers that read
        the shard differently, e.g. a network error in one of them) are dropped and the shard fails. They are
        not released: a release frees its reader's ring up to the batch, over batches still being prepared,
        and a reader that shares a shard reads nothing else."""
        if not merge.waiting:
            return merge.error
        merge.waiting.clear()
        return merge.error or (f"the readers sharing this shard read it differently: batch {merge.next} never came")

    def _batch(self, number: int, reader: _Reader, message: tuple) -> tuple[int, int, RawBatch]:
        """(shard index, batch number in the shard, the batch) of a "batch" message."""
        _, placed, end = message
        view = reader.view
        body = view[placed[0]:placed[0] + placed[1]] if isinstance(placed, tuple) else placed
        index, position, columns, inline, texts, pixels = pickle.loads(body)
        keys, problems, uids, jsons, captions, exts, offsets, lengths = columns
        images = [view[at:at + length] if at >= 0 else inline[row] if at == -1 else None
                  for row, (at, length) in enumerate(zip(offsets, lengths))]
        shapes, errors = pixels if pixels is not None else (None, None)
        return index, position, RawBatch(self.shards[index], number, end, keys, problems, uids, jsons, captions, images,
                                         exts, texts, shapes, errors)

    def release(self, batch: RawBatch) -> None:
        """The batch's images are no longer needed: its reader may reuse their place in the ring."""
        reader = self._readers[batch.reader]
        if not reader.finished and reader.process.poll() is None:
            try:
                reader.jobs.send_bytes(COUNTER.pack(batch.ring_end))
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


"""Reading in processes: every sample handed over once, per shard in tar order; no reader process outlives
the loader (end of run, an error in the consumer, a crashed reader, Ctrl-C)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gone as _gone
from d2m_core.reading.decoding import DecodeError, decode_image
from d2m_core.reading.loader import Batch, Loader, ShardStart
from d2m_core.reading.reader_child import decodes
from d2m_core.reading.readers import RawBatch, ReaderError, ReaderPool, ShardBegins, plan, stripes
from d2m_core.reading.reading import iter_samples
from d2m_core.reading.shards import ShardRef
from d2m_core.testdata.faults import make_fault_shards


def _refs(shard_dir: Path) -> list[ShardRef]:
    return [ShardRef(p.stem, str(p)) for p in sorted(shard_dir.glob("*.tar"))]


def _loader(refs: list[ShardRef], readers: int, batch_size: int = 4) -> Loader:
    return Loader(refs, batch_size=batch_size, transforms=[], needs_text=True, nworkers=1, readers=readers)


def test_two_readers_hand_over_each_shard_in_tar_order(shard_dir: Path) -> None:
    refs = _refs(shard_dir)
    loader = _loader(refs, readers=2, batch_size=3)
    seen: dict[str, list[str]] = {}
    events: dict[str, list[str]] = {}
    for item in loader:
        stem = item.shard if isinstance(item, Batch) else item.shard.stem
        events.setdefault(stem, []).append(type(item).__name__)
        if isinstance(item, Batch):
            seen[stem] += item.keys + [f.key for f in item.failures]
        elif isinstance(item, ShardStart):
            seen[stem] = []
    assert sorted(seen) == [r.stem for r in refs]
    for ref in refs:
        assert seen[ref.stem] == [s.key for s in iter_samples(ref)]
        assert events[ref.stem][0] == "ShardStart" and events[ref.stem][-1] == "ShardEnd"
    assert _gone(loader.reader_pids)


@pytest.mark.parametrize("ring_bytes", [1 << 20, 40_000, 1_000])
def test_images_arrive_as_read_through_the_ring_or_inline(shard_dir: Path, ring_bytes: int) -> None:
    """Each image and json value for value, whether the ring holds several batches, less than one batch (the
    images it cannot hold travel in the message), or no image and no batch body at all (the body travels in
    the message too); and the ring's space is reused once released."""
    refs = _refs(shard_dir)
    expected = {r.stem: [(s.key, s.problem, s.json, s.image, s.members.get("txt")) for s in iter_samples(r)] for r in refs}
    got: dict[str, list[tuple]] = {r.stem: [] for r in refs}
    pool = ReaderPool(refs, batch_size=5, processes=2, ring_bytes=ring_bytes)
    try:
        for item in pool:
            if isinstance(item, RawBatch):
                got[item.shard.stem] += [(s.key, s.problem, s.json, None if s.problem else bytes(s.image),
                                          s.members.get("txt")) for s in item.samples]
                pool.release(item)
    finally:
        pool.close()
    for stem, samples in expected.items():
        assert got[stem] == [(k, p, j, None if p else i, t) for k, p, j, i, t in samples]
    assert sum(len(v) for v in got.values()) > 2 * 5  # several batches per reader: the ring was reused


@pytest.mark.parametrize("ring_bytes", [None, 1_000])
def test_readers_that_decode_send_pils_pixels_and_its_errors(shard_dir: Path, ring_bytes: int | None) -> None:
    """`gpu_decode: readers`: each usable image decoded as the PIL path decodes it, its RGB bytes through the ring
    (or inline, when the ring holds less than a batch), a decode error as DecodeError words it."""
    refs = _refs(shard_dir)
    expected: dict[str, list[object]] = {r.stem: [] for r in refs}
    for ref in refs:
        for sample in iter_samples(ref):
            if sample.problem is not None or sample.image is None:
                expected[ref.stem].append(None)
                continue
            try:
                image = decode_image(sample.image)
            except DecodeError as err:
                expected[ref.stem].append(str(err))
            else:
                expected[ref.stem].append(((image.height, image.width), image.tobytes()))
    got: dict[str, list[object]] = {r.stem: [] for r in refs}
    pool = ReaderPool(refs, batch_size=5, processes=2, ring_bytes=ring_bytes, decode=True)
    try:
        for item in pool:
            if isinstance(item, RawBatch):
                assert item.shapes is not None and item.decode_errors is not None
                for row, (shape, error) in enumerate(zip(item.shapes, item.decode_errors)):
                    got[item.shard.stem].append(error if error else None if shape is None else (shape, bytes(item.images[row])))
                pool.release(item)
    finally:
        pool.close()
    assert got == expected
    outcomes = [o for rows in got.values() for o in rows]
    assert any(isinstance(o, str) for o in outcomes) and sum(isinstance(o, tuple) for o in outcomes) > 10


def test_readers_that_decode_part_of_the_batches_leave_the_others_encoded(shard_dir: Path) -> None:
    """`reader_decode_share`: the batches a reader does not decode arrive as read (encoded, for the device's
    decoder), the others as PIL's pixels, spread evenly."""
    assert [decodes(n, 0.75) for n in range(8)] == [False, True, True, True, False, True, True, True]
    assert all(decodes(n, 1.0) for n in range(100)) and not any(decodes(n, 0.0) for n in range(100))
    refs = _refs(shard_dir)
    encoded = {r.stem: [s.image for s in iter_samples(r)] for r in refs}
    kinds: list[str] = []
    pool = ReaderPool(refs, batch_size=2, processes=2, decode=True, decode_share=0.5)
    try:
        for item in pool:
            if not isinstance(item, RawBatch):
                continue
            start = len([k for k in kinds if k.startswith(item.shard.stem)]) * 2
            expected = encoded[item.shard.stem][start:start + len(item)]
            if item.shapes is None:
                kinds.append(f"{item.shard.stem} encoded")
                assert [None if i is None else bytes(i) for i in item.images] == expected
            else:
                kinds.append(f"{item.shard.stem} decoded")
                for image, shape, data in zip(item.images, item.shapes, expected):
                    if shape is not None:
                        assert bytes(image) == decode_image(data).tobytes()
            pool.release(item)
    finally:
        pool.close()
    for ref in refs:  # batch 0 encoded, 1 decoded, ...
        assert [k.split()[1] for k in kinds if k.startswith(ref.stem)] == ["encoded", "decoded"] * 2 + ["encoded"]


def test_readers_spread_over_the_shards_they_decode() -> None:
    """More decoding readers than shards: every reader takes a stripe of one shard (the first shards the extra
    readers); otherwise one reader a shard, but for a last round that would leave readers idle."""
    assert stripes(4, 12) == [3, 3, 3, 3]
    assert stripes(5, 12) == [3, 3, 2, 2, 2]
    assert stripes(1, 3) == [3]
    assert stripes(8, 4) == [1] * 8 and stripes(4, 4) == [1] * 4
    assert stripes(0, 4) == []
    # a reader's tasks: (shard, stripe, stripes); a last round that would leave readers idle is shared
    assert plan(4, 12, share=True) == [[(j, k, 3)] for j in range(4) for k in range(3)]
    tasks = plan(16, 12, share=True)
    assert tasks[0] == [(0, 0, 1), (12, 0, 3)] and tasks[11] == [(11, 0, 1), (15, 2, 3)]
    assert all(len(mine) == 2 for mine in tasks)  # every reader busy to the end
    assert plan(24, 12, share=True) == plan(24, 12, share=False) == [[(i, 0, 1), (i + 12, 0, 1)] for i in range(12)]
    assert plan(16, 12, share=False)[0] == [(0, 0, 1), (12, 0, 1)] and len(plan(16, 12, share=False)[5]) == 1
    assert plan(0, 4, share=True) == plan(0, 4, share=False) == [[]]


def _handed_over(pool: ReaderPool) -> dict[str, list[tuple]]:
    """Per shard, what the pool hands on, in order: its start, each batch's rows (key, problem, shape, decode
    error, pixels) and its end with the error."""
    got: dict[str, list[tuple]] = {}
    try:
        for item in pool:
            if isinstance(item, RawBatch):
                assert item.shapes is not None and item.decode_errors is not None
                rows = [(k, p, shape, error, None if shape is None else bytes(image)) for k, p, shape, error, image
                        in zip(item.keys, item.problems, item.shapes, item.decode_errors, item.images)]
                got[item.shard.stem].append(("batch", rows))
                pool.release(item)
            elif isinstance(item, ShardBegins):
                assert item.shard.stem not in got
                got[item.shard.stem] = [("start",)]
            else:
                got[item.shard.stem].append(("end", item.error))
    finally:
        pool.close()
    return got


def test_readers_that_share_a_shard_hand_it_over_as_one_reader_does(shard_dir: Path, tmp_path: Path) -> None:
    """Readers that decode share shards in stripes of batches (all of them, with more readers than shards;
    a last round's, with fewer): the pool hands on the same batches, in tar order, with the same failures and
    the same shard errors (the fault corpus's truncated and unreadable tars) as one reader a shard."""
    corpus = make_fault_shards(tmp_path / "faults")
    refs = _refs(shard_dir) + [ShardRef(name, str(case.path)) for name, case in corpus.items()
                               if name.startswith(("truncated-", "corrupt-", "zeroed-")) or name in ("empty", "not-a-tar")]
    alone = _handed_over(ReaderPool(refs, batch_size=2, processes=1, decode=True))
    shared = ReaderPool(refs[:2], batch_size=2, processes=5, decode=True)
    assert len(shared.pids) == 5
    assert _handed_over(shared) == {r.stem: alone[r.stem] for r in refs[:2]}
    faults = refs[2:]
    reference = _handed_over(ReaderPool(faults, batch_size=1, processes=1, decode=True))
    shared = ReaderPool(faults, batch_size=1, processes=2 * len(faults) + 1, decode=True)
    assert _handed_over(shared) == reference
    tail = ReaderPool(faults, batch_size=1, processes=len(faults) - 2, decode=True)  # the last 2 shards shared
    assert len(tail.pids) == len(faults) - 2 and _handed_over(tail) == reference
    assert sum(len(items) - 2 for items in alone.values()) > 10  # batches, not only starts and ends
    assert any(items[-1][1] for items in alone.values()) and any(not items[-1][1] for items in alone.values())


def test_no_reader_outlives_an_abandoned_or_failing_loop(shard_dir: Path) -> None:
    loader = _loader(_refs(shard_dir), readers=2, batch_size=1)
    items = iter(loader)
    next(items)
    pids = loader.reader_pids
    assert len(pids) == 2 and not _gone(pids, within_s=0)
    items.close()  # the consumer stops early (a run that fails, a bench that has enough)
    assert _gone(pids)
    with pytest.raises(RuntimeError, match="consumer failed"):
        for item in loader:
            if isinstance(item, Batch):
                raise RuntimeError("consumer failed")
    assert _gone(loader.reader_pids)


def test_the_loop_keeps_what_existed_before_it_out_of_full_collections_until_it_ends(shard_dir: Path) -> None:
    before = gc.get_freeze_count()
    loader = _loader(_refs(shard_dir), readers=1)
    during = [gc.get_freeze_count() for _ in loader]
    assert min(during) > before and gc.get_freeze_count() == before
    items = iter(loader)
    next(items)
    assert gc.get_freeze_count() > before
    items.close()  # an abandoned loop unfreezes too
    assert gc.get_freeze_count() == before


def test_readers_started_ahead_are_taken_over_by_the_loop_or_stopped_by_close(shard_dir: Path) -> None:
    refs = _refs(shard_dir)
    loader = _loader(refs, readers=2, batch_size=3)
    loader.start()
    pids = loader.reader_pids
    assert len(pids) == 2 and not _gone(pids, within_s=0)
    loader.start()  # once only
    assert loader.reader_pids == pids
    keys = [k for item in loader if isinstance(item, Batch) for k in item.keys + [f.key for f in item.failures]]
    assert loader.reader_pids == pids  # the loop read with the readers started ahead, then stopped them
    assert sorted(keys) == sorted(s.key for r in refs for s in iter_samples(r))
    assert _gone(pids)
    loader.start()
    again = loader.reader_pids
    assert again != pids and not _gone(again, within_s=0)
    loader.close()  # never iterated: close reaps them
    assert _gone(again)
    loader.close()  # and a second close is harmless


def test_a_crashed_reader_fails_the_loop_instead_of_hanging(shard_dir: Path) -> None:
    refs = [ShardRef(f"{r.stem}-{i}", r.url) for i in range(100) for r in _refs(shard_dir)]  # more than a pipe holds
    loader = _loader(refs, readers=1, batch_size=1)
    with pytest.raises(ReaderError, match="exited with status"):
        for i, item in enumerate(loader):
            if i == 0:
                os.kill(loader.reader_pids[0], signal.SIGKILL)
    assert _gone(loader.reader_pids)


CTRL_C_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal: a test runner may pass SIGINT ignored
from d2m_core.reading.loader import Loader
from d2m_core.reading.shards import ShardRef
refs = [ShardRef(p.split("/")[-1][:-4], p) for p in sys.argv[1:]]
loader = Loader(refs * 50, batch_size=1, transforms=[], needs_text=True, nworkers=1, readers=2)
for i, item in enumerate(loader):
    if i == 0:
        print(" ".join(map(str, loader.reader_pids)), flush=True)
    time.sleep(0.01)
"""


def test_ctrl_c_stops_the_readers(shard_dir: Path) -> None:
    tars = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, *tars], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert _gone(pids)


def test_the_loader_benchmark_counts_every_sample_with_or_without_decoding(shard_dir: Path) -> None:
    from d2m_core.bench import loader_stage

    refs = _refs(shard_dir)
    held = sum(1 for ref in refs for _ in iter_samples(ref))
    for decode in (False, True):  # `--decode`: the readers decode (gpu_decode: readers)
        out = loader_stage(refs, processes=2, batch_size=4, decode=decode)
        assert (out["stage"], out["processes"], out["samples"], out["decode"]) == ("loader", 2, held, decode)

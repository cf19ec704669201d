"""Property tests on hostile input: random and mutated tars to the reader, random and mutated bytes to the decoder.

Never a crash other than ShardReadError / DecodeError, never a hang (hypothesis deadline, bounded examples),
every member accounted for, and nothing from inside a tar ever used as a path: nothing is written to disk.
"""

from __future__ import annotations

import builtins
import io
import os
import tarfile
from pathlib import Path

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from d2m_core.reading import reading
from d2m_core.reading.decoding import DecodeError, decode_image
from d2m_core.reading.reading import TRUNCATED, ReadReport, ShardReadError, iter_samples
from d2m_core.reading.shards import ShardRef
from d2m_core.testdata.synth import make_shards

FUZZ = settings(max_examples=150, deadline=2000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_memory = fsspec.filesystem("memory")
_counter = iter(range(10**9))


@pytest.fixture(scope="module")
def valid_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("fuzz")
    (path,) = make_shards(out, shards=1, samples=4, max_side=32)
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_images() -> list[bytes]:
    img = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    out = []
    for fmt, kwargs in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def no_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fail on any file opened for writing or any tar extraction; run in an empty folder, checked after."""
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"opened {file!r} for writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise AssertionError(f"os.open({path!r}) for writing")
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    for name in ("extract", "extractall", "makefile", "makelink", "makedir"):
        monkeypatch.setattr(tarfile.TarFile, name, lambda *a, **k: pytest.fail("tar extraction"))
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    yield tmp_path
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


class _EndRecordingInfo(tarfile.TarInfo):
    """tarfile ends iteration silently on a bad header past offset 0: remember which error it was."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as err:
            tf.d2m_end = err  # type: ignore[attr-defined]
            raise


def _tarfile_members(data: bytes) -> tuple[list[tuple], tuple]:
    """The oracle: each member (name, directory?, data) and how the walk ended, as tarfile's stream mode sees them."""
    members: list[tuple] = []
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r|*", tarinfo=_EndRecordingInfo)
        for info in tf:
            tf.members = []
            read = info.isreg() and info.size <= reading.MAX_MEMBER_BYTES
            members.append((info.name, info.isdir(), info.isreg(), tf.extractfile(info).read() if read else None))
        trailing = tf.fileobj.read(len(data))
        end: tuple = (type(getattr(tf, "d2m_end", None)).__name__, tf.offset, trailing.count(0) == len(trailing))
    except reading._READ_ERRORS as err:
        end = (type(err).__name__, str(err))
    return members, end


def _fast_members(data: bytes) -> tuple[list[tuple], tuple]:
    """d2m's own member walk over the same bytes, in the oracle's terms."""
    members: list[tuple] = []
    try:
        state = reading._TarState(reading._Blocks(reading._decompressed(io.BytesIO(data))))
        for m in reading._tar_members(state):
            name, isdir, kind, _, _ = m
            members.append((name, isdir, kind is None and not isdir,
                            bytes(reading._member_data(state, m)) if reading.readable(m) else None))
        trailing = state.fileobj.read(len(data))
        end: tuple = (type(state.end).__name__, state.offset, trailing.count(0) == len(trailing))
    except reading._READ_ERRORS as err:
        end = (type(err).__name__, str(err))
    return members, end


def _read(data: bytes) -> tuple[list, ReadReport | None]:
    """All samples of `data` as a tar (held in fsspec's memory file system, never on disk); d2m's tar reader
    sees exactly the members, data and end that tarfile sees."""
    ours, oracle = _fast_members(data), _tarfile_members(data)
    if not isinstance(reading._decompressed(io.BytesIO(data)), reading._Prefixed):  # gzip/bz2/xz: the members,
        ours, oracle = (ours[0], len(ours[1]) == 2), (oracle[0], len(oracle[1]) == 2)  # and whether it broke
    assert ours == oracle
    url = f"memory://fuzz/{next(_counter)}.tar"
    _memory.pipe(url, data)
    try:
        report = ReadReport(url)
        try:
            samples = list(iter_samples(ShardRef("fuzz", url), report))
        except ShardReadError as err:
            assert url in str(err)
            return [], None
        assert report.done and report.samples == len(samples)
        assert sum(len(s.names) for s in samples) == report.members  # every non-directory member, once
        for s in samples:
            s.key.encode("utf-8")  # a str that can be written (no lone surrogates)
            if s.problem is None:
                assert s.image is not None and s.uid is not None and isinstance(s.json, dict)
        if report.truncated is not None:
            assert samples and samples[-1].problem.startswith(TRUNCATED)
        return samples, report
    finally:
        _memory.rm(url)


def test_the_fast_scan_reads_a_valid_tar(valid_tar: bytes) -> None:
    """The fuzz tests below compare the fast scan (headers checked together, data read with them) to tarfile:
    on a valid tar it reads every member after the first (read before anything is buffered), so a mutated
    one is read by it up to the mutation."""
    state = reading._TarState(reading._Blocks(reading._decompressed(io.BytesIO(valid_tar))))
    members = list(reading._tar_members(state))
    assert len(members) == 12 and all(m[4] is not None for m in members[1:])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_a_tar(no_writes: Path, data: bytes) -> None:
    _read(data)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 2000)),
    st.tuples(st.just("zero-block"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, where, arg in mutations:
        at = where % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= arg
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg]
        elif kind == "zero-block":
            block = at - at % 512
            buf[block:block + 512] = bytes(min(512, len(buf) - block))
    return bytes(buf)


@FUZZ
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_tar(no_writes: Path, valid_tar: bytes, mutations: list[tuple]) -> None:
    _read(_mutate(valid_tar, mutations))


@FUZZ
@given(data=st.data())
def test_tar_with_mutated_headers(no_writes: Path, valid_tar: bytes, data: st.DataObject) -> None:
    """Most random flips land in image bytes; these land in member headers (name, size, type, checksum)."""
    with tarfile.open(fileobj=io.BytesIO(valid_tar)) as tar:
        headers = [m.offset for m in tar.getmembers()]
    spots = st.tuples(st.sampled_from(headers), st.integers(0, 511)).map(sum)
    mutations = data.draw(st.lists(st.one_of(
        st.tuples(st.just("flip"), spots, st.integers(1, 255)),
        st.tuples(st.just("truncate"), spots, st.just(0)),
        st.tuples(st.just("zero-block"), spots, st.just(0))), min_size=1, max_size=3))
    _read(_mutate(valid_tar, mutations))


_names = st.one_of(
    st.sampled_from(["../../etc/x.jpg", "/abs/y.jpg", "/etc/passwd", "..", "../", "./a.txt", "a/../../b.json",
                     "README", ".hidden", "x.", ".x.jpg", "a.b.c.d", "dir/", "k.jpg", "k.json", "k.txt", "K.JPG",
                     "__meta__", "x" * 300 + ".jpg", "caf\xe9.jpg", "\u202eevil.jpg", "nul\x00.jpg"]),
    st.text(min_size=1, max_size=40),
)
_types = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                          tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])


_members = st.lists(st.tuples(_names, _types, st.binary(max_size=64)), max_size=12)


def _build_tar(members: list[tuple[str, bytes, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            try:
                tar.addfile(info, io.BytesIO(data) if info.size else None)
            except (ValueError, UnicodeError):  # a name the format cannot hold
                continue
    return buf.getvalue()


@FUZZ
@given(members=_members, fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_adversarial_member_names_and_types_are_only_records(no_writes: Path, members: list, fmt: int) -> None:
    data = _build_tar(members, fmt)
    samples, report = _read(data)
    assert report is not None and report.truncated is None  # a well-formed tar, whatever its names
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    files = [m for m in infos if not m.isdir()]
    assert report.members == len(files) and report.directories == len(infos) - len(files)
    # a link or device member is never read through: each one is named in its sample's failure reason
    links = sum(not m.isreg() for m in files)
    assert sum((s.problem or "").count("not a regular file") for s in samples) == links


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on corrupt EXIF / TIFF tags
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_an_image(no_writes: Path, data: bytes) -> None:
    try:
        image = decode_image(data)
    except DecodeError:
        return
    assert image.mode == "RGB" and image.width * image.height > 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on corrupt EXIF / TIFF tags
@FUZZ
@given(index=st.integers(0, 5), mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_mutated_image(no_writes: Path, valid_images: list[bytes], index: int, mutations: list[tuple]) -> None:
    try:
        image = decode_image(_mutate(valid_images[index], mutations))
    except DecodeError:
        return
    assert image.mode == "RGB" and image.width * image.height > 0

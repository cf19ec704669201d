"""storage: crashed writers, a full disk and a flaky S3 never leave a partial file where readers look."""

from __future__ import annotations

import errno
import http.client
import io
import logging
import os
import resource
import signal
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from services import tmpfs
from d2m_core.outputs import codec, storage
from d2m_core.outputs.storage import RetryPolicy, StorageError, sweep_partial_files, write_bytes_atomic

FAST = RetryPolicy(attempts=8, backoff_s=0.1, max_backoff_s=0.4, deadline_s=10.0)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.stat().st_size == 0))


def _in_child(work: Callable[[], str | None]) -> tuple[int, str]:
    """Run `work` in a forked process (storage already imported: no interpreter start-up); returns the wait
    status and what `work` returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.write(write_end, (work() or "").encode())
        except BaseException as err:  # noqa: BLE001
            os.write(write_end, repr(err).encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        output = fh.read()
    _, status = os.waitpid(pid, 0)
    return status, output


# --- crashed and live writers --------------------------------------------------------------------------------


def test_a_writer_killed_before_the_rename_leaves_no_file_and_its_leftover_is_swept(tmp_path: Path, caplog) -> None:
    target = tmp_path / "out" / "00001.npz"

    def killed_before_rename() -> None:
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # dies with the data written
        write_bytes_atomic(str(target), b"x" * 100_000)

    status, _ = _in_child(killed_before_rename)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (leftover,) = target.parent.iterdir()
    assert leftover.name.startswith(".00001_npz.") and leftover.name.endswith(".tmp") and not target.exists()
    assert ".npz" not in leftover.name and ".parquet" not in leftover.name  # no reader takes it for an output
    with caplog.at_level(logging.WARNING, logger="d2m_core.outputs.storage"):
        write_bytes_atomic(str(target.parent / "00002.npz"), b"next")  # the next write into the folder sweeps it
    assert sorted(p.name for p in target.parent.iterdir()) == ["00002.npz"]
    assert "removed 1 partial file(s)" in caplog.text and leftover.name in caplog.text


def test_a_live_writers_temporary_file_is_never_swept(tmp_path: Path) -> None:
    target, ready, go = tmp_path / "x.parquet", tmp_path / "ready", tmp_path / "go"
    real_replace = os.replace

    def slow_replace(src: str, dst: str) -> None:
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
        real_replace(src, dst)

    def paused_writer() -> None:
        os.replace = slow_replace
        write_bytes_atomic(str(target), b"complete")

    result: list[tuple[int, str]] = []
    waiter = threading.Thread(target=lambda: result.append(_in_child(paused_writer)))
    waiter.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert waiter.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.01)
    assert sweep_partial_files(str(tmp_path)) == []  # locked by its live writer: kept
    assert len(list(tmp_path.glob(".x_parquet.*.tmp"))) == 1
    go.touch()
    waiter.join(30)
    assert result and os.WIFEXITED(result[0][0]) and os.WEXITSTATUS(result[0][0]) == 0, result
    assert target.read_bytes() == b"complete" and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_sweep_only_takes_our_abandoned_temporary_files(tmp_path: Path) -> None:
    fresh_empty = tmp_path / ".a_json.0123abcd.tmp"
    old_empty = tmp_path / "b.json.89abcdef.tmp"
    full = tmp_path / "c.npz.deadbeef.tmp"  # an older d2m's name: swept too
    others = [tmp_path / "notes.tmp", tmp_path / "d.json.XYZ.tmp", tmp_path / "e.parquet"]
    for path in (fresh_empty, old_empty, *others):
        path.touch()
    full.write_bytes(b"partial")
    os.utime(old_empty, (time.time() - 3600, time.time() - 3600))
    removed = sweep_partial_files(str(tmp_path))
    assert sorted(Path(p).name for p in removed) == [old_empty.name, full.name]
    assert fresh_empty.exists() and all(p.exists() for p in others)  # a writer may be about to lock it; not ours


# --- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root or CAP_SYS_ADMIN); skipped where mounting is refused."""
    with tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder` until about `leave` bytes are free."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_disk_full_names_the_file_and_keeps_the_previous_version(small_disk: Path) -> None:
    target = small_disk / "out" / "00001.npz"
    write_bytes_atomic(str(target), b"version 1")
    fill(small_disk, leave=16 * 1024)
    with pytest.raises(StorageError) as raised:
        write_bytes_atomic(str(target), os.urandom(64 * 1024))
    assert raised.value.errno == errno.ENOSPC
    assert str(target) in str(raised.value) and "No space left on device" in str(raised.value)
    assert target.read_bytes() == b"version 1"
    assert [p.name for p in target.parent.iterdir()] == ["00001.npz"]


def test_file_size_limit_names_the_file_and_keeps_the_previous_version(tmp_path: Path) -> None:
    """Without root: RLIMIT_FSIZE (what `prlimit --fsize` sets) makes the write fail with EFBIG instead."""
    target = tmp_path / "00001.parquet"
    target.write_bytes(b"version 1")

    def limited() -> str:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            write_bytes_atomic(str(target), b"x" * 200_000)
        except StorageError as err:
            return f"{err.errno} {err}"
        return "written"

    _, out = _in_child(limited)
    assert out.startswith(f"{errno.EFBIG} ") and str(target) in out and "File too large" in out, out
    assert target.read_bytes() == b"version 1" and [p.name for p in tmp_path.iterdir()] == ["00001.parquet"]


# --- the same inputs give the same bytes ---------------------------------------------------------------------


def test_npz_and_parquet_bytes_are_deterministic(tmp_path: Path) -> None:
    arrays = {"b32_img": np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32),
              "boxes": [[[0.1, 0.2, 0.3, 0.4]], []]}
    first = storage.npz_bytes(storage.pack_fields(arrays))
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}  # no clock in the bytes
    assert storage.npz_bytes(storage.pack_fields(arrays)) == first
    table = pa.table({"score": pa.array([0.5, 0.25], pa.float32()), "uid": ["a", None]})
    storage.write_parquet(str(tmp_path / "1.parquet"), table)
    storage.write_parquet(str(tmp_path / "2.parquet"), table)
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()


def test_pieces_are_written_as_the_joined_bytes(tmp_path: Path) -> None:
    arrays = _npz_arrays()
    write_bytes_atomic(str(tmp_path / "x.npz"), storage.npz_pieces(arrays))
    assert (tmp_path / "x.npz").read_bytes() == storage.npz_bytes(arrays)
    write_bytes_atomic(str(tmp_path / "y.bin"), [b"ab", b"", b"cde"])
    assert (tmp_path / "y.bin").read_bytes() == b"abcde"


def test_read_parquet_reads_the_columns_asked_for(tmp_path: Path) -> None:
    table = pa.table({"key": ["a", "b", "c"], "uid": ["1", "2", None], "json": ['{"x": 1}', None, "{}"]})
    storage.write_parquet(str(tmp_path / "t.parquet"), table)
    assert storage.read_parquet(str(tmp_path / "t.parquet")).equals(table)
    assert storage.read_parquet(str(tmp_path / "t.parquet"), {"json", "uid", "absent"}).equals(table.select(["uid", "json"]))
    assert storage.read_parquet(str(tmp_path / "t.parquet"), ["absent"]).num_rows == 3  # no column: the rows stay


# --- S3: outages and 5xx -------------------------------------------------------------------------------------


class S3:
    """A real S3 API (moto) on a fixed loopback port, which can be stopped and started again (state kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server_class = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start(self) -> None:
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        self.running = True


def _point_at(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    import fsspec
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    import boto3

    server = S3()
    _point_at(monkeypatch, server.port)
    boto3.client("s3").create_bucket(Bucket="meta")
    try:
        yield server
    finally:
        server.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_write_waits_out_an_outage_within_the_retry_window(s3: S3, caplog) -> None:
    write_bytes_atomic("s3://meta/warm.json", b"{}")  # a pooled connection exists when the server goes away
    s3.stop()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            write_bytes_atomic("s3://meta/shards/00001.npz", b"payload", retry=FAST)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    with caplog.at_level(logging.WARNING, logger="d2m_core.outputs.storage"):
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(1.0)
        s3.start()
        writer.join(30)
    assert not writer.is_alive() and errors == []
    assert storage.read_bytes("s3://meta/shards/00001.npz", retry=FAST) == b"payload"
    assert "write s3://meta/shards/00001.npz failed" in caplog.text and "retry 1 of 7" in caplog.text


def test_s3_down_for_good_fails_after_bounded_attempts_naming_the_url(s3: S3) -> None:
    s3.stop()
    policy = RetryPolicy(attempts=4, backoff_s=0.2, max_backoff_s=1.0, deadline_s=3.0)
    with pytest.raises(StorageError, match=r"cannot write s3://meta/shards/00002\.npz: .*\(4 attempt\(s\) in"):
        write_bytes_atomic("s3://meta/shards/00002.npz", b"payload", retry=policy)
    with pytest.raises(StorageError, match=r"cannot read s3://meta/shards/00002\.npz"):
        storage.read_bytes("s3://meta/shards/00002.npz", retry=policy)


def test_retry_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2M_IO_ATTEMPTS", "3")
    monkeypatch.setenv("D2M_IO_BACKOFF_S", "0.05")
    monkeypatch.setenv("D2M_IO_DEADLINE_S", "2")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=8.0, deadline_s=2.0)
    monkeypatch.setenv("D2M_IO_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="D2M_IO_ATTEMPTS"):
        RetryPolicy.from_env()


class FlakyProxy:
    """A loopback HTTP proxy in front of moto: answers 503 to the next `failures` requests, forwards the rest,
    and records each request line."""

    UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                   b"<Message>Service Unavailable</Message></Error>")

    def __init__(self, upstream: int) -> None:
        self.failures = 0
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                proxy.requests.append((self.command, self.path))
                if proxy.failures > 0:
                    proxy.failures -= 1
                    self._reply(503, [("Content-Type", "application/xml")], proxy.UNAVAILABLE)
                    return
                skip = {"transfer-encoding", "expect", "connection", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
                self._reply(response.status, kept, data)

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(s3.port)
    _point_at(monkeypatch, proxy.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_s3_503s_are_retried_for_writes_and_reads(flaky: FlakyProxy, caplog) -> None:
    flaky.failures = 2
    with caplog.at_level(logging.WARNING, logger="d2m_core.outputs.storage"):
        write_bytes_atomic("s3://meta/00003.parquet", b"rows", retry=FAST)
        flaky.failures = 2
        assert storage.read_bytes("s3://meta/00003.parquet", retry=FAST) == b"rows"
    assert caplog.text.count("(HTTP 503 ") == 4 and "ServiceUnavailable" in caplog.text
    assert [m for m, _ in flaky.requests[:3]] == ["PUT"] * 3 and flaky.requests[-1] == ("GET", "/meta/00003.parquet")


def test_s3_503_for_good_fails_naming_the_url_and_nothing_is_written(flaky: FlakyProxy) -> None:
    flaky.failures = 10**6
    with pytest.raises(StorageError, match=r"cannot write s3://meta/00004\.json: .*ServiceUnavailable"):
        write_bytes_atomic("s3://meta/00004.json", b"{}", retry=RetryPolicy(attempts=3, backoff_s=0.05, deadline_s=5))
    flaky.failures = 0
    assert not storage.exists("s3://meta/00004.json")


def test_s3_missing_object_is_not_retried(flaky: FlakyProxy) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://meta/absent.npz", retry=FAST)
    assert flaky.requests.count(("HEAD", "/meta/absent.npz")) == 1  # a 404 is an answer: asked once


def test_large_s3_objects_are_one_put_not_a_multipart_upload(flaky: FlakyProxy) -> None:
    size = 101 * 2**20  # above s3fs's own multipart threshold (2 x 50 MiB)
    write_bytes_atomic("s3://meta/big.npz", b"\1" * size, retry=FAST)
    assert flaky.requests == [("PUT", "/meta/big.npz")]
    assert storage.exists("s3://meta/big.npz")


# --- npz: what numpy.load and zipfile read, written and read back by d2m -------------------------------------


def _npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    features = rng.standard_normal((300, 512)).astype(np.float32)
    return {"b32_img": features / np.linalg.norm(features, axis=1, keepdims=True),
            "text": np.array(["a caption", "caf\xe9 \u2603"]), "empty": np.zeros((0, 4), np.float32),
            "ints": np.arange(7, dtype=np.int64), "fortran": np.asfortranarray(rng.random((3, 5))),
            "scalar": np.float32(2.5), "ragged.values": np.ones((2, 4), np.float32)}


@pytest.mark.parametrize("zip64", [False, True])
def test_npz_bytes_are_what_numpy_load_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64: bool) -> None:
    arrays = _npz_arrays()
    if zip64:  # every size and offset past the limit: the zip64 fields that >4 GiB members need
        monkeypatch.setattr(storage, "_ZIP64_LIMIT", 100)
    monkeypatch.setattr(storage, "NPZ_CHUNK", 4096)  # many pieces per member, deflated in parallel
    data = storage.npz_bytes(arrays)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == [f"{k}.npy" for k in arrays]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(io.BytesIO(data)) as loaded:
        assert loaded.files == list(arrays)
        for key, value in arrays.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == np.shape(value)
            assert np.array_equal(loaded[key], value)
    reference = io.BytesIO()
    np.savez_compressed(reference, **arrays)
    assert len(data) <= 1.01 * len(reference.getvalue())  # ISA-L or Huffman-only deflate: about numpy's size


def test_npz_deflaters_give_the_same_arrays_and_isal_is_no_larger(monkeypatch: pytest.MonkeyPatch) -> None:
    """ISA-L (when installed) and zlib's Huffman-only fallback write different bytes that numpy.load and
    read_npz read as the same arrays, each reading the other's; on unit float32 features ISA-L's file is no
    larger than Huffman-only's, on bf16-valued ones smaller."""
    pytest.importorskip("isal")
    monkeypatch.setattr(storage, "NPZ_CHUNK", 1 << 16)  # several pieces per member
    rng = np.random.default_rng(3)
    unit = rng.standard_normal((2000, 64), dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    bf16 = (unit.view(np.uint32) & 0xFFFF0000).view(np.float32)
    arrays = _npz_arrays() | {"unit": unit, "bf16": bf16}
    fast = storage.npz_bytes(arrays)
    fast_sizes = {k: _member_size(fast, k) for k in ("unit", "bf16")}
    monkeypatch.setattr(codec, "_isal", None)
    plain = storage.npz_bytes(arrays)
    assert fast != plain
    for data in (fast, plain):
        with np.load(io.BytesIO(data)) as loaded:
            assert loaded.files == list(arrays) and all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    for data in (fast, plain):  # read_npz inflates with zlib here (ISA-L is patched out), ISA-L below
        assert all(np.array_equal(storage.read_npz_bytes(data)[k], v) for k, v in arrays.items())
    monkeypatch.undo()
    for data in (fast, plain):
        assert all(np.array_equal(storage.read_npz_bytes(data)[k], v) for k, v in arrays.items())
    assert fast_sizes["unit"] <= _member_size(plain, "unit")
    assert fast_sizes["bf16"] < _member_size(plain, "bf16")


def _member_size(data: bytes, key: str) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.getinfo(f"{key}.npy").compress_size


@pytest.mark.parametrize("writer", ["d2m", "savez_compressed", "savez"])
def test_read_npz_reads_what_numpy_load_reads(tmp_path: Path, writer: str) -> None:
    arrays, path = _npz_arrays(), tmp_path / "x.npz"
    if writer == "d2m":
        path.write_bytes(storage.npz_bytes(arrays))
    else:
        getattr(np, writer)(path, **arrays)
    ours = storage.read_npz(str(path))
    with np.load(path) as loaded:
        assert list(ours) == loaded.files
        for key in loaded.files:
            assert ours[key].dtype == loaded[key].dtype and ours[key].shape == loaded[key].shape
            assert np.array_equal(ours[key], loaded[key]) and ours[key].flags.writeable
    assert list(storage.read_npz(str(path), {"ints", "text"})) == ["text", "ints"]


def test_read_npz_rejects_a_corrupt_member(tmp_path: Path) -> None:
    data = bytearray(storage.npz_bytes({"x": np.arange(1000, dtype=np.float32)}))
    data[200] ^= 0xFF  # inside the deflated data
    (tmp_path / "x.npz").write_bytes(bytes(data))
    with pytest.raises((zipfile.BadZipFile, zlib.error)):
        storage.read_npz(str(tmp_path / "x.npz"))


def test_read_npz_reads_a_rewritten_file_anew(tmp_path: Path) -> None:
    """A file rewritten at the same path (same sizes, other values) is read as it is now, and changing what
    read_npz returned changes nothing read later."""
    path = str(tmp_path / "x.npz")
    first, second = np.arange(100, dtype=np.float32), np.arange(100, dtype=np.float32)[::-1].copy()
    storage.write_npz(path, {"x": first})
    got = storage.read_npz(path)["x"]
    got[:] = -1
    assert np.array_equal(storage.read_npz(path)["x"], first)
    storage.write_npz(path, {"x": second})
    assert np.array_equal(storage.read_npz(path)["x"], second)

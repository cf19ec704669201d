"""File I/O through fsspec (local paths and s3:// alike): a file is either complete or absent.

Local: each file is written as `.<name with its dots as _>.<8 hex>.tmp` in its own folder (hidden, and
never containing `.parquet` or `.npz`, which DataComp's readers take for outputs), locked while written,
fsynced and renamed into place. A writer killed mid-write leaves only such a temporary file, which the next writer of
that folder (in any later process) removes; a file still locked by a live writer is never touched.

Object stores (s3://): each file is one PUT (never a multipart upload below 5 GiB), visible only once
complete. Transient errors (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried with
exponential backoff within a bounded number of attempts and seconds (`RetryPolicy`, set through the
environment), then a `StorageError` names the URL. Error messages carry URLs and server messages only,
never credentials.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import random
import re
import struct
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d2m_core.outputs import codec

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\.[0-9a-f]{8}\.tmp$")  # write_bytes_atomic's temporary files (and older d2m's)
FRESH_EMPTY_TMP_S = 5.0  # an empty temporary file this young may belong to a writer that has not locked it yet
SINGLE_PUT_LIMIT = 5 * 2**30  # S3's limit for one PUT; below it a write is never a multipart upload
REMOTE_CONNECT_TIMEOUT_S, REMOTE_READ_TIMEOUT_S = 5.0, 60.0  # per request; retries are ours, not botocore's


class StorageError(OSError):
    """A file could not be written or read; the message names its path or URL (errno kept when known)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of whole-object remote I/O: at most `attempts` tries (the first included), waiting
    `backoff_s`, then twice as long each time (capped at `max_backoff_s`, with jitter), and no new try once
    `deadline_s` have passed since the first. Worst case: deadline_s plus one request's timeouts.

    From the environment: D2M_IO_ATTEMPTS, D2M_IO_BACKOFF_S, D2M_IO_DEADLINE_S.
    """

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    deadline_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        default = cls()

        def number(name: str, fallback: float, kind: Callable[[str], Any]) -> Any:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return fallback
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if value < 0 or (kind is int and value < 1):
                raise ValueError(f"{name}={raw!r} is out of range")
            return value

        return cls(attempts=number("D2M_IO_ATTEMPTS", default.attempts, int),
                   backoff_s=number("D2M_IO_BACKOFF_S", default.backoff_s, float),
                   max_backoff_s=default.max_backoff_s,
                   deadline_s=number("D2M_IO_DEADLINE_S", default.deadline_s, float))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based): exponential, capped, with +-25% jitter."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return base * random.uniform(0.75, 1.25)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def write_bytes_atomic(url: str, data: bytes | list[bytes], *, retry: RetryPolicy | None = None) -> None:
    """Write `data` (the bytes, or the file's pieces in order: written one after the other locally, without
    joining them) to `url` so readers never see a partial file.

    Local: a locked temporary file in the same folder, fsynced, then os.replace (the old file, if any,
    stays complete until then). Object stores: one PUT, retried on transient errors.
    """
    fs, path = _filesystem(url)
    if _is_local(fs):
        _write_local(url, path, data)
        return
    body = data if isinstance(data, bytes) else b"".join(data)
    put_options = {"chunksize": SINGLE_PUT_LIMIT} if _protocol(fs) in ("s3", "s3a") else {}
    _with_retries("write", url, lambda: fs.pipe_file(path, body, **put_options), retry)


def read_bytes(url: str, *, retry: RetryPolicy | None = None) -> bytes:
    fs, path = _filesystem(url)
    if _is_local(fs):
        with open(path, "rb") as fh:
            return fh.read()
    return _with_retries("read", url, lambda: fs.cat_file(path), retry)


def open_read(url: str) -> IO[bytes]:
    """A seekable binary file to read `url` in parts (parquet column chunks, npz members)."""
    fs, path = _filesystem(url)
    return open(path, "rb") if _is_local(fs) else fs.open(path, "rb")


def exists(url: str, *, retry: RetryPolicy | None = None) -> bool:
    fs, path = _filesystem(url)
    if _is_local(fs):
        return os.path.exists(path)
    return _with_retries("check", url, lambda: fs.exists(path), retry)


# --- local files -------------------------------------------------------------------------------------------

_swept: set[str] = set()
_swept_lock = threading.Lock()


def _write_local(url: str, path: str, data: bytes | list[bytes]) -> None:
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, temporary_name(os.path.basename(path)))
    try:
        os.makedirs(folder, exist_ok=True)
        _sweep_once(folder)
        with open(tmp, "xb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # held until closed: a sweeper leaves the file alone
            for piece in [data] if isinstance(data, bytes) else data:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        _remove_quietly(tmp)
        if isinstance(err, OSError):
            raise StorageError(err.errno, f"cannot write {url}: {err.strerror or err}") from err
        raise
    _fsync_folder(folder)


def temporary_name(name: str) -> str:
    """The name a file is written under before its rename: `00000.parquet` -> `.00000_parquet.<8 hex>.tmp`."""
    return f".{name.replace('.', '_')}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def sweep_partial_files(folder: str) -> list[str]:
    """Remove the temporary files that interrupted writers left in a local folder; returns their paths.

    A temporary file is left alone while its writer (in this process or another) holds its lock, and while
    it is empty and younger than FRESH_EMPTY_TMP_S (a writer locks it right after creating it).
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if _TMP_NAME.search(entry.name) and entry.is_file(follow_symlinks=False) and _remove_if_abandoned(entry.path):
            removed.append(entry.path)
    if removed:
        log.warning("removed %d partial file(s) left by an interrupted writer in %s: %s", len(removed), folder,
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


def _sweep_once(folder: str) -> None:
    """Sweep a folder at the first write into it by this process (later writes skip the listing)."""
    key = os.path.abspath(folder)
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    sweep_partial_files(folder)


def _remove_if_abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # read-write: NFS grants exclusive locks to writers only
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # locked: its writer is alive
        stat = os.fstat(fd)
        if stat.st_size == 0 and time.time() - stat.st_mtime < FRESH_EMPTY_TMP_S:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
    """Make the rename durable (a power cut after it must not bring the old file back)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- remote objects ----------------------------------------------------------------------------------------


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url`; for S3 one whose own retries are off (ours are bounded) and timeouts are set."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(url)
    configured = dict(fsspec.config.conf.get(protocol, {}).get("config_kwargs", {}))
    config_kwargs = {"connect_timeout": REMOTE_CONNECT_TIMEOUT_S, "read_timeout": REMOTE_READ_TIMEOUT_S,
                     **configured, "retries": {"mode": "standard", "total_max_attempts": 1}}
    fs, path = fsspec.core.url_to_fs(url, config_kwargs=config_kwargs)
    fs.retries = 1  # s3fs's own retry loop (a class attribute; this instance is ours, cached by its options)
    return fs, path


def _with_retries(action: str, url: str, call: Callable[[], T], retry: RetryPolicy | None) -> T:
    policy = retry or RetryPolicy.from_env()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below; anything not transient is re-raised as is
            if not is_transient(err):
                raise
            elapsed = time.monotonic() - start
            wait = policy.delay(attempt)
            if attempt >= policy.attempts or elapsed + wait > policy.deadline_s:
                raise StorageError(errno.EIO, f"cannot {action} {_shown(url)}: {describe_error(err)} "
                                   f"({attempt} attempt(s) in {elapsed:.1f} s)") from err
            log.warning("%s %s failed (%s); retry %d of %d in %.1f s", action, _shown(url), describe_error(err),
                        attempt, policy.attempts - 1, wait)
        time.sleep(wait)


_RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}


def is_transient(err: BaseException) -> bool:
    """True for errors a retry may cure: refused/reset/closed connections, timeouts, 5xx and throttling."""
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 8:
        if isinstance(current, StorageError):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)) or isinstance(current, _transient_types()):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in _RETRYABLE_CODES:
                return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def _transient_types() -> tuple[type[BaseException], ...]:
    """Transport errors of the libraries under fsspec/s3fs, when they are installed."""
    global _TRANSIENT
    if _TRANSIENT is None:
        found: list[type[BaseException]] = []
        try:
            from fsspec.exceptions import FSTimeoutError

            found.append(FSTimeoutError)
        except ImportError:
            pass
        try:
            from botocore.exceptions import ConnectionError as BotoConnectionError
            from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

            found += [BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError]
        except ImportError:
            pass
        try:
            import aiohttp

            found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
        except ImportError:
            pass
        from http.client import IncompleteRead

        found.append(IncompleteRead)
        _TRANSIENT = tuple(found)
    return _TRANSIENT


def _shown(url: str) -> str:
    """A URL as messages show it: without any user:password@ part."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1", url)


def describe_error(err: BaseException) -> str:
    """One line naming what went wrong: the exception and, for an HTTP error, the server's status and code.
    Only exception messages go in (never request headers), so no credentials."""
    text = " ".join(str(err).split()) or type(err).__name__
    line = f"{type(err).__name__}: {text[:300]}"
    current: BaseException | None = err
    for _ in range(8):
        if current is None:
            break
        response = getattr(current, "response", None)
        if isinstance(response, dict) and response.get("Error"):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response["Error"].get("Code", "")
            return f"{line} (HTTP {status} {code})"
        current = current.__cause__ or current.__context__
    return line


# --- formats ----------------------------------------------------------------------------------------------


NPZ_CHUNK = 4 * 2**20  # bytes of a member deflated as one piece (pieces run in parallel threads)
_MAX32 = 0xFFFFFFFF  # a zip field at this value is in the zip64 extra field
_ZIP64_LIMIT = _MAX32  # from this size or offset on, zip64 fields (lower in a test)
_npz_pool: ThreadPoolExecutor | None = None
_npz_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _npz_pool
    with _npz_pool_lock:
        if _npz_pool is None:
            _npz_pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="d2m-deflate")
        return _npz_pool


def _npy_member(array: np.ndarray) -> tuple[bytes, memoryview]:
    """An array as a .npy file (numpy's own header), as header bytes and a view of the data (no copy)."""
    array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (keeps 0-d arrays 0-d)
    if array.dtype.hasobject:
        raise ValueError("object arrays are not written to npz files")
    fields = np.lib.format.header_data_from_array_1_0(array)
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header over 64 KiB (a huge structured dtype): format 2.0, as numpy does
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue(), memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """npz_pieces, joined."""
    return b"".join(npz_pieces(arrays))


def npz_pieces(arrays: dict[str, np.ndarray]) -> list[bytes]:
    """The bytes of `np.savez_compressed(**arrays)`, in pieces to write one after the other (not joined: a
    copy less), as numpy.load and zipfile read them (members `<key>.npy`,
    deflated, dated 1980-01-01), written here to choose the deflater (`codec`: ISA-L, else zlib's Huffman-only
    coding; zipfile has neither): each member's pieces are deflated in parallel threads (both release the
    GIL). The same arrays give the same bytes with the same deflater."""
    members = []
    for key, array in arrays.items():
        header, data = _npy_member(np.asarray(array))
        members.append((f"{key}.npy".encode("utf-8"), header, data))
    pool = _pool()
    jobs = []
    for _, header, data in members:
        pieces = [memoryview(header)] + [data[i:i + NPZ_CHUNK] for i in range(0, len(data), NPZ_CHUNK)]
        crc = pool.submit(lambda h=header, d=data: codec.crc32(d, codec.crc32(h)))
        deflated = [pool.submit(codec.deflate_piece, piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
        jobs.append((crc, deflated))
    out: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for (name, header, data), (crc_job, deflated) in zip(members, jobs):
        body = [piece.result() for piece in deflated]
        crc, size, packed = crc_job.result(), len(header) + len(data), sum(len(p) for p in body)
        local, record = _zip_headers(name, crc, size, packed, offset)
        out += [local, *body]
        central.append(record)
        offset += len(local) + packed
    out += central
    out.append(_zip_end(len(central), sum(len(c) for c in central), offset))
    return out


_DOS_1980 = (0, (1980 - 1980) << 9 | 1 << 5 | 1)  # time, date of 1980-01-01 00:00:00


def _zip_headers(name: bytes, crc: int, size: int, packed: int, offset: int) -> tuple[bytes, bytes]:
    """The local header and the central-directory record of one deflated member (zip64 fields when needed)."""
    big = size >= _ZIP64_LIMIT or packed >= _ZIP64_LIMIT
    local_extra = struct.pack("<HHQQ", 1, 16, size, packed) if big else b""
    version = 45 if big or offset >= _ZIP64_LIMIT else 20
    sizes = (_MAX32, _MAX32) if big else (packed, size)
    flags = 0 if name.isascii() else 0x800  # UTF-8 name
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, version, flags, 8, *_DOS_1980, crc, *sizes, len(name),
                        len(local_extra)) + name + local_extra
    wide = ([size, packed] if big else []) + ([offset] if offset >= _ZIP64_LIMIT else [])
    central_extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
    record = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, flags, 8, *_DOS_1980, crc, *sizes,
                         len(name), len(central_extra), 0, 0, 0, 0, _MAX32 if offset >= _ZIP64_LIMIT else offset) \
        + name + central_extra
    return local, record


def _zip_end(count: int, size: int, offset: int) -> bytes:
    end = b""
    if count >= 0xFFFF or size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT:
        end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, offset) \
            + struct.pack("<IIQI", 0x07064B50, 0, offset + size, 1)
    return end + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                             _MAX32 if size >= _ZIP64_LIMIT else size, _MAX32 if offset >= _ZIP64_LIMIT else offset, 0)


RAGGED_VALUES, RAGGED_LENGTHS, JSON_ROWS = ".values", ".lengths", ".json"


def _is_boxes(value: list) -> bool:
    return all(isinstance(row, list) and all(isinstance(box, (list, tuple)) for box in row) for row in value)


def pack_fields(fields: dict[str, np.ndarray | list]) -> dict[str, np.ndarray]:
    """Arrays stay as they are; a list of per-sample lists of [x1,y1,x2,y2] becomes values + lengths; any
    other list of per-sample values (a plugin's captions, ints, flags) one JSON string per sample."""
    packed: dict[str, np.ndarray] = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            packed[name] = value
            continue
        if not _is_boxes(value):
            packed[name + JSON_ROWS] = np.array([json.dumps(row, ensure_ascii=False) for row in value], dtype=np.str_)
            continue
        lengths = np.array([len(row) for row in value], np.int64)
        flat = [box for row in value for box in row]
        packed[name + RAGGED_VALUES] = np.asarray(flat, np.float32).reshape(len(flat), -1) if flat else np.zeros((0, 4), np.float32)
        packed[name + RAGGED_LENGTHS] = lengths
    return packed


def unpack_field(arrays: dict[str, np.ndarray], name: str) -> np.ndarray | list:
    """The inverse of pack_fields for one field."""
    if name in arrays:
        return arrays[name]
    if name + JSON_ROWS in arrays:
        return [json.loads(str(row)) for row in arrays[name + JSON_ROWS]]
    values, lengths = arrays[name + RAGGED_VALUES], arrays[name + RAGGED_LENGTHS]
    ends = np.cumsum(lengths)
    return [values[end - n : end].tolist() for n, end in zip(lengths, ends)]


def write_npz(url: str, arrays: dict[str, np.ndarray | list]) -> None:
    write_bytes_atomic(url, npz_pieces(pack_fields(arrays)))


def read_npz(url: str, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz (only `keys`, when given: the others are not decompressed), as numpy.load reads
    them; each member inflated in one call, members in parallel threads, CRC checked."""
    return read_npz_bytes(read_bytes(url), keys)


def read_npz_bytes(data: bytes, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz file's bytes, as read_npz reads them."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    names = [i.filename[:-4] if i.filename.endswith(".npy") else i.filename for i in infos]
    plain = all(i.filename.endswith(".npy") and i.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                and not i.flag_bits & 1 for i in infos) and len(set(names)) == len(names)
    if not plain:  # anything numpy.load reads otherwise (other members, methods): numpy.load itself
        with np.load(io.BytesIO(data)) as loaded:
            return {k: loaded[k] for k in loaded.files if keys is None or k in keys}
    view = memoryview(data)
    jobs = {name: _pool().submit(_npz_member, view, info) for name, info in zip(names, infos)
            if keys is None or name in keys}
    return {name: job.result() for name, job in jobs.items()}


def _npz_member(data: memoryview, info: zipfile.ZipInfo) -> np.ndarray:
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    packed = data[start:start + info.compress_size]
    raw = codec.inflate(packed, info.file_size) if info.compress_type == zipfile.ZIP_DEFLATED else packed
    if len(raw) != info.file_size or codec.crc32(raw) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    npy = io.BytesIO(raw)
    version = np.lib.format.read_magic(npy)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                             else np.lib.format.read_array_header_2_0)(npy)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(raw, dtype, count=count, offset=npy.tell()).copy()  # writable, as numpy.load's
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def write_parquet(url: str, table: pa.Table, compression: str = "snappy") -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    write_bytes_atomic(url, sink.getvalue().to_pybytes())


def read_parquet(url: str, columns: Collection[str] | None = None) -> pa.Table:
    """The table of a parquet file; with `columns`, only those of them it has (in its order; the row count
    stays), the others not decompressed."""
    if columns is None:
        return pq.read_table(io.BytesIO(read_bytes(url)))
    source = pq.ParquetFile(io.BytesIO(read_bytes(url)))
    return source.read(columns=[name for name in source.schema_arrow.names if name in columns])


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextlib.contextmanager
def open_atomic(url: str, *, retry: RetryPolicy | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write `url` through, too big for memory (a tar): complete or absent, as
    write_bytes_atomic. Local: a locked temporary file beside it, renamed on success. Object stores: a local
    spool file, uploaded with one PUT (retried) on success. Removed if the block raises."""
    fs, path = _filesystem(url)
    local = _is_local(fs)
    folder = os.path.dirname(path) if local else tempfile.gettempdir()
    if local:
        os.makedirs(folder, exist_ok=True)
        _sweep_once(folder)
    tmp = os.path.join(folder, temporary_name(os.path.basename(path)) if local else f"d2m-{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield fh
            fh.flush()
            if local:
                os.fsync(fh.fileno())
                os.replace(tmp, path)
        if local:
            _fsync_folder(folder)
        else:
            put_options = {"chunksize": SINGLE_PUT_LIMIT} if _protocol(fs) in ("s3", "s3a") else {}
            _with_retries("write", url, lambda: fs.put_file(tmp, path, **put_options), retry)
    except OSError as err:
        if isinstance(err, StorageError):
            raise
        raise StorageError(err.errno, f"cannot write {_shown(url)}: {err.strerror or err}") from err
    finally:
        _remove_quietly(tmp)


def remove(url: str, *, retry: RetryPolicy | None = None) -> None:
    """Delete a file (local or object); an absent one is not an error."""
    fs, path = _filesystem(url)
    if _is_local(fs):
        _remove_quietly(path)
        return
    _with_retries("remove", url, lambda: fs.rm_file(path) if fs.exists(path) else None, retry)

"""File I/O through fsspec (local paths and s3:// alike): a file is either complete or absent."""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so readers never see a partial file.

    Local: a temporary name in the same folder, fsynced, then os.replace. Object stores: one PUT, which
    makes the object visible only once complete.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_bytes(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


RAGGED_VALUES, RAGGED_LENGTHS = ".values", ".lengths"


def pack_fields(fields: dict[str, np.ndarray | list]) -> dict[str, np.ndarray]:
    """Arrays stay as they are; a list of per-sample lists of [x1,y1,x2,y2] becomes values + lengths."""
    packed: dict[str, np.ndarray] = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            packed[name] = value
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
    values, lengths = arrays[name + RAGGED_VALUES], arrays[name + RAGGED_LENGTHS]
    ends = np.cumsum(lengths)
    return [values[end - n : end].tolist() for n, end in zip(lengths, ends)]


def write_npz(url: str, arrays: dict[str, np.ndarray | list]) -> None:
    write_bytes_atomic(url, npz_bytes(pack_fields(arrays)))


def read_npz(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(url))) as data:
        return {k: data[k] for k in data.files}


def write_parquet(url: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(url, sink.getvalue().to_pybytes())


def read_parquet(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(url)))


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))

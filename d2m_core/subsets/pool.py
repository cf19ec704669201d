"""The pool a filter reads: the complete shards of a metadata folder, one column (or npz array) at a time.

A shard counts once its `{shard}.json` is written beside `{shard}.parquet` (d2m writes the json last);
DataComp's readers list every name containing ".parquet" (`fs.ls`), which on a finished folder is the same
set. Columns are found by their DataComp name or d2m's (`use_datacomp_keys` off), whichever the file has.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d2m_core import catalog
from d2m_core.outputs import storage

# logical column -> names it may have in a metadata parquet (DataComp's first), and what produces it
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "uid": ("uid",),
    "text": ("text", "caption"),
    "original_width": ("original_width",),
    "original_height": ("original_height",),
    "clip_b32": (catalog.COLUMNS["oai-clip-vit-b32-score"].datacomp, "oai-clip-vit-b32-score"),
    "clip_l14": (catalog.COLUMNS["oai-clip-vit-l14-score"].datacomp, "oai-clip-vit-l14-score"),
    "face_bboxes": (catalog.COLUMNS["face-boxes"].datacomp, "face-boxes"),
}
HOW_TO_GET = {
    "uid": "add `uid` to additional_fields",
    "text": "add `caption` to additional_fields",
    "original_width": "add `original_width` to additional_fields",
    "original_height": "add `original_height` to additional_fields",
    "clip_b32": "add oai-clip-vit-b32 to models and oai-clip-vit-b32-score to postprocess_columns",
    "clip_l14": "add oai-clip-vit-l14 to models and oai-clip-vit-l14-score to postprocess_columns",
    "face_bboxes": "add faces-scrfd10g to models and face-boxes to postprocess_columns",
}
ARRAY_NAMES: dict[str, tuple[str, ...]] = {
    "l14_img": (catalog.FEATURES["oai-clip-vit-l14-image"].datacomp, "oai-clip-vit-l14-image"),
}


class PoolError(ValueError):
    """The metadata folder lacks shards, a column or an array a filter needs; the message says how to get it."""


@dataclass(frozen=True)
class PoolShard:
    """One shard's metadata files."""

    stem: str
    parquet: str
    npz: str
    json: str


def list_pool(metadata_dir: str) -> list[PoolShard]:
    """The complete shards of a metadata folder (local or s3://), sorted by name."""
    fs, root = fsspec.core.url_to_fs(metadata_dir)
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        names = set()
    prefix = metadata_dir.rstrip("/")
    stems = sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet") and n[: -len(".parquet")] + ".json" in names)
    return [PoolShard(s, f"{prefix}/{s}.parquet", f"{prefix}/{s}.npz", f"{prefix}/{s}.json") for s in stems]


def resolve_columns(shard: PoolShard, logical: Sequence[str]) -> dict[str, str]:
    """The file's name for each logical column; a missing one is a PoolError saying how to get it."""
    with storage.open_read(shard.parquet) as fh:
        return _match(shard, pq.read_schema(fh), logical)


def _match(shard: PoolShard, schema: pa.Schema, logical: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in logical:
        match = next((c for c in COLUMN_NAMES[name] if c in schema.names), None)
        if match is None:
            raise PoolError(f"{shard.parquet} has no column {' or '.join(map(repr, COLUMN_NAMES[name]))}: "
                            f"{HOW_TO_GET[name]} and rerun shard_metadata")
        found[name] = match
    return found


def read_columns(shard: PoolShard, logical: Sequence[str]) -> dict[str, pa.ChunkedArray]:
    """Only these columns of a shard's parquet (their column chunks are read, nothing else)."""
    with storage.open_read(shard.parquet) as fh:
        parquet = pq.ParquetFile(fh)
        names = _match(shard, parquet.schema_arrow, logical)
        table = parquet.read(columns=list(dict.fromkeys(names.values())))
    return {logical_name: table.column(column) for logical_name, column in names.items()}


def read_array(shard: PoolShard, logical: str) -> np.ndarray:
    """One array of a shard's npz (rows aligned with its parquet)."""
    if not storage.exists(shard.npz):
        raise PoolError(f"{shard.npz} is missing: the filter needs the {logical} features "
                        "(oai-clip-vit-l14 in models, oai-clip-vit-l14-image in postprocess_features)")
    with storage.open_read(shard.npz) as fh, np.load(fh) as data:  # reads only that member of the zip
        name = next((n for n in ARRAY_NAMES[logical] if n in data.files), None)
        if name is None:
            raise PoolError(f"{shard.npz} has no array {' or '.join(map(repr, ARRAY_NAMES[logical]))}: "
                            "add oai-clip-vit-l14-image to postprocess_features and rerun shard_metadata")
        return data[name]


def score_columns(shards: Sequence[PoolShard], logical: str) -> Iterator[np.ndarray]:
    """One score column per shard, streamed (for the top-fraction threshold)."""
    for shard in shards:
        yield read_columns(shard, [logical])[logical].to_numpy()

"""DataComp's files for one shard: `{shard}.parquet`, `{shard}.npz`, then `{shard}.json` last."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.testdata.pausepoints import pause_at

LoadField = Callable[[str, str], np.ndarray | list]  # (asset, field) -> rows aligned with the samples table
ModelOutputs = Callable[[], dict[str, Any]]  # model name -> its outputs for the whole shard (plugin postprocessors)
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))  # as DataComp's released face_bboxes


def _values(out: catalog.OutputName, load: LoadField, outputs: ModelOutputs | None) -> np.ndarray | list:
    if out.compute is None:
        return load(out.asset, out.field)
    assert outputs is not None, f"{out.name} needs the models' outputs"
    value = out.compute(outputs())
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    return list(value)  # per-sample Python values (captions, ints, flags, lists): carried as they are


def datacomp_table(config: D2MConfig, samples: pa.Table, load: LoadField, outputs: ModelOutputs | None = None,
                   jsons: Sequence[dict[str, Any] | None] | None = None) -> pa.Table | None:
    """Columns: postprocess_columns (float32 scores), then additional_fields with their json types, taken from
    `jsons` (the samples' parsed jsons, row for row, when the caller holds them) or parsed from `samples`."""
    rows = samples.num_rows
    names: list[str] = []
    columns: list[pa.Array] = []
    for name in config.postprocess_columns:
        out = catalog.output_name(name, feature=False)
        values = _values(out, load, outputs)
        if len(values) != rows:
            raise ValueError(f"{name}: {len(values)} rows for {rows} samples; rerun its asset")
        names.append(out.column(config.use_datacomp_keys))
        if isinstance(values, list) and out.compute is None:
            columns.append(pa.array(values, BOXES_TYPE))  # empty list when no face, never null
        elif isinstance(values, list):  # a plugin's values: str, int, bool, lists keep their types
            columns.append(pa.array(values))
        else:
            columns.append(pa.array(values.astype(np.float32), pa.float32()))
    if config.additional_fields:
        if jsons is not None and len(jsons) != rows:
            raise ValueError(f"{len(jsons)} sample jsons for {rows} samples")
        parsed = ([j if j is not None else {} for j in jsons] if jsons is not None
                  else [json.loads(j) if j is not None else {} for j in samples.column("json").to_pylist()])
        for fieldname in config.additional_fields:
            column = catalog.DATACOMP_FIELD_RENAMES.get(fieldname, fieldname) if config.use_datacomp_keys else fieldname
            names.append(column)
            columns.append(pa.array([p.get(fieldname) for p in parsed]))
    if not names:
        return None
    return pa.table(columns, names=names)


def datacomp_arrays(config: D2MConfig, rows: int, load: LoadField, outputs: ModelOutputs | None = None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in config.postprocess_features:
        out = catalog.output_name(name, feature=True)
        raw = _values(out, load, outputs)
        try:
            values = np.asarray(raw, np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"postprocess_features {name}: not numeric features (strings, flags and lists "
                             "belong in postprocess_columns)") from None
        if len(values) != rows:
            raise ValueError(f"{name}: {len(values)} rows for {rows} samples; rerun its asset")
        arrays[out.column(config.use_datacomp_keys)] = values
    return arrays


def shard_log(config: D2MConfig, stats: dict[str, Any], rows: int) -> dict[str, Any]:
    """The seed's json keys, plus d2m's counts, failures, timings, models and weights."""
    timings = stats.get("timings", {})
    return {
        "number of samples": rows,
        "sample time (s)": timings.get("model_s", 0.0),
        "loader time (s)": timings.get("loader_wait_s", 0.0),
        "samples_read": stats["samples_read"],
        "samples_written": stats["samples_written"],
        "samples_failed": stats["samples_failed"],
        "failures": stats.get("failures", []),
        "timings": timings,
        "models": list(config.models),
        "weights": {w["model"]: w for w in stats.get("weights", [])},
        "source": stats.get("url"),
    }


def writes_npz(config: D2MConfig, url: str) -> bool:
    """Whether write_datacomp_files (re)writes the npz at `url`: the feature pass already stored the features
    there (each once); only plugin-computed ones are added, or the file written when it is missing."""
    computed = any(catalog.output_name(n, feature=True).compute for n in config.postprocess_features)
    return bool(config.postprocess_features) and (computed or not storage.exists(url))


def write_datacomp_files(config: D2MConfig, stem: str, samples: pa.Table, stats: dict[str, Any], load: LoadField,
                         outputs: ModelOutputs | None = None,
                         jsons: Sequence[dict[str, Any] | None] | None = None) -> dict[str, str]:
    """Write the shard's files into output_metadata_dir (each complete or absent, json last); `jsons`: as
    datacomp_table's."""
    rows = samples.num_rows
    paths: dict[str, str] = {}
    table = datacomp_table(config, samples, load, outputs, jsons)
    if table is not None:
        paths["parquet"] = storage.join(config.output_metadata_dir, f"{stem}.parquet")
        storage.write_parquet(paths["parquet"], table)
        pause_at("between-writes", stem)  # test-only; returns at once unless a test set it
    if config.postprocess_features:
        paths["npz"] = storage.join(config.output_metadata_dir, f"{stem}.npz")
        if writes_npz(config, paths["npz"]):
            storage.write_npz(paths["npz"], datacomp_arrays(config, rows, load, outputs))
    paths["json"] = storage.join(config.output_metadata_dir, f"{stem}.json")
    storage.write_json(paths["json"], shard_log(config, stats, rows))
    return paths

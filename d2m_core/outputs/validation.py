"""Per-shard checks of the DataComp files: the trust-at-a-glance rules, as plain data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.outputs.records import CheckOutcome
from d2m_core.outputs.reference import reference_info

# Allowed range of each score column; features are checked for finite values and unit norm.
SCORE_RANGES = {
    "oai-clip-vit-b32-score": (-1.0, 1.0), "oai-clip-vit-l14-score": (-1.0, 1.0),
    "nsfw-detoxify-score": (0.0, 1.0), "nsfw-image-score": (0.0, 1.0), "dedup-isc-ft-v107-score": (-1.0, 1.0),
}
DEDUP_SCORE = "dedup-isc-ft-v107-score"  # z . ref: within +-(largest reference row norm), 1 for unit rows
NORM_TOLERANCE = 1e-2  # fp16/bf16 features, re-normalised in float32, stay well within this
CHECKS = ("row_count", "uids", "features", "scores_in_range", "failure_rate")


def _score_columns(config: D2MConfig) -> dict[str, str]:
    """postprocess column name -> its column in the parquet, for columns with a known range."""
    return {n: catalog.output_name(n, feature=False).column(config.use_datacomp_keys)
            for n in config.postprocess_columns if n in SCORE_RANGES}


def _score_range(config: D2MConfig, name: str) -> tuple[float, float]:
    low, high = SCORE_RANGES[name]
    if name == DEDUP_SCORE:
        bound = max(1.0, float(reference_info(config).get("max_norm", 1.0)))
        return -bound, bound
    return low, high


def _row_norms(values: np.ndarray) -> np.ndarray:
    """Each row's L2 norm, summed in float64 (as the norm of a float64 copy, without making the copy)."""
    if not np.issubdtype(values.dtype, np.floating) or values.dtype.itemsize > 8:
        return np.linalg.norm(values.astype(np.float64), axis=1)
    return np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))


def inspect_shard(config: D2MConfig, stem: str,
                  npz: dict[str, np.ndarray] | None = None) -> tuple[list[CheckOutcome], dict[str, float]]:
    """The checks (row count, uids, features, score ranges, failure rate) and score quantiles of one shard's
    written files, each file read once (`npz`: the arrays of its DataComp npz, when the caller has read the
    file already)."""
    out = config.output_metadata_dir
    log = storage.read_json(storage.join(out, f"{stem}.json"))
    samples = storage.read_parquet(storage.join(config.artifacts_root, catalog.SAMPLES, f"{stem}.parquet"), ["uid"])
    parquet_url, npz_url = storage.join(out, f"{stem}.parquet"), storage.join(out, f"{stem}.npz")
    checked = {"uid", *_score_columns(config).values()}  # the parquet's columns the checks read
    table = storage.read_parquet(parquet_url, checked) if storage.exists(parquet_url) else None
    arrays = npz if npz is not None else storage.read_npz(npz_url) if storage.exists(npz_url) else {}
    read, written, failed = log["samples_read"], log["samples_written"], log["samples_failed"]
    rows = {"samples": samples.num_rows} | ({"parquet": table.num_rows} if table is not None else {}) \
        | {f"npz:{k}": int(v.shape[0]) for k, v in arrays.items()}
    outcomes = [CheckOutcome(
        "row_count", read == written + failed and all(n == written for n in rows.values()),
        "one row per decodable sample: read == written + failed, and every file has `written` rows",
        {"samples_read": read, "samples_written": written, "samples_failed": failed, "rows": json.dumps(rows)})]

    uids = samples.column("uid").to_pylist()
    uid_column = "uid" if table is not None and "uid" in table.column_names else None
    same = uid_column is None or table.column(uid_column).to_pylist() == uids
    outcomes.append(CheckOutcome(
        "uids", None not in uids and len(set(uids)) == len(uids) and same,
        "uids present, unique, and equal (in order) to the tar's decodable samples",
        {"unique": len(set(u for u in uids if u is not None)), "missing": uids.count(None), "parquet_matches_tar": same}))

    bad_features = {}
    unit_norm = {catalog.FEATURES[n].column(config.use_datacomp_keys) for n in config.postprocess_features
                 if n in catalog.FEATURES and catalog.FEATURES[n].compute is None}  # custom features: finite only
    for key, values in arrays.items():
        finite = bool(np.isfinite(values).all())
        norms = _row_norms(values) if key in unit_norm and values.ndim == 2 and len(values) else np.ones(1)
        worst = float(np.abs(norms - 1).max())
        if not finite or worst > NORM_TOLERANCE:
            bad_features[key] = {"finite": finite, "max_norm_error": worst}
    outcomes.append(CheckOutcome("features", not bad_features, "features finite, and the built-in ones unit-norm",
                                 {"arrays": len(arrays), "bad": json.dumps(bad_features)}))

    out_of_range = {}
    for name, column in _score_columns(config).items():
        if table is None:
            break
        values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        low, high = _score_range(config, name)
        bad = int((~np.isfinite(values) | (values < low - 1e-3) | (values > high + 1e-3)).sum())
        if bad:
            out_of_range[column] = bad
    outcomes.append(CheckOutcome("scores_in_range", not out_of_range, "every score finite and within its range",
                                 {"out_of_range": json.dumps(out_of_range)}))

    rate = failed / read if read else 0.0
    outcomes.append(CheckOutcome("failure_rate", rate <= config.max_failure_rate,
                                 f"failed samples at most {config.max_failure_rate:.0%} of the tar",
                                 {"failure_rate": round(rate, 4), "threshold": config.max_failure_rate}))
    return outcomes, score_quantiles(config, table)


def score_quantiles(config: D2MConfig, table: pa.Table | None) -> dict[str, float]:
    """p05/p50/p95 of each score column of the shard's parquet, for plots over partitions."""
    result: dict[str, float] = {}
    if table is None or table.num_rows == 0:
        return result
    for column in _score_columns(config).values():
        values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        for q in (5, 50, 95):
            result[f"{column}/p{q:02d}"] = round(float(np.percentile(values, q)), 5)
    return result

"""The pipeline config: the seed's yml fields, unchanged, plus d2m's own optional ones."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

REQUIRED_FIELDS = ("models", "nworkers", "batch_size", "device", "input_tars", "output_metadata_dir")
SEED_OPTIONAL_FIELDS = (
    "postprocess_columns",
    "postprocess_features",
    "additional_fields",
    "custom_pypath",
    "reprocess",
    "use_datacomp_keys",
    "tars_per_wds",
    "logging",
    "warn_and_continue",
)
D2M_FIELDS = ("dataset", "weights_dir", "precision", "artifacts_dir", "max_failure_rate", "gpu_decode", "torch_compile",
              "cuda_graphs", "filters", "filter_cron", "reshard", "reader_processes", "reader_decode_share")
DATASET_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # Dagster's rule for names (asset key parts, partitions, sensors)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


BASELINES = ("no_filter", "basic_filter", "text_based", "image_based", "image_based_intersect_clip_score",
             "clip_score", "laion2b")  # DataComp's baselines.py --name choices
SCALES = ("small", "medium", "large", "xlarge")  # --image_based_scale: whose pool centroids


class FilterSpec(BaseModel):
    """One DataComp filtering baseline (baselines.py's flags), materialized as the asset `asset`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["no_filter", "basic_filter", "text_based", "image_based", "image_based_intersect_clip_score",
                  "clip_score", "laion2b"]
    threshold: float | None = None
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    arch: Literal["b32", "l14"] | None = None
    image_based_scale: Literal["small", "medium", "large", "xlarge"] | None = None
    batch_size: int = Field(default=1024, gt=0)  # image_based: samples per nearest-centroid batch
    asset: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]+$")  # the asset's name; default: `name`
    save_path: str | None = None  # also write the uid file here (default: <artifacts>/filters/<asset>.npy only)
    data_files: dict[str, str | list[str]] = Field(default_factory=dict)  # data file name -> path, instead of weights_dir

    @model_validator(mode="after")
    def _datacomp_rules(self) -> FilterSpec:
        """baselines.py's check_args, message for message."""
        clip = "clip_score" in self.name
        if self.name == "laion2b" and any(v is not None for v in (self.fraction, self.threshold, self.arch, self.image_based_scale)):
            raise ValueError("laion2b does not support clip_score or image_based flags")
        if clip and (self.fraction is None) == (self.threshold is None):
            raise ValueError("clip_score baselines take exactly one of fraction or threshold")
        if clip and self.arch is None:
            raise ValueError("specify arch (b32 or l14) for clip_score baselines")
        if not clip and any(v is not None for v in (self.fraction, self.threshold, self.arch)):
            raise ValueError("fraction, threshold and arch are only used by clip_score baselines")
        if ("image_based" in self.name) != (self.image_based_scale is not None):
            raise ValueError("image_based_scale is required by, and only used by, the image_based baselines")
        return self

    @property
    def asset_name(self) -> str:
        return self.asset or self.name


class ReshardSpec(BaseModel):
    """Reshard the original tars to a filter's uid subset (DataComp's resharder.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subset: str  # the `asset` name of one of `filters`
    output_dir: str
    shard_size: int = Field(default=10_000, gt=0)
    apply_blur: bool = True
    inject_blur_metadata: bool = True


class D2MConfig(BaseModel):
    """One config for `d2m run`, the Dagster definitions and the tests (the seed's yml format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] = Field(min_length=1)
    nworkers: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    device: int | str
    input_tars: str | list[str]
    output_metadata_dir: str
    postprocess_columns: list[str] = Field(default_factory=list)
    postprocess_features: list[str] = Field(default_factory=list)
    additional_fields: list[str] | None = None
    custom_pypath: str | None = None
    reprocess: bool = False
    use_datacomp_keys: bool = False
    tars_per_wds: int | None = Field(default=None, gt=0)
    logging: bool = False
    warn_and_continue: bool = False
    # d2m's own fields
    dataset: str | None = None  # the Dagster identity of this dataset; default: dataset_name's rule
    weights_dir: str | None = None
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    artifacts_dir: str | None = None
    max_failure_rate: float = Field(default=0.1, ge=0.0, le=1.0)  # the failure_rate check's threshold
    gpu_decode: Literal["auto", "on", "off", "readers"] = "auto"  # decode/resize on the device: auto = on CUDA; readers: the readers decode
    filters: list[FilterSpec] = Field(default_factory=list)  # DataComp baselines as assets
    filter_cron: str = "0 * * * *"  # how often filters made stale by new shards re-run
    reshard: ReshardSpec | None = None
    # processes reading tars, a shard each (gpu_decode readers: shared); auto: 2, or every core but 4 when they decode
    reader_processes: PositiveInt | Literal["auto"] = "auto"
    reader_decode_share: float = Field(default=1.0, ge=0.0, le=1.0)  # gpu_decode readers: batches they decode, 0-1
    torch_compile: bool = False  # torch.compile ISC's and CLIP's image towers (d2m_core.compute.compiled)
    cuda_graphs: bool = False  # capture them and CLIP's text towers as CUDA graphs, replayed per batch (CUDA only)

    @field_validator("gpu_decode", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        """`gpu_decode: off` (as the README writes it) is YAML's false: on/off fields accept the booleans."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("postprocess_columns", "postprocess_features", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("input_tars")
    @classmethod
    def _non_empty_input(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("input_tars is empty")
        return value

    @model_validator(mode="after")
    def _filters_named_once(self) -> D2MConfig:
        names = [f.asset_name for f in self.filters]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"filters: asset name(s) {', '.join(repeated)} used twice: give each an `asset` name")
        if self.reshard is not None and self.reshard.subset not in names:
            raise ValueError(f"reshard.subset {self.reshard.subset!r} is none of the filters' assets ({', '.join(names) or 'none'})")
        return self

    @field_validator("dataset")
    @classmethod
    def _dagster_name(cls, value: str | None) -> str | None:
        if value is not None and (not DATASET_NAME.match(value) or "__" in value):
            raise ValueError(f"{value!r} is not a dataset name: use letters, digits and single underscores")
        return value

    @property
    def dataset_name(self) -> str:
        """The dataset's name: `dataset`, else `default_dataset_name(output_metadata_dir)`."""
        return self.dataset or default_dataset_name(self.output_metadata_dir)

    @property
    def artifacts_root(self) -> str:
        """Where per-asset intermediate files (features, scores) live; DataComp files go to output_metadata_dir."""
        return self.artifacts_dir or self.output_metadata_dir.rstrip("/") + "/.d2m"


def default_dataset_name(output_metadata_dir: str) -> str:
    """The dataset name of a yml without `dataset`: the output folder's last part (characters other than
    letters, digits and `_` become `_`), `_`, then the first 6 hex digits of the sha256 of the whole output
    location, e.g. `/data/pool/metadata` -> `metadata_` + 6 hex. Two outputs never share a name, and a
    dataset keeps its name as long as it writes to the same place."""
    location = output_metadata_dir.rstrip("/")
    tail = re.sub(r"[^A-Za-z0-9_]+", "_", location.rsplit("/", 1)[-1]).strip("_")
    tail = re.sub(r"_+", "_", tail) or "dataset"
    return f"{tail}_{hashlib.sha256(location.encode()).hexdigest()[:6]}"


def parse_config(raw: dict[str, Any], *, base_dir: Path | None = None) -> D2MConfig:
    """Validate a parsed yml mapping; unknown or missing fields raise ConfigError naming them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of fields, got {type(raw).__name__}")
    known = set(REQUIRED_FIELDS) | set(SEED_OPTIONAL_FIELDS) | set(D2M_FIELDS)
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"unknown field: {', '.join(map(str, unknown))}")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ConfigError(f"missing required yml field: {', '.join(missing)}")
    data = dict(raw)
    if base_dir is not None:
        data = _resolve_relative_paths(data, base_dir)
    try:
        return D2MConfig(**data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(path: str | Path, base_dir: str | Path | None = None) -> D2MConfig:
    """Read a seed-format yml safely (no object construction). Relative local paths (input_tars,
    output_metadata_dir, custom_pypath, weights_dir, artifacts_dir) resolve against `base_dir`, by default
    the working directory, as the seed resolves them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open("r", encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw, base_dir=Path(base_dir) if base_dir is not None else Path.cwd())


def _is_local_relative(value: str) -> bool:
    return "://" not in value and not value.startswith("pipe:") and not Path(value).is_absolute()


def _resolve_relative_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make local relative paths absolute against `base_dir`, so the config holds absolute paths only."""
    for key in ("output_metadata_dir", "custom_pypath", "weights_dir", "artifacts_dir"):
        value = data.get(key)
        if isinstance(value, str) and _is_local_relative(value):
            data[key] = os.path.normpath(base_dir / value)
    local = lambda v: os.path.normpath(base_dir / v) if isinstance(v, str) and _is_local_relative(v) else v  # noqa: E731
    if isinstance(data.get("reshard"), dict) and "output_dir" in data["reshard"]:
        data["reshard"] = data["reshard"] | {"output_dir": local(data["reshard"]["output_dir"])}
    if isinstance(data.get("filters"), list):
        data["filters"] = [
            f | {"save_path": local(f.get("save_path")),
                 "data_files": {k: [local(x) for x in v] if isinstance(v, list) else local(v)
                                for k, v in (f.get("data_files") or {}).items()}}
            if isinstance(f, dict) else f
            for f in data["filters"]]
    tars = data.get("input_tars")
    if isinstance(tars, str) and _is_local_relative(tars):
        data["input_tars"] = os.path.normpath(base_dir / tars)
    elif isinstance(tars, list):
        data["input_tars"] = [
            os.path.normpath(base_dir / t) if isinstance(t, str) and _is_local_relative(t) else t for t in tars
        ]
    return data


def relative_path_fields(path: str | Path) -> list[str]:
    """The fields of a yml that hold relative local paths (they depend on the folder they resolve against)."""
    with Path(path).open("r", encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        return []
    fields = []
    for key in ("input_tars", "output_metadata_dir", "custom_pypath", "weights_dir", "artifacts_dir"):
        value = raw.get(key)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and _is_local_relative(v) for v in values):
            fields.append(key)
    reshard = raw.get("reshard")
    if isinstance(reshard, dict) and isinstance(reshard.get("output_dir"), str) and _is_local_relative(reshard["output_dir"]):
        fields.append("reshard")
    for entry in raw.get("filters") or []:
        paths = [entry.get("save_path"), *(entry.get("data_files") or {}).values()] if isinstance(entry, dict) else []
        flat = [p for v in paths for p in (v if isinstance(v, list) else [v])]
        if any(isinstance(p, str) and _is_local_relative(p) for p in flat):
            fields.append("filters")
            break
    return fields

"""The asset catalog, as data: which assets exist, what computes them, and where each output name lands.

d2m_assets builds the Dagster graph from this; `d2m run` selects from it; the writers map names with it.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLES = "samples"  # per-shard sample table + stats, written by every feature pass


@dataclass(frozen=True)
class FeatureAsset:
    """Per-shard model outputs computed in the one pass over the tar."""

    name: str
    model: str
    description: str


@dataclass(frozen=True)
class ScoreAsset:
    """Per-shard scores computed from stored features (never from the tar)."""

    name: str
    parents: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class OutputName:
    """A seed postprocess name: which asset holds it, under which field, and its DataComp name."""

    name: str
    asset: str
    field: str
    datacomp: str | None = None

    def column(self, use_datacomp_keys: bool) -> str:
        return self.datacomp if use_datacomp_keys and self.datacomp else self.name


FEATURE_ASSETS: dict[str, FeatureAsset] = {
    a.name: a
    for a in (
        FeatureAsset("clip_b32_features", "oai-clip-vit-b32", "OpenAI CLIP ViT-B/32 image and text features (512-d, unit norm)"),
    )
}

SCORE_ASSETS: dict[str, ScoreAsset] = {
    a.name: a
    for a in (
        ScoreAsset("clip_b32_scores", ("clip_b32_features",), "CLIP ViT-B/32 score: dot product of image and text features"),
    )
}

COLUMNS: dict[str, OutputName] = {
    o.name: o
    for o in (OutputName("oai-clip-vit-b32-score", "clip_b32_scores", "score", "clip_b32_similarity_score"),)
}

FEATURES: dict[str, OutputName] = {
    o.name: o
    for o in (
        OutputName("oai-clip-vit-b32-image", "clip_b32_features", "image", "b32_img"),
        OutputName("oai-clip-vit-b32-text", "clip_b32_features", "text", "b32_txt"),
    )
}

# DataComp's released metadata and its filtering scripts call the caption `text`.
DATACOMP_FIELD_RENAMES = {"caption": "text"}

METADATA_ASSET = "shard_metadata"


class UnknownOutputError(ValueError):
    """A postprocess name the catalog does not know."""


def feature_asset_for_model(model: str) -> FeatureAsset:
    for asset in FEATURE_ASSETS.values():
        if asset.model == model:
            return asset
    raise UnknownOutputError(f"model {model!r} has no feature asset")


def output_name(name: str, *, feature: bool) -> OutputName:
    table = FEATURES if feature else COLUMNS
    kind = "postprocess_features" if feature else "postprocess_columns"
    try:
        return table[name]
    except KeyError:
        raise UnknownOutputError(f"unknown {kind} entry {name!r}; known: {', '.join(sorted(table))}") from None


def assets_for_config(models: list[str], columns: list[str], features: list[str]) -> list[str]:
    """The asset names a config asks for: each model's features, the assets its outputs live in, the metadata."""
    wanted: list[str] = [feature_asset_for_model(m).name for m in models]
    for name in columns:
        wanted.append(output_name(name, feature=False).asset)
    for name in features:
        wanted.append(output_name(name, feature=True).asset)
    for name in list(wanted):
        if name in SCORE_ASSETS:
            wanted.extend(SCORE_ASSETS[name].parents)
    ordered = list(dict.fromkeys(wanted))
    return ordered + [METADATA_ASSET]

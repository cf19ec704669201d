"""The asset catalog, as data: which assets exist, what computes them, and where each output name lands.

d2m_assets builds the Dagster graph from this; `d2m run` selects from it; the writers map names with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    compute: Callable[[dict[str, Any]], Any] | None = None  # custom_pypath postprocessor over model outputs

    def column(self, use_datacomp_keys: bool) -> str:
        return self.datacomp if use_datacomp_keys and self.datacomp else self.name


FEATURE_ASSETS: dict[str, FeatureAsset] = {
    a.name: a
    for a in (
        FeatureAsset("clip_b32_features", "oai-clip-vit-b32", "OpenAI CLIP ViT-B/32 image and text features (512-d, unit norm)"),
        FeatureAsset("clip_l14_features", "oai-clip-vit-l14", "OpenAI CLIP ViT-L/14 image and text features (768-d, unit norm)"),
        FeatureAsset("isc_features", "dedup-isc-ft-v107", "ISC21 descriptor of each image (256-d, unit norm)"),
        FeatureAsset("detoxify_scores", "nsfw-detoxify", "detoxify 'multilingual' toxicity of each caption (max over its classes)"),
        FeatureAsset("face_boxes", "faces-scrfd10g", "SCRFD-10G face boxes, [x1,y1,x2,y2] in [0,1] of the original image"),
    )
}

REFERENCE_ASSET = "dedup_reference"  # the evaluation-set embeddings dedup_scores compares against (unpartitioned)
REFERENCE_WEIGHTS = "dedup-reference"  # the weights name of that set (eval_dedup_embeddings.pt)

SCORE_ASSETS: dict[str, ScoreAsset] = {
    a.name: a
    for a in (
        ScoreAsset("clip_b32_scores", ("clip_b32_features",), "CLIP ViT-B/32 score: dot product of image and text features"),
        ScoreAsset("clip_l14_scores", ("clip_l14_features",), "CLIP ViT-L/14 score: dot product of image and text features"),
        ScoreAsset("nsfw_image_scores", ("clip_l14_features",), "NSFW probability from the L/14 image features (DataComp's MLP head)"),
        ScoreAsset("dedup_scores", ("isc_features", REFERENCE_ASSET), "max of z . ref over the evaluation-set ISC embeddings (the seed's dedup score)"),
    )
}

# The seed's model names -> the asset that runs them (a feature pass, or a score from stored features).
MODEL_ASSETS: dict[str, str] = {
    "oai-clip-vit-b32": "clip_b32_features",
    "oai-clip-vit-l14": "clip_l14_features",
    "nsfw-detoxify": "detoxify_scores",
    "nsfw-image-oai-clip-vit-l-14": "nsfw_image_scores",
    "faces-scrfd10g": "face_boxes",
    "dedup-isc-ft-v107": "isc_features",
}

COLUMNS: dict[str, OutputName] = {
    o.name: o
    for o in (
        OutputName("oai-clip-vit-b32-score", "clip_b32_scores", "score", "clip_b32_similarity_score"),
        OutputName("oai-clip-vit-l14-score", "clip_l14_scores", "score", "clip_l14_similarity_score"),
        OutputName("nsfw-detoxify-score", "detoxify_scores", "score"),
        OutputName("nsfw-image-score", "nsfw_image_scores", "score"),
        OutputName("face-boxes", "face_boxes", "boxes", "face_bboxes"),
        OutputName("dedup-isc-ft-v107-score", "dedup_scores", "score", "dedup"),
    )
}

FEATURES: dict[str, OutputName] = {
    o.name: o
    for o in (
        OutputName("oai-clip-vit-b32-image", "clip_b32_features", "image", "b32_img"),
        OutputName("oai-clip-vit-b32-text", "clip_b32_features", "text", "b32_txt"),
        OutputName("oai-clip-vit-l14-image", "clip_l14_features", "image", "l14_img"),
        OutputName("oai-clip-vit-l14-text", "clip_l14_features", "text", "l14_txt"),
        OutputName("dedup-isc-ft-v107-image", "isc_features", "image"),
    )
}

# DataComp's released metadata and its filtering scripts call the caption `text`.
DATACOMP_FIELD_RENAMES = {"caption": "text"}

METADATA_ASSET = "shard_metadata"


class UnknownOutputError(ValueError):
    """A postprocess name the catalog does not know."""


def asset_for_model(model: str) -> str:
    try:
        return MODEL_ASSETS[model]
    except KeyError:
        raise UnknownOutputError(f"unknown model {model!r}; known: {', '.join(sorted(MODEL_ASSETS))}") from None


def model_for_asset(asset: str) -> str | None:
    """The model whose weights an asset needs (features: the engine model; scores: a head), if any."""
    return next((m for m, a in MODEL_ASSETS.items() if a == asset), None)


def output_name(name: str, *, feature: bool) -> OutputName:
    table = FEATURES if feature else COLUMNS
    kind = "postprocess_features" if feature else "postprocess_columns"
    try:
        return table[name]
    except KeyError:
        raise UnknownOutputError(f"unknown {kind} entry {name!r}; known: {', '.join(sorted(table))}") from None


def assets_for_config(models: list[str], columns: list[str], features: list[str]) -> list[str]:
    """The asset names a config asks for, parents first, then shard_metadata.

    As in the seed, an output needs its model in `models` (NSFW needs oai-clip-vit-l14 as well).
    """
    wanted: list[str] = [asset_for_model(m) for m in models]
    outputs = [output_name(n, feature=False) for n in columns] + [output_name(n, feature=True) for n in features]
    for out in outputs:
        if out.compute is not None:  # computed by shard_metadata from the models' stored outputs
            continue
        model = model_for_asset(out.asset) or next(
            (model_for_asset(p) for p in SCORE_ASSETS[out.asset].parents if model_for_asset(p)), None)
        if model not in models:
            raise UnknownOutputError(f"{out.name!r} needs model {model!r} in `models`")
        wanted.append(out.asset)
    ordered: list[str] = []

    def add(name: str) -> None:
        for parent in SCORE_ASSETS[name].parents if name in SCORE_ASSETS else ():
            add(parent)
        if name not in ordered:
            ordered.append(name)

    for name in wanted:
        add(name)
    if "nsfw_image_scores" in ordered and "oai-clip-vit-l14" not in models:
        raise UnknownOutputError("model 'nsfw-image-oai-clip-vit-l-14' depends on 'oai-clip-vit-l14', which is not in `models`")
    return ordered + [METADATA_ASSET]

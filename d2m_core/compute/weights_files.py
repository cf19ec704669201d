"""Which weights files each built-in model loads, and where they come from: data, without torch.

The model classes take their `weights_files` from here, and `d2m run` checks these files (present, sha256)
before it imports torch, open_clip or dagster, so a missing file is reported in about a second.
"""

from __future__ import annotations

from pathlib import Path

from d2m_core import catalog
from d2m_core.config import D2MConfig
from d2m_core.compute.weights import (PixelNorm, ResolvedWeights, WeightsError, WeightsFile, random_weights_enabled,
                              resolve_weights, weights_dir)

OPENAI_URL = "https://openaipublic.azureedge.net/clip/models"
SEED_RELEASE = "https://github.com/mlfoundations/dataset2metadata/releases/download/v0.1.0-alpha"
ISC_RELEASE = "https://github.com/lyakaap/ISC21-Descriptor-Track-1st/releases/download/v1.0.1"

DETOXIFY_CHECKPOINT = "multilingual_debiased-0b549669.ckpt"
DETOXIFY_URL = f"https://github.com/unitaryai/detoxify/releases/download/v0.4-alpha/{DETOXIFY_CHECKPOINT}"
# torch.hub names release files by the first 8 hex digits of their sha256; that is the only pin upstream gives.
DETOXIFY_SHA256_PREFIX = "0b549669"
TOKENIZER_DIR = "xlm-roberta-base"
TOKENIZER_SOURCE = (
    "https://huggingface.co/FacebookAI/xlm-roberta-base (files config.json, sentencepiece.bpe.model and/or "
    "tokenizer.json, tokenizer_config.json)"
)

SEED_NORM = PixelNorm(127.5, 127.5)  # the seed's faces-aug: ToTensor then Normalize(0.5, 0.5)
INSIGHTFACE_NORM = PixelNorm(127.5, 128.0)  # insightface's SCRFD: blobFromImage(1/128, mean 127.5, swapRB)
REFERENCE_MODEL = catalog.REFERENCE_WEIGHTS  # the name the dedup reference set's weights record carries


def openai_clip_weights(arch: str, openai_file: str, sha256: str, hf_repo: str) -> list[WeightsFile]:
    """The files an OpenAI CLIP loads from: OpenAI's own archive (sha256 pinned), or open_clip's checkpoint
    of the same weights, renamed `<arch>.openai.safetensors` / `.bin`."""
    open_clip_source = f"open_clip's '{arch}' / 'openai' checkpoint (hf-hub {hf_repo}"
    return [
        WeightsFile(openai_file, "openai-jit", sha256, f"{OPENAI_URL}/{sha256}/{openai_file}"),
        WeightsFile(f"{arch}.openai.safetensors", "open_clip", None, f"{open_clip_source}, open_clip_model.safetensors), renamed"),
        WeightsFile(f"{arch}.openai.bin", "open_clip", None, f"{open_clip_source}, open_clip_pytorch_model.bin), renamed"),
    ]


# model name -> the files it accepts, first match wins (sha256 pins: the seed's dataset2metadata/utils.py
# cloud_checkpoints, or the upstream release's).
MODEL_FILES: dict[str, list[WeightsFile]] = {
    "oai-clip-vit-b32": openai_clip_weights(
        "ViT-B-32-quickgelu", "ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        "timm/vit_base_patch32_clip_224.openai"),
    "oai-clip-vit-l14": openai_clip_weights(
        "ViT-L-14-quickgelu", "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "timm/vit_large_patch14_clip_224.openai"),
    "nsfw-detoxify": [WeightsFile(DETOXIFY_CHECKPOINT, "detoxify-ckpt", None, DETOXIFY_URL,
                                  sha256_prefix=DETOXIFY_SHA256_PREFIX)],
    "nsfw-image-oai-clip-vit-l-14": [
        WeightsFile("nsfw_torch.pt", "torch-state-dict",
                    "3c97d5478477c181bfa29a33e6933f710c8ec587e3c3551ff855e293acdaf390", f"{SEED_RELEASE}/nsfw_torch.pt"),
    ],
    "faces-scrfd10g": [
        WeightsFile("scrfd_10g.pt", "scrfd-torch", "963570df5e0ebf6bb313239d0f9f3f0c096c1ff6937e8e28e45abad4d8b1d5c7",
                    f"{SEED_RELEASE}/scrfd_10g.pt", SEED_NORM),
        WeightsFile("scrfd_10g_bnkps.onnx", "onnx", None,
                    "insightface model zoo: scrfd_10g_bnkps.onnx (also det_10g.onnx in buffalo_l)", INSIGHTFACE_NORM),
        WeightsFile("det_10g.onnx", "onnx", None,
                    "insightface model zoo: det_10g.onnx from the buffalo_l pack (SCRFD-10G with keypoints)",
                    INSIGHTFACE_NORM),
    ],
    "dedup-isc-ft-v107": [WeightsFile("isc_ft_v107.pth.tar", "isc", None, f"{ISC_RELEASE}/isc_ft_v107.pth.tar")],
}

DEDUP_MODEL = "dedup-isc-ft-v107"  # its dedup_scores compare against the reference set below
DEDUP_REFERENCE_FILES = [
    WeightsFile("eval_dedup_embeddings.pt", "torch-tensor",
                "18aeb08e1d53638761e05ac95254a2ef49653bfdb59a631c9304117ceef23d14",
                f"{SEED_RELEASE}/eval_dedup_embeddings.pt"),
]


def check_tokenizer_dir(folder: Path) -> None:
    """detoxify's XLM-RoBERTa config/tokenizer folder: config.json and a tokenizer file."""
    has_config = (folder / "config.json").is_file()
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "sentencepiece.bpe.model").is_file()
    if not (folder.is_dir() and has_config and has_tokenizer):
        what = "is missing" if not folder.is_dir() else "lacks config.json or the tokenizer files"
        raise WeightsError(
            f"nsfw-detoxify: the XLM-RoBERTa config/tokenizer folder {folder} {what}; create it next to "
            f"{DETOXIFY_CHECKPOINT} with the files of {TOKENIZER_SOURCE}"
        )


# Folders a model reads beside its weights file: (what, where to get it).
EXTRA_FILES: dict[str, list[str]] = {
    "nsfw-detoxify": [f"{TOKENIZER_DIR}/ (config.json + tokenizer.json or sentencepiece.bpe.model): {TOKENIZER_SOURCE}"],
}


def resolve_builtin_weights(model: str, directory: Path) -> ResolvedWeights:
    """A built-in model's weights, verified as its class verifies them (detoxify: the tokenizer folder too)."""
    resolved = resolve_weights(model, MODEL_FILES[model], directory)
    if model == "nsfw-detoxify" and not resolved.is_random:
        check_tokenizer_dir(resolved.path.parent / TOKENIZER_DIR)
    return resolved


def weights_inventory(configured_dir: str | None = None) -> list[dict[str, str | None]]:
    """Every file each built-in model (and each filtering baseline) needs: name, sha256, where it goes, where
    users get it."""
    from d2m_core.subsets.filter_files import data_files_inventory

    directory = weights_dir(configured_dir)
    rows: list[dict[str, str | None]] = []
    for model, accepted in MODEL_FILES.items():
        for spec in [*accepted, *(DEDUP_REFERENCE_FILES if model == DEDUP_MODEL else [])]:
            rows.append({"model": model, "file": spec.filename, "format": spec.format, "sha256": spec.sha256,
                         "sha256_prefix": spec.sha256_prefix, "path": str(directory / spec.filename),
                         "source": spec.source})
        for extra in EXTRA_FILES.get(model, []):
            rows.append({"model": model, "file": extra, "format": "folder", "sha256": None,
                         "path": str(directory / extra.split(" ")[0]), "source": None})
    return rows + data_files_inventory(configured_dir)


def check_builtin_weights(config: D2MConfig) -> None:
    """Every file the config's built-in models (and the dedup reference set, when used) load: present and
    matching its pin. Raises WeightsError naming the first gap. Custom models are left to the full check,
    which imports their plugin."""
    if random_weights_enabled():
        return
    directory = weights_dir(config.weights_dir)
    for model in config.models:
        if model in MODEL_FILES:
            resolve_builtin_weights(model, directory)
    if config.custom_pypath or not set(config.models) <= set(MODEL_FILES):
        return  # which assets a plugin adds is known only once it is imported
    if catalog.REFERENCE_ASSET in catalog.assets_for_config(config.models, config.postprocess_columns,
                                                            config.postprocess_features):
        resolve_weights(REFERENCE_MODEL, DEDUP_REFERENCE_FILES, directory)

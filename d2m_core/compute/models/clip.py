"""OpenAI CLIP (QuickGELU) through open_clip: L2-normalised image and text features."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from d2m_core.compute.compiled import StaticInput
from d2m_core.compute.weights import ResolvedWeights, WeightsFile
from d2m_core.compute.weights_files import MODEL_FILES
from d2m_core.lightimports import open_clip_for_openai_models

open_clip = open_clip_for_openai_models()

log = logging.getLogger(__name__)


def _load_open_clip(arch: str, weights: ResolvedWeights) -> torch.nn.Module:
    if weights.is_random:  # resolve_weights has already warned, once, that this model runs with random weights
        torch.manual_seed(0)
        with _dropping_log_message(RANDOM_INIT_MESSAGE):
            return open_clip.create_model(arch, pretrained=None)
    assert weights.file is not None
    if weights.file.format == "openai-jit":
        return open_clip.load_openai_model(str(weights.path), precision="fp32", device="cpu")
    with _dropping_log_message(RANDOM_INIT_MESSAGE):  # false: the checkpoint is loaded right after
        model = open_clip.create_model(arch, pretrained=None)
    open_clip.load_checkpoint(model, str(weights.path))
    return model


RANDOM_INIT_MESSAGE = "Model initialized randomly"  # open_clip's warning for create_model(pretrained=None)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def _dropping_log_message(text: str) -> Iterator[None]:
    """Drop root-logger records containing `text` while the block runs (open_clip logs through the root)."""
    drop = _DropMessage(text)
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


class OaiClip:
    """Base for OpenAI CLIP encoders; subclasses name the architecture and weights files."""

    name = ""
    arch = ""
    raw_inputs = ["image", "text"]
    preprocessors = ["clip-aug", "clip-tokens"]
    dependencies: list[str] = []
    to_device = True
    output_fields: dict[str, int] = {}
    weights_files: list[WeightsFile] = []
    # torch_compile compiles the image tower; cuda_graphs captures it and the text tower (77 token ids a caption)
    static_parts = {"model.visual": StaticInput((3, 224, 224)),
                    "model.encode_text": StaticInput((77,), dtype=torch.long, compile=False)}

    def __init__(self, device: torch.device | int | str, *, dtype: torch.dtype = torch.float32, weights: ResolvedWeights) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = _load_open_clip(self.arch, weights).to(self.device, dtype).eval()
        self.weights = weights

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.model.encode_image(image.to(self.device, self.dtype)).float()
        txt = self.model.encode_text(tokens.to(self.device)).float()
        return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


class OaiClipVitB32(OaiClip):
    name = "oai-clip-vit-b32"
    arch = "ViT-B-32-quickgelu"
    output_fields = {"image": 512, "text": 512}
    weights_files = MODEL_FILES["oai-clip-vit-b32"]


class OaiClipVitL14(OaiClip):
    name = "oai-clip-vit-l14"
    arch = "ViT-L-14-quickgelu"
    output_fields = {"image": 768, "text": 768}
    weights_files = MODEL_FILES["oai-clip-vit-l14"]

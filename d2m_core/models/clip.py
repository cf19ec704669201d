"""OpenAI CLIP (QuickGELU) through open_clip: L2-normalised image and text features."""

from __future__ import annotations

import logging

import open_clip
import torch

from d2m_core.weights import ResolvedWeights, WeightsFile

log = logging.getLogger(__name__)

OPENAI_URL = "https://openaipublic.azureedge.net/clip/models"


def _load_open_clip(arch: str, weights: ResolvedWeights) -> torch.nn.Module:
    if weights.is_random:
        torch.manual_seed(0)
        return open_clip.create_model(arch, pretrained=None)
    assert weights.file is not None
    if weights.file.format == "openai-jit":
        return open_clip.load_openai_model(str(weights.path), precision="fp32", device="cpu")
    model = open_clip.create_model(arch, pretrained=None)
    open_clip.load_checkpoint(model, str(weights.path))
    return model


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
    weights_files = [
        WeightsFile(
            "ViT-B-32.pt",
            "openai-jit",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            f"{OPENAI_URL}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        ),
        WeightsFile(
            "ViT-B-32-quickgelu.openai.safetensors",
            "open_clip",
            None,
            "open_clip's 'ViT-B-32-quickgelu' / 'openai' checkpoint (hf-hub timm/vit_base_patch32_clip_224.openai, "
            "open_clip_model.safetensors), renamed",
        ),
        WeightsFile(
            "ViT-B-32-quickgelu.openai.bin",
            "open_clip",
            None,
            "open_clip's 'ViT-B-32-quickgelu' / 'openai' checkpoint (open_clip_pytorch_model.bin), renamed",
        ),
    ]


class OaiClipVitL14(OaiClip):
    name = "oai-clip-vit-l14"
    arch = "ViT-L-14-quickgelu"
    output_fields = {"image": 768, "text": 768}
    weights_files = [
        WeightsFile(
            "ViT-L-14.pt",
            "openai-jit",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            f"{OPENAI_URL}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        ),
        WeightsFile(
            "ViT-L-14-quickgelu.openai.safetensors",
            "open_clip",
            None,
            "open_clip's 'ViT-L-14-quickgelu' / 'openai' checkpoint (hf-hub timm/vit_large_patch14_clip_224.openai, "
            "open_clip_model.safetensors), renamed",
        ),
        WeightsFile(
            "ViT-L-14-quickgelu.openai.bin",
            "open_clip",
            None,
            "open_clip's 'ViT-L-14-quickgelu' / 'openai' checkpoint (open_clip_pytorch_model.bin), renamed",
        ),
    ]

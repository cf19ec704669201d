"""Preprocessing, split in two: a per-image CPU step to uint8 pixels, and a batched device step (normalise).

The split lets the loader hand uint8 batches to the device stage, so decoding and resizing can later
move to the GPU behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT_LENGTH = 77


class ImageTransform(Protocol):
    """A named image preprocessing: `prepare` one PIL image to uint8 CHW, `finish` a batch on the device."""

    name: str

    def prepare(self, image: Image.Image) -> torch.Tensor: ...

    def finish(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 (3, H, W) tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize_uint8(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """(B,3,H,W) uint8 -> normalised float, computed in float32 as ToTensor+Normalize do, then cast."""
    x = batch.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).to(dtype)


@dataclass(frozen=True)
class ClipImageTransform:
    """OpenAI CLIP's `_transform(224)`: bicubic resize of the short side, center crop, CLIP mean/std."""

    name: str = "clip-aug"
    size: int = 224

    def prepare(self, image: Image.Image) -> torch.Tensor:
        resized = TF.resize(image.convert("RGB"), self.size, interpolation=InterpolationMode.BICUBIC)
        return pil_to_uint8(TF.center_crop(resized, [self.size, self.size]))

    def finish(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return normalize_uint8(batch, CLIP_MEAN, CLIP_STD, dtype)


class ClipTokenizer:
    """OpenAI CLIP tokens: 77 tokens, lower-cased and cleaned, truncated with EOT kept last."""

    name = "clip-tokens"

    def __init__(self) -> None:
        import open_clip

        self._tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts, context_length=CLIP_CONTEXT_LENGTH)


IMAGE_TRANSFORMS: dict[str, ImageTransform] = {"clip-aug": ClipImageTransform()}

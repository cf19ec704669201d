"""Preprocessing, split in two: a per-image CPU step to uint8 pixels, and a batched device step (normalise).

The split lets the loader hand uint8 batches to the device stage, so decoding and resizing can later
move to the GPU behind the same interface.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from d2m_core.lightimports import import_torchvision
from d2m_core.reading.tokens import ClipTokenizer

InterpolationMode = import_torchvision().transforms.InterpolationMode
TF = import_torchvision().transforms.functional

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
MAX_RESIZED_PIXELS = 32_000_000  # a 1x3000 strip resized to a 224 short side would be 150 Mpx (~600 MB)


def check_aspect(image: Image.Image, short_side: int = 224) -> None:
    """Refuse images whose short-side resize would explode memory (recorded as a failed sample)."""
    w, h = image.size
    resized = short_side * short_side * max(w, h) / max(min(w, h), 1)
    if resized > MAX_RESIZED_PIXELS:
        raise ValueError(f"aspect ratio of {w}x{h} too extreme: its {short_side}px short-side resize would be "
                         f"{resized / 1e6:.0f} Mpx (limit {MAX_RESIZED_PIXELS / 1e6:.0f})")


class ImageTransform(Protocol):
    """A named image preprocessing, split in two:

    `prepare` turns one PIL image into uint8 CHW pixels plus optional per-image side data (CPU, loader);
    `finish` turns the stacked batch into what the model takes (device, batched).
    """

    name: str

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def finish(self, pixels: torch.Tensor, aux: torch.Tensor | None, dtype: torch.dtype) -> Any: ...


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 (3, H, W) tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize_uint8(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """(B,3,H,W) uint8 -> normalised float, computed in float32 as ToTensor+Normalize do, then cast."""
    x = batch.to(torch.float32).div_(255.0)
    return x.sub_(channel_values(mean, batch.device)).div_(channel_values(std, batch.device)).to(dtype)


@functools.lru_cache(maxsize=None)
def channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel values as a float32 (1, C, 1, 1) tensor on `device`, made once a device: a tensor made from
    a list for a CUDA device is a copy from pageable memory, which waits for all the work the device has queued."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)


@dataclass(frozen=True)
class ClipImageTransform:
    """OpenAI CLIP's `_transform(224)`: bicubic resize of the short side, center crop, CLIP mean/std."""

    name: str = "clip-aug"
    size: int = 224

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, None]:
        check_aspect(image, self.size)
        resized = TF.resize(image.convert("RGB"), self.size, interpolation=InterpolationMode.BICUBIC)
        return pil_to_uint8(TF.center_crop(resized, [self.size, self.size])), None

    def finish(self, pixels: torch.Tensor, aux: None, dtype: torch.dtype) -> torch.Tensor:
        return normalize_uint8(pixels, CLIP_MEAN, CLIP_STD, dtype)


@dataclass(frozen=True)
class DedupImageTransform:
    """The ISC descriptor's input: stretch to 512x512 (aspect not kept), bilinear, mean/std 0.5."""

    name: str = "dedup-aug"
    size: int = 512

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, None]:
        resized = TF.resize(image.convert("RGB"), [self.size, self.size], interpolation=InterpolationMode.BILINEAR)
        return pil_to_uint8(resized), None

    def finish(self, pixels: torch.Tensor, aux: None, dtype: torch.dtype) -> torch.Tensor:
        return normalize_uint8(pixels, HALF, HALF, dtype).contiguous(memory_format=torch.channels_last)


def square_padding(width: int, height: int) -> tuple[int, int, int, int]:
    """The seed's centred square padding (left, top, right, bottom) in pixels."""
    side = max(width, height)
    left, top = int((side - width) / 2), int((side - height) / 2)
    return left, top, side - width - left, side - height - top


@dataclass(frozen=True)
class FacesImageTransform:
    """The seed's SquarePadResizeNorm(224): pad to a centred square with white, bicubic 224, mean/std 0.5.

    Side data: the padding [left, top, right, bottom] / side, to map boxes back to the unpadded image.
    """

    name: str = "faces-aug"
    size: int = 224

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.convert("RGB")
        padding = square_padding(*image.size)
        padded = TF.pad(image, list(padding), fill=(255, 255, 255))
        resized = TF.resize(padded, [self.size, self.size], interpolation=InterpolationMode.BICUBIC)
        side = float(max(image.size))
        return pil_to_uint8(resized), torch.tensor(padding, dtype=torch.float32) / side

    def finish(self, pixels: torch.Tensor, aux: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        assert aux is not None, "faces-aug needs the padding side data"
        return normalize_uint8(pixels, HALF, HALF, torch.float32), aux.to(pixels.device, non_blocking=True)


class IdentityText:
    """The raw captions, for models that tokenize themselves (detoxify)."""

    name = "identity"

    def __call__(self, texts: list[str]) -> list[str]:
        return list(texts)


IMAGE_TRANSFORMS: dict[str, ImageTransform] = {
    t.name: t for t in (ClipImageTransform(), DedupImageTransform(), FacesImageTransform())
}

TEXT_PREPROCESSORS: dict[str, Callable[[], Callable[[list[str]], Any]]] = {
    "clip-tokens": ClipTokenizer,
    "identity": IdentityText,
}

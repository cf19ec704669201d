"""PIL's two-pass antialiased resize for a whole batch of differently sized images, as two batched matrix products.

`fastpath.prepare_tensors` resized each distinct image size on its own: about a dozen small device operations
per image and transform (to float, each pass's resize, rounding, clipping, cropping, copying out). DataComp's
images hardly ever share a size, so on a GPU a batch of 512 was some 18,000 kernel launches for clip-aug,
dedup-aug and faces-aug, each issued by a Python thread holding the GIL: launch overhead, not arithmetic, set
the rate. Here a chunk of images is padded into one canvas, and each pass is one matrix product with a
per-image weight matrix (the filter's taps, laid out densely; zero outside the image), so a chunk costs a
fixed handful of launches whatever its sizes.

What is kept from PIL (and from `fastpath`'s per-size path, which it replaces for images up to MAX_SIDE):
- The filter taps: PIL's `precompute_coeffs` (support scaled by the downscale factor, window bounds truncated
  as C does, taps normalised to sum 1), bicubic with a = -0.5 and bilinear (triangle), computed in float64.
- Two passes, horizontal then vertical, each rounded half up and clipped to [0, 255] as a uint8 image would be.
- Crops and pads fold into the matrices: clip-aug's centre crop keeps only the 224 output rows/columns it
  needs; faces-aug's white square padding is a constant 255 x (the taps that fall on the padding).
Products run in float32 with TF32 off (`matmul_is_exact`); the sums are the same as the separable kernels'
up to float rounding, so a pixel lands on the other side of a .5 now and then: 1 level, as between torch's
own kernels and PIL's integer arithmetic (tests/core/test_fastpath.py pins the bounds against PIL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_SIDE = 1024  # images with a longer side take fastpath's per-size path (their canvas would be large)
CHUNK_PIXELS = 1 << 25  # canvas pixels (images x height x width) per chunk: 128 MiB as uint8 x 3, 0.4 GiB as float32
SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
ON_CPU = False  # see applies()


@dataclass(frozen=True)
class Axis:
    """One pass of one image along one axis: the input's `length` (padding included) of which `real` pixels
    start at `real_lo` (the rest is white padding), resized to `full` and cut to [out_lo, out_lo + count)."""

    length: int
    real_lo: int
    real: int
    full: int
    out_lo: int


def _filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5  # PIL's (and torch's antialiased) bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def weights(axes: Sequence[Axis], count: int, canvas: int, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image weight matrices of one pass: (N, count, canvas) float32 over the canvas's real pixels, and
    (N, count) float32, the weight each output gives the white padding (times 255, added after the product).

    The taps are computed only where they can be non-zero (each output's window of at most 2 x support + 1
    positions, in float64), then scattered into the dense matrices."""
    f64 = torch.float64
    table = torch.tensor([(a.length, a.real_lo, a.real, a.full, a.out_lo) for a in axes], dtype=f64)
    length, real_lo, real, full, out_lo = table.to(device, non_blocking=True).T[:, :, None]  # each (N, 1)
    scale = length / full
    stretch = scale.clamp(min=1.0)  # the filter widens when downscaling
    support = SUPPORT[mode] * stretch
    centre = (out_lo + torch.arange(count, dtype=f64, device=device)[None] + 0.5) * scale  # (N, count)
    lo = (centre - support + 0.5).trunc().clamp(min=0.0)  # C's (int) cast truncates toward zero
    hi = torch.minimum((centre + support + 0.5).trunc(), length)
    window = math.ceil(2.0 * SUPPORT[mode] * max(max(a.length / a.full, 1.0) for a in axes)) + 2
    position = lo[..., None] + torch.arange(window, dtype=f64, device=device)  # (N, count, window)
    taps = _filter((position - centre[..., None] + 0.5) / stretch[..., None], mode)
    taps = taps * (position < hi[..., None])
    total = taps.sum(-1, keepdim=True)  # the taps' sum normalises; the real pixels' share goes in the matrix
    taps = taps / torch.where(total == 0.0, torch.ones_like(total), total)
    inside = (position >= real_lo[..., None]) & (position < (real_lo + real)[..., None])
    padding = (taps * ~inside).sum(-1)
    column = (position - real_lo[..., None]).clamp(0, canvas - 1).long()  # canvas column j: position real_lo + j
    matrix = torch.zeros((len(axes), count, canvas), dtype=torch.float32, device=device)
    matrix.scatter_add_(2, column, (taps * inside).to(torch.float32))  # the clamped ones add zeros
    return matrix, padding.to(torch.float32)


def matmul_is_exact(device: torch.device) -> bool:
    """Whether float32 products on `device` are full float32 (TF32 would move pixels by several levels)."""
    return device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32


def applies(device: torch.device) -> bool:
    """Whether `fastpath` resizes batches here: on CUDA (with exact float32 products). On the CPU the dense
    products cost about 15x the per-size path's CPU time (128 images of up to 512 px: 14.7 s against 0.96 s on
    2 cores), so the CPU keeps that path unless ON_CPU is set (the tests set it to check these results)."""
    return (device.type == "cuda" or ON_CPU) and matmul_is_exact(device)


def _round(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).clamp_(0.0, 255.0).floor_()


def resize(canvas: torch.Tensor, rows: Sequence[Axis], cols: Sequence[Axis], size: int, mode: str) -> torch.Tensor:
    """The images of `canvas` (float32 (N, 3, H, W), each at the top left, zeros elsewhere), each resized as
    its `cols` (horizontal pass) then `rows` (vertical pass) say, to `size` x `size`: float32 integer values."""
    _, _, height, width = canvas.shape
    across, across_pad = weights(cols, size, width, mode, canvas.device)  # (N, size, W), (N, size)
    down, down_pad = weights(rows, size, height, mode, canvas.device)  # (N, size, H), (N, size)
    x = torch.matmul(canvas, across.transpose(1, 2)[:, None])  # (N, 3, H, size)
    x = _round(x.add_(255.0 * across_pad[:, None, None, :]))
    y = torch.matmul(down[:, None], x)  # (N, 3, size, size)
    return _round(y.add_(255.0 * down_pad[:, None, :, None]))


def canvas_of(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images on one device -> float32 (N, 3, max H, max W), each at the top left.

    Images that are (H, W, 3) pixels in one flat buffer, seen as (3, H, W) (`fastpath.pixels_batch`: the
    readers' decoded images, uploaded in one copy), are gathered from it in a few operations whatever their
    number; others are copied in one by one."""
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    flat = _shared_buffer(images)
    if flat is not None:
        return _gathered(flat, images, height, width)
    canvas = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=images[0].device)
    for slot, image in zip(canvas, images):
        slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return canvas.to(torch.float32)


def _shared_buffer(images: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one-dimensional uint8 buffer that every image views as (H, W, 3) pixels, or None."""
    storage = images[0].untyped_storage()
    for image in images:
        height, width = image.shape[-2:]
        if (image.dtype != torch.uint8 or image.stride() != (1, 3 * width, 3)
                or image.untyped_storage().data_ptr() != storage.data_ptr()):
            return None
    return images[0].new_empty(0).set_(storage)


def _gathered(flat: torch.Tensor, images: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    device = flat.device
    table = torch.tensor([(i.storage_offset(), i.shape[-2], i.shape[-1]) for i in images], dtype=torch.int64)
    offset, rows, cols = table.to(device, non_blocking=True).T[:, :, None, None]  # each (N, 1, 1)
    y = torch.arange(height, device=device)[None, :, None]
    x = torch.arange(width, device=device)[None, None, :]
    inside = (y < rows) & (x < cols)  # (N, H, W)
    index = torch.where(inside, offset + y * (3 * cols) + 3 * x, 0)  # of each pixel's red byte
    if flat.numel() < 2**31:
        index = index.to(torch.int32)  # half the memory
    canvas = torch.empty((len(images), 3, height, width), dtype=torch.float32, device=device)
    for channel in range(3):
        values = torch.index_select(flat, 0, (index + channel).view(-1)).view(index.shape)
        canvas[:, channel] = values.masked_fill_(~inside, 0)
    return canvas


def chunks(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of images (by (height, width)) in chunks whose canvas stays under CHUNK_PIXELS; similar
    heights go together so that little of a canvas is padding."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    out: list[list[int]] = []
    current: list[int] = []
    height = width = 0
    for i in order:
        h, w = sizes[i]
        grown_h, grown_w = max(height, h), max(width, w)
        if current and (len(current) + 1) * grown_h * grown_w > CHUNK_PIXELS:
            out.append(current)
            current, grown_h, grown_w = [], h, w
        current.append(i)
        height, width = grown_h, grown_w
    if current:
        out.append(current)
    return out

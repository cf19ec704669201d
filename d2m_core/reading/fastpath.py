"""Device-side preprocessing: encoded image bytes in, the model inputs of the image transforms out.

The loader's CPU path (`decode_image` + `ImageTransform.prepare`: PIL, one image at a time in a thread
pool) costs ~11 ms of CPU per 512 px image for clip-aug + dedup-aug + faces-aug (~2.3 ms for clip-aug
alone), so it caps a GPU at ~90 images/s per loader core. This module does that work on any torch device:

1. `decode_batch`: JPEGs go through `torchvision.io.decode_jpeg` (on CUDA: nvJPEG, one batched call per
   batch; on the CPU: libjpeg-turbo). Everything else (PNG, WebP, GIF, CMYK/YCCK or 12-bit JPEGs,
   truncated JPEGs, JPEGs so large that PIL decodes them in draft mode, bytes torchvision rejects) falls
   back, per image, to `d2m_core.reading.decoding.decode_image` (PIL, the seed's semantics) and is then copied to
   the device. An undecodable image becomes a failure reason; one bad image never fails the batch.
2. `prepare_tensors`: each transform of `d2m_core.reading.transforms` as tensor ops, giving the same uint8
   (B, 3, S, S) batches (and faces-aug's padding) that `prepare` gives, so the transforms' own `finish`
   turns them into model inputs (`tensor_transforms` does both; `preprocess_batch` does it all). On CUDA,
   images up to `batched_resize.MAX_SIDE` are resized a chunk at a time by `batched_resize` (matrix
   products); larger ones, and all on the CPU, by the per-size kernels below.

What is kept from the PIL path, on purpose:
- Sizes: torchvision's PIL `resize` (short side to 224, long side int(224 * long / short)), `center_crop`
  (offsets rounded half to even, Python's round), the seed's square padding (`square_padding`), white fill.
- Filters: torch's antialiased bicubic (a = -0.5) and bilinear are PIL's filters. PIL resizes in two
  passes, horizontal then vertical, rounding to uint8 and clipping after each; so do we (float32 passes,
  each clipped to [0, 255] and rounded half up). One 2-D float pass without the intermediate rounding
  differs from PIL by up to 9 levels at sharp edges; two rounded passes by at most 2.
- No EXIF rotation (torchvision's default, as the seed's 'pilrgb'); grayscale JPEGs come out RGB.

Measured against the PIL path (`prepare`) on 300 make_shards images (uint8 levels; tests/core/test_fastpath.py
pins max <= 2, mean <= 0.02): clip-aug max 2 (mean 0.0023), dedup-aug max 2 (mean 0.0099), faces-aug max 1
(mean 0.00005). On the CPU the JPEG decode is bit-identical to PIL's (both libjpeg-turbo); nvJPEG's IDCT
and chroma upsampling differ from libjpeg-turbo's: `python -m d2m_core.reading.fastpath` measures it on a GPU.
On the CPU this path is about as fast as PIL's; it is meant for CUDA.

Memory and limits: same-size images are resized together (GROUP_PIXELS per call); the horizontal pass
converts a huge image to float in chunks of rows; faces-aug never builds the padded square of a wide
image (white rows are added after the horizontal pass, where they are still white) and builds that of a
tall one only a chunk of rows at a time. CUDA's antialiased kernels refuse downscale factors above ~90
(shared memory): a pass above MAX_CUDA_SCALE runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2m_core.reading import batched_resize
from d2m_core.reading.decoding import DRAFT_ABOVE_PIXELS, DecodeError, decode_image
from d2m_core.reading.transforms import CLIP_STD, HALF, IMAGE_TRANSFORMS, check_aspect, pil_to_uint8, square_padding

try:  # torchvision 0.29 deprecates its image codecs (torchcodec supersedes them); they still work
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
except ImportError:  # pragma: no cover - a torchvision without codecs: everything decodes with PIL
    decode_jpeg = None  # type: ignore[assignment]
    ImageReadMode = None  # type: ignore[assignment,misc]

__all__ = [
    "FAST_TRANSFORMS", "DecodedBatch", "DevicePreprocessed", "JpegHeader", "decode_batch", "parse_jpeg_header",
    "prepare_tensors", "preprocess_batch", "supports", "tensor_transforms",
]

FAST_TRANSFORMS = frozenset({"clip-aug", "dedup-aug", "faces-aug"})
DEVICE_DECODABLE_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive (Huffman)
MAX_CUDA_SCALE = 64.0  # CUDA's antialiased kernels need shared memory growing with the scale; above it, the CPU
GROUP_PIXELS = 1 << 24  # same-size images are resized together, up to this many pixels per call


def supports(names: Iterable[str]) -> bool:
    """Whether every named image transform has a device implementation here (custom plugins have none)."""
    return set(names) <= FAST_TRANSFORMS


# --------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say about a JPEG (enough to route it)."""

    width: int
    height: int
    components: int
    precision: int
    sof: int  # the SOFn marker's second byte (0xC0 baseline, 0xC2 progressive, ...)
    component_ids: tuple[int, ...]
    adobe_transform: int | None  # APP14 'Adobe' colour transform flag, when present
    complete: bool  # an EOI marker follows the first scan (the file is not truncated)

    @property
    def device_decodable(self) -> bool:
        """A plain 8-bit Huffman YCbCr or grayscale JPEG that libjpeg-turbo and nvJPEG decode as PIL does.

        Left to PIL: CMYK/YCCK (4 components), RGB-coded JPEGs (Adobe transform 0 or component ids R, G, B),
        12-bit, arithmetic-coded or lossless JPEGs, truncated files (PIL decodes them with a grey tail), and
        JPEGs over DRAFT_ABOVE_PIXELS (PIL decodes them in draft mode, see d2m_core.reading.decoding)."""
        if self.sof not in DEVICE_DECODABLE_SOF or self.precision != 8 or not self.complete:
            return False
        if self.width <= 0 or self.height <= 0 or self.width * self.height > DRAFT_ABOVE_PIXELS:
            return False
        if self.components == 1:
            return True
        return self.components == 3 and self.adobe_transform != 0 and self.component_ids != (82, 71, 66)


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG up to its first scan; None when `data` is not a well-formed JPEG start."""
    data = data if isinstance(data, bytes) else bytes(data)  # a view into a reader's ring
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, sof, adobe = 2, None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # bytes between segments: libjpeg tolerates them with a warning; PIL decides
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:
            return None  # EOI before any scan
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        segment = data[i + 4: i + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(segment) < 6:
                return None
            components = segment[5]
            ids = tuple(segment[6 + 3 * k] for k in range(components) if 6 + 3 * k < len(segment))
            sof = (marker, segment[0], (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], components, ids)
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker == 0xDA:
            if sof is None:
                return None
            marker_, precision, height, width, components, ids = sof
            return JpegHeader(width=width, height=height, components=components, precision=precision, sof=marker_,
                              component_ids=ids, adobe_transform=adobe, complete=data.rfind(b"\xff\xd9") > i)
        i += 2 + length
    return None


@dataclass
class DecodedBatch:
    """Decoded images aligned with the input: a uint8 (3, H, W) tensor on the device, or a failure reason."""

    images: list[torch.Tensor | None]
    failures: list[str | None]
    backends: list[str | None]  # "torchvision" (nvJPEG / libjpeg-turbo) or "pil", None for a failure

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ok(self) -> list[int]:
        """Indices of the decoded images, in order."""
        return [i for i, image in enumerate(self.images) if image is not None]

    def count(self, backend: str) -> int:
        return sum(b == backend for b in self.backends)

    def by_backend(self) -> dict[str, int]:
        """Images each decoder took: {"torchvision": n, "pil": m}."""
        return {b: self.count(b) for b in ("torchvision", "pil")}


def _pil_decode(data: bytes, device: torch.device) -> torch.Tensor:
    """The seed's decode (PIL, convert('RGB')), as a uint8 (3, H, W) tensor on `device`; raises DecodeError."""
    return pil_to_uint8(decode_image(data)).to(device)


def _torchvision_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        if device.type == "cuda":
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        return [decode_jpeg(e, mode=ImageReadMode.RGB) for e in encoded]


def decode_batch(data: Sequence[bytes], device: torch.device | str, *, use_torchvision: bool = True) -> DecodedBatch:
    """Decode a batch of encoded images onto `device`; never raises for a bad image.

    JPEGs that `JpegHeader.device_decodable` accepts go to torchvision in one call (nvJPEG's batched decoder
    on CUDA); if that call fails, each of them is tried alone, and whatever torchvision still rejects, or
    returns with an unexpected shape, is decoded by PIL. Every other image is decoded by PIL.
    `use_torchvision=False` decodes everything with PIL (the reference, for comparisons)."""
    device = torch.device(device)
    count = len(data)
    images: list[torch.Tensor | None] = [None] * count
    failures: list[str | None] = [None] * count
    backends: list[str | None] = [None] * count
    fast: list[tuple[int, JpegHeader]] = []
    if use_torchvision and decode_jpeg is not None:
        for i, item in enumerate(data):
            header = parse_jpeg_header(item) if item else None
            if header is not None and header.device_decodable:
                fast.append((i, header))
    if fast:
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i, _ in fast]
        try:
            decoded: list[torch.Tensor | None] = list(_torchvision_decode(encoded, device))
        except Exception as err:  # noqa: BLE001 - one image nvJPEG rejects fails its whole batch: retry alone
            if _is_oom(err):
                raise
            decoded = []
            for e in encoded:
                try:
                    decoded.append(_torchvision_decode([e], device)[0])
                except Exception as one:  # noqa: BLE001 - PIL decides below
                    if _is_oom(one):
                        raise
                    decoded.append(None)
        for (i, header), image in zip(fast, decoded):
            if image is not None and image.dim() == 3 and image.shape[1:] == (header.height, header.width):
                if image.shape[0] == 1:
                    image = image.expand(3, -1, -1).contiguous()
                if image.shape[0] == 3:
                    images[i], backends[i] = image, "torchvision"
    for i, item in enumerate(data):
        if images[i] is not None:
            continue
        try:
            images[i], backends[i] = _pil_decode(item, device), "pil"
        except DecodeError as err:
            failures[i] = str(err)
    return DecodedBatch(images=images, failures=failures, backends=backends)


# ------------------------------------------------------------------------------------------- transforms


def _pass(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One antialiased resize pass of a float (N, 3, H, W) batch, clipped and rounded half up as PIL does."""
    in_h, in_w = x.shape[-2:]
    scale = max(in_h / size[0], in_w / size[1])
    if x.device.type == "cuda" and scale > MAX_CUDA_SCALE:
        y = F.interpolate(x.cpu(), size=size, mode=mode, antialias=True, align_corners=False).to(x.device)
    else:
        y = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return y.add_(0.5).clamp_(0.0, 255.0).floor_()


def _horizontal(x: torch.Tensor, width: int, mode: str, left: int = 0, right: int = 0) -> torch.Tensor:
    """PIL's first pass: each row (white-padded by `left`/`right` columns) resized to `width`, float32 out.

    `x` is uint8 or float (N, 3, H, W); rows go in chunks of about GROUP_PIXELS input pixels, so neither a
    float copy of a huge image nor faces-aug's padded square is ever whole in memory."""
    count, _, height, in_w = x.shape
    padded_w = in_w + left + right
    step = max(1, GROUP_PIXELS // max(count * padded_w, 1))
    parts = []
    for top in range(0, height, step):
        rows = x[:, :, top: top + step].to(torch.float32)
        if left or right:
            rows = F.pad(rows, (left, right, 0, 0), value=255.0)
        parts.append(_pass(rows, (rows.shape[-2], width), mode) if padded_w != width else rows)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _vertical(x: torch.Tensor, height: int, mode: str) -> torch.Tensor:
    """PIL's second pass: columns of a float (N, 3, H, W) batch resized to `height`."""
    return _pass(x, (height, x.shape[-1]), mode) if x.shape[-2] != height else x


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's PIL `resize(img, size)`: the short side to `size`, the long one int(size * long / short)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _clip(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Resize the short side to `size` (bicubic), then the centre `size` x `size` crop."""
    height, width = short_side_size(x.shape[-2], x.shape[-1], size)
    y = _vertical(_horizontal(x, width, "bicubic"), height, "bicubic")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return y[..., top: top + size, left: left + size]


def _dedup(x: torch.Tensor, size: int = 512) -> torch.Tensor:
    """Stretch to `size` x `size` (bilinear)."""
    return _vertical(_horizontal(x, size, "bilinear"), size, "bilinear")


def _faces(x: torch.Tensor, size: int = 224) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad to a centred white square, bicubic to `size` x `size`, in PIL's order, without the whole square:
    a wide image's white rows are added after the horizontal pass (they stay white through it), a tall
    image's white columns are added to each chunk of rows of the horizontal pass."""
    in_h, in_w = x.shape[-2:]
    left, top, right, bottom = square_padding(in_w, in_h)
    y = _horizontal(x, size, "bicubic", left, right)
    if top or bottom:
        y = F.pad(y, (0, 0, top, bottom), value=255.0)
    return _vertical(y, size, "bicubic"), (left, top, right, bottom)


_OUTPUT_SIZES = {"clip-aug": 224, "dedup-aug": 512, "faces-aug": 224}


def _groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of same-size images, in chunks of at most GROUP_PIXELS pixels (one image at least)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    chunks: list[list[int]] = []
    for (h, w), indices in by_size.items():
        step = max(1, GROUP_PIXELS // max(h * w, 1))
        chunks.extend(indices[k: k + step] for k in range(0, len(indices), step))
    return chunks


def _axes(name: str, height: int, width: int) -> tuple[batched_resize.Axis, batched_resize.Axis, tuple[int, ...]]:
    """(rows, cols, faces-aug's padding) of one image for `batched_resize`: the same sizes, crops and pads as
    `_clip`, `_dedup` and `_faces`."""
    Axis = batched_resize.Axis
    if name == "clip-aug":
        size = _OUTPUT_SIZES[name]
        full_h, full_w = short_side_size(height, width, size)
        top, left = int(round((full_h - size) / 2.0)), int(round((full_w - size) / 2.0))
        return Axis(height, 0, height, full_h, top), Axis(width, 0, width, full_w, left), ()
    if name == "dedup-aug":
        size = _OUTPUT_SIZES[name]
        return Axis(height, 0, height, size, 0), Axis(width, 0, width, size, 0), ()
    left, top, right, bottom = square_padding(width, height)
    side, size = max(width, height), _OUTPUT_SIZES[name]
    return Axis(side, top, height, size, 0), Axis(side, left, width, size, 0), (left, top, right, bottom)


def _prepare_chunk(images: Sequence[torch.Tensor], group: list[int], names: Sequence[str],
                   pixels: dict[str, torch.Tensor], padding: torch.Tensor | None) -> None:
    """Every transform of `names` for a chunk of differently sized images at once (`batched_resize`),
    written to rows `group` of `pixels` (and of faces-aug's `padding`)."""
    canvas = batched_resize.canvas_of(images)
    index = torch.tensor(group, device=canvas.device)
    for name in names:
        axes = [_axes(name, *image.shape[-2:]) for image in images]
        mode = "bilinear" if name == "dedup-aug" else "bicubic"
        out = batched_resize.resize(canvas, [a[0] for a in axes], [a[1] for a in axes], _OUTPUT_SIZES[name], mode)
        pixels[name].index_copy_(0, index, out.to(torch.uint8))
        if name == "faces-aug" and padding is not None:
            sides = torch.tensor([[float(max(image.shape[-2:]))] for image in images])
            padding[group] = torch.tensor([a[2] for a in axes], dtype=torch.float32) / sides


def prepare_tensors(images: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The device equivalent of `[t.prepare(image) for image in images]`, stacked: name -> (uint8 (B,3,S,S), aux).

    `images` are uint8 (3, H, W) tensors on one device; the outputs are on that device. aux is faces-aug's
    padding [left, top, right, bottom] / side as float32 (B, 4), None for the others."""
    unknown = [n for n in names if n not in FAST_TRANSFORMS]
    if unknown:
        raise ValueError(f"no device implementation of image transform(s) {unknown}; known: {sorted(FAST_TRANSFORMS)}")
    if not images:
        raise ValueError("prepare_tensors needs at least one image")
    device = images[0].device
    count = len(images)
    pixels = {n: torch.empty((count, 3, _OUTPUT_SIZES[n], _OUTPUT_SIZES[n]), dtype=torch.uint8, device=device)
              for n in names}
    padding = torch.empty((count, 4), dtype=torch.float32) if "faces-aug" in names else None
    batched = [i for i, image in enumerate(images) if max(image.shape[-2:]) <= batched_resize.MAX_SIDE] \
        if batched_resize.applies(device) else []
    with torch.no_grad():
        for chunk in batched_resize.chunks([tuple(images[i].shape[-2:]) for i in batched]):
            group = [batched[k] for k in chunk]
            _prepare_chunk([images[i] for i in group], group, names, pixels, padding)
        taken = set(batched)
        rest = [i for i in range(count) if i not in taken]  # large images, or TF32 products: per size
        for sub in _groups([images[i] for i in rest]):
            group = [rest[k] for k in sub]
            x = images[group[0]][None] if len(group) == 1 else torch.stack([images[i] for i in group])
            if x.numel() <= 3 * GROUP_PIXELS:  # else one huge image: _horizontal converts it in chunks of rows
                x = x.to(torch.float32)
            for name in names:
                if name == "clip-aug":
                    out = _clip(x)
                elif name == "dedup-aug":
                    out = _dedup(x)
                else:
                    out, pad = _faces(x)
                    padding[group] = torch.tensor(pad, dtype=torch.float32) / float(max(x.shape[-2:]))
                if len(group) == 1:
                    pixels[name][group[0]].copy_(out[0])  # float -> uint8: the values are integers in [0, 255]
                else:
                    pixels[name].index_copy_(0, torch.tensor(group, device=device), out.to(torch.uint8))
    aux = padding.to(device) if padding is not None else None
    return {n: (pixels[n], aux if n == "faces-aug" else None) for n in names}


def tensor_transforms(images: Sequence[torch.Tensor], names: Sequence[str], dtype: torch.dtype) -> dict[str, Any]:
    """name -> the model input that `IMAGE_TRANSFORMS[name].finish` gives (the same normalisation code):
    clip-aug (B,3,224,224) in `dtype`; dedup-aug (B,3,512,512) in `dtype`, channels_last; faces-aug a tuple
    of float32 (B,3,224,224) pixels and the float32 (B,4) padding."""
    prepared = prepare_tensors(images, names)
    with torch.no_grad():
        return {n: IMAGE_TRANSFORMS[n].finish(pixels, aux, dtype) for n, (pixels, aux) in prepared.items()}


# ---------------------------------------------------------------------------------------- whole batches


@dataclass
class DevicePreprocessed:
    """One batch through decode and transforms: uint8 pixels (rows = `kept`) and the failures."""

    kept: list[int]  # indices into the input, in order, of the samples that have rows
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> uint8 (len(kept), 3, S, S)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> side data (len(kept), ...)
    failures: dict[int, str] = field(default_factory=dict)  # input index -> reason
    decoded_by: dict[str, int] = field(default_factory=dict)  # backend -> images

    def finish(self, dtype: torch.dtype) -> dict[str, Any]:
        """The model inputs (see `tensor_transforms`)."""
        with torch.no_grad():
            return {n: IMAGE_TRANSFORMS[n].finish(p, self.aux.get(n), dtype) for n, p in self.pixels.items()}


@dataclass(frozen=True)
class _Size:
    """What `transforms.check_aspect` reads of a PIL image: its (width, height)."""

    size: tuple[int, int]


def aspect_failure(height: int, width: int) -> str | None:
    """The failure reason the loader records for an image that clip-aug's `check_aspect` refuses, or None."""
    try:
        check_aspect(_Size((width, height)), IMAGE_TRANSFORMS["clip-aug"].size)  # type: ignore[arg-type]
    except ValueError as err:
        return f"preprocessing failed: {type(err).__name__}: {err}"
    return None


def pixels_batch(pixels: Sequence[memoryview | bytes | None], shapes: Sequence[tuple[int, int] | None],
                 errors: Sequence[str | None], device: torch.device | str) -> DecodedBatch:
    """Images decoded elsewhere (the reader processes, with PIL: `gpu_decode: readers`), RGB pixels of
    height x width x 3 bytes, as a DecodedBatch on `device`: packed into one buffer (pinned, on CUDA) and
    copied up at once; each image a (3, H, W) view of the device's copy. A row with an error keeps it."""
    device = torch.device(device)
    rows = [i for i, (data, shape) in enumerate(zip(pixels, shapes)) if data is not None and shape is not None]
    images: list[torch.Tensor | None] = [None] * len(pixels)
    backends: list[str | None] = [None] * len(pixels)
    failures = list(errors)
    for i in set(range(len(pixels))) - set(rows):
        failures[i] = failures[i] or "cannot decode image: the reader sent no pixels"
    if rows:
        # bytes (an image that travelled inline) are read-only, which torch.frombuffer warns about: copied
        parts = [torch.frombuffer(p if isinstance(p, memoryview) else bytearray(p), dtype=torch.uint8)
                 for p in (pixels[i] for i in rows)]
        sizes = [len(part) for part in parts]
        packed = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=device.type == "cuda")
        torch.cat(parts, out=packed)
        flat = packed.to(device, non_blocking=True)  # torch's pinned-memory cache keeps `packed` until the copy ends
        for i, part in zip(rows, flat.split(sizes)):
            height, width = shapes[i]  # type: ignore[misc]
            images[i], backends[i] = part.view(height, width, 3).permute(2, 0, 1), "pil"
    return DecodedBatch(images=images, failures=failures, backends=backends)


def preprocess_batch(data: Sequence[bytes], names: Sequence[str], device: torch.device | str, *,
                     use_torchvision: bool = True) -> DevicePreprocessed:
    """Decode `data` onto `device` and run the named transforms: the device counterpart of the loader's
    per-image `decode_image` + `prepare`, with the same failure reasons (decode errors, clip-aug's aspect
    limit). Out-of-memory errors propagate (the engine splits the batch); any other error of one image's
    transforms becomes that image's failure."""
    return preprocess_decoded(decode_batch(data, device, use_torchvision=use_torchvision), names)


def preprocess_decoded(decoded: DecodedBatch, names: Sequence[str]) -> DevicePreprocessed:
    """The named transforms of a decoded batch (see preprocess_batch), its failures kept."""
    result = DevicePreprocessed(kept=[], failures={i: r for i, r in enumerate(decoded.failures) if r is not None},
                                decoded_by=decoded.by_backend())
    candidates = []
    for i in decoded.ok:
        height, width = decoded.images[i].shape[-2:]
        reason = aspect_failure(height, width) if "clip-aug" in names else None
        if reason is None:
            candidates.append(i)
        else:
            result.failures[i] = reason
    if not candidates or not names:
        result.kept = candidates
        return result
    try:
        prepared = prepare_tensors([decoded.images[i] for i in candidates], names)
    except Exception as err:  # noqa: BLE001 - find the one image that fails, unless the device is out of memory
        if _is_oom(err):
            raise
        singles: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for i in candidates:
            try:
                singles[i] = prepare_tensors([decoded.images[i]], names)
            except Exception as one:  # noqa: BLE001
                if _is_oom(one):
                    raise
                result.failures[i] = f"preprocessing failed: {type(one).__name__}: {one}"
        candidates = list(singles)
        if not candidates:
            return result
        prepared = {n: (torch.cat([singles[i][n][0] for i in candidates]),
                        torch.cat([singles[i][n][1] for i in candidates]) if singles[candidates[0]][n][1] is not None
                        else None) for n in names}
    result.kept = candidates
    result.pixels = {n: p for n, (p, _) in prepared.items()}
    result.aux = {n: a for n, (_, a) in prepared.items() if a is not None}
    return result


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


# ------------------------------------------------------------------------------------------- measuring


def reference_pixels(data: Sequence[bytes], names: Sequence[str]) -> dict[str, list[torch.Tensor | None]]:
    """The loader's PIL path per image (decode_image + prepare), uint8 (3,S,S) or None where it fails."""
    out: dict[str, list[torch.Tensor | None]] = {n: [] for n in names}
    for item in data:
        try:
            image = decode_image(item)
            prepared = {n: IMAGE_TRANSFORMS[n].prepare(image)[0] for n in names}
        except Exception:  # noqa: BLE001 - a failure of the reference is compared as a failure
            prepared = {n: None for n in names}
        for n in names:
            out[n].append(prepared[n])
    return out


def fidelity(data: Sequence[bytes], names: Sequence[str], device: torch.device | str) -> dict[str, dict[str, float]]:
    """Per transform, |fastpath - PIL path| over `data` in uint8 levels (max, mean, share of values off by
    more than 1) and in normalised model-input units (max; 1 level = 1/(255*std))."""
    reference = reference_pixels(data, names)
    fast = preprocess_batch(data, names, device)
    stats: dict[str, dict[str, float]] = {}
    std = {"clip-aug": min(CLIP_STD), "dedup-aug": min(HALF), "faces-aug": min(HALF)}  # the largest unit
    for n in names:
        diffs = [(fast.pixels[n][row].cpu().int() - reference[n][i].int()).abs()
                 for row, i in enumerate(fast.kept) if reference[n][i] is not None]
        if not diffs:
            continue
        flat = torch.cat([d.flatten() for d in diffs]).float()
        stats[n] = {"images": len(diffs), "max_levels": flat.max().item(), "mean_levels": round(flat.mean().item(), 5),
                    "share_over_1": round((flat > 1).float().mean().item(), 7),
                    "max_normalised": round(flat.max().item() / (255.0 * std[n]), 5)}
    return stats


def decode_fidelity(data: Sequence[bytes], device: torch.device | str) -> dict[str, float]:
    """|torchvision decode (nvJPEG on CUDA) - PIL decode| in uint8 levels over the images torchvision took."""
    decoded = decode_batch(data, device)
    diffs = []
    for i, image in enumerate(decoded.images):
        if decoded.backends[i] == "torchvision":
            diffs.append((image.cpu().int() - pil_to_uint8(decode_image(data[i])).int()).abs().flatten())
    if not diffs:
        return {"torchvision_images": 0, "pil_fallbacks": decoded.count("pil")}
    flat = torch.cat(diffs).float()
    return {"torchvision_images": len(diffs), "max_levels": flat.max().item(), "mean_levels": round(flat.mean().item(), 5),
            "share_over_1": round((flat > 1).float().mean().item(), 7), "pil_fallbacks": decoded.count("pil")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(data: Sequence[bytes], names: Sequence[str], device: torch.device | str, dtype: torch.dtype,
               batch_size: int = 64, repeats: int = 3) -> dict[str, float]:
    """Images/s of decode + transforms + finish over `data` in batches of `batch_size`: the PIL path (one
    thread, as one loader worker) and the fast path on `device`. The two alternate, `repeats` passes each;
    the best pass counts (wall clock), and CPU seconds per image (all threads of the process) are reported."""
    device = torch.device(device)
    batches = [list(data[k: k + batch_size]) for k in range(0, len(data), batch_size)]

    def pil_path(batch: list[bytes]) -> None:
        images = [decode_image(item) for item in batch]
        prepared = [{n: IMAGE_TRANSFORMS[n].prepare(image) for n in names} for image in images]
        for n in names:
            pixels = torch.stack([p[n][0] for p in prepared]).to(device)
            aux = torch.stack([p[n][1] for p in prepared]) if prepared[0][n][1] is not None else None
            IMAGE_TRANSFORMS[n].finish(pixels, aux, dtype)

    def fast_path(batch: list[bytes]) -> None:
        preprocess_batch(batch, names, device).finish(dtype)

    paths = {"pil": pil_path, "fast": fast_path}
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for run in paths.values():
        run(batches[0])  # warm-up (nvJPEG handle, kernels, allocator)
    for _ in range(repeats):
        for label, run in paths.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                run(batch)
            _sync(device)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    out: dict[str, float] = {}
    for label in paths:
        out[f"{label}_images_per_s"] = round(len(data) / min(wall[label]), 1)
        out[f"{label}_cpu_ms_per_image"] = round(1000 * min(cpu[label]) / len(data), 2)
    return out


def read_images(shards: str | Path, limit: int) -> list[bytes]:
    """Up to `limit` encoded images (jpg, jpeg, png, webp members) from the tars in folder `shards`, in
    name order: benchmark input."""
    import tarfile

    found: list[bytes] = []
    for tar_path in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp"):
                    found.append(tf.extractfile(member).read())
                    if len(found) >= limit:
                        return found
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Fidelity and throughput of the fast path on a device, as JSON lines (see bench/README.md)."""
    from d2m_core.compute.device import DTYPES, resolve_device

    parser = argparse.ArgumentParser(prog="python -m d2m_core.reading.fastpath", description=main.__doc__)
    parser.add_argument("--shards", required=True, help="folder of webdataset tars (d2m make-shards)")
    parser.add_argument("--device", default="cuda", help="'cpu', 0, 'cuda:1' (as the yml's device)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--images", type=int, default=1024, help="images to measure")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--transforms", default="clip-aug,dedup-aug,faces-aug")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    names = [n for n in args.transforms.split(",") if n]
    data = read_images(args.shards, args.images)
    if not data:
        parser.error(f"no images in {args.shards}/*.tar")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    common = {"device": name, "images": len(data), "transforms": names}
    print(json.dumps(common | {"kind": "fastpath_decode_fidelity"} | decode_fidelity(data[:256], device)), flush=True)
    print(json.dumps(common | {"kind": "fastpath_fidelity", "per_transform": fidelity(data[:256], names, device)}),
          flush=True)
    for subset in dict.fromkeys((("clip-aug",) if "clip-aug" in names else (), tuple(names))):
        if subset:
            print(json.dumps(common | {"kind": "fastpath_throughput", "transforms": list(subset), "batch_size": args.batch_size,
                                       "precision": args.precision}
                             | throughput(data, subset, device, DTYPES[args.precision], args.batch_size)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

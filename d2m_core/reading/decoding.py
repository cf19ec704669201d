"""Image decoding on the CPU with PIL, as the seed's webdataset 'pilrgb' decoder does (open, load, convert RGB).

Kept from the seed, on purpose, so the features match DataComp's:
- The format is sniffed from the bytes, not the member's extension (a PNG stored as KEY.jpg decodes).
- EXIF orientation is NOT applied ('pilrgb' never calls ImageOps.exif_transpose): an image is processed as
  stored, so a portrait photo tagged "rotate 90" is seen sideways, as DataComp's metadata saw it.
- Modes convert as PIL's `convert("RGB")` does: palette (transparency dropped), alpha dropped (no
  compositing on white), CMYK naively, 16-bit grayscale clipped to 8 bits (values above 255 turn white).
- A truncated JPEG/PNG decodes with a grey tail (ImageFile.LOAD_TRUNCATED_IMAGES, as the seed set it).
- Animated images (GIF, WebP, APNG) give their first frame.

d2m's own limits, to keep memory bounded on hostile input:
- An image declaring more than MAX_IMAGE_PIXELS pixels is refused before any pixel is allocated (a
  decompression bomb: a few KB declaring 40,000 x 40,000). The limit is where PIL at its defaults (as the
  seed ran it) raises DecompressionBombError, so the seed processed the same images; PIL's own global
  Image.MAX_IMAGE_PIXELS is left alone (it still warns above half the limit, as it did for the seed), and
  the check here holds even if something else raises or disables it.
- A JPEG over DRAFT_ABOVE_PIXELS is decoded with libjpeg's DCT scaling (PIL's draft mode) to the largest
  1/2, 1/4 or 1/8 size that keeps both sides >= DRAFT_MIN_SIDE (twice the largest model input, 512): a
  9,000 x 7,000 JPEG decodes to 2,250 x 1,750 (12 MB instead of 189 MB, 0.12 s instead of 0.4 s).
  Measured on such an image, the clip-aug / dedup-aug / faces-aug uint8 pixels differ from a full decode by
  at most 4/255 (mean <= 0.32/255, 99th percentile 1/255); tests/core/test_faults.py pins it. Every image
  up to 32 Mpx (any usual photo) is decoded fully, exactly as the seed did.
- EPS is never opened (PIL would run Ghostscript on it).
"""

from __future__ import annotations

import io

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the seed: a truncated JPEG decodes with a grey tail
MAX_IMAGE_PIXELS = 2 * 89_478_485  # where PIL, left at its defaults as the seed left it, raises DecompressionBombError
DRAFT_ABOVE_PIXELS = 32 * 2**20
DRAFT_MIN_SIDE = 1024
REFUSED_FORMATS = frozenset({"EPS"})


class DecodeError(ValueError):
    """The bytes are not a decodable image (the message is the failure reason recorded for the sample)."""


_formats: tuple[str, ...] | None = None


def _allowed_formats() -> tuple[str, ...]:
    global _formats
    if _formats is None:
        Image.init()
        _formats = tuple(f for f in Image.OPEN if f not in REFUSED_FORMATS)
    return _formats


def decode_image(data: bytes, *, draft_above: int | None = DRAFT_ABOVE_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; raises DecodeError (never anything else) when it cannot.

    `draft_above=None` always decodes at full size (see the module docstring for what draft mode changes).
    """
    if not data:
        raise DecodeError("cannot decode image: empty image member (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=_allowed_formats()) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DecodeError(f"decompression bomb: the image declares {width}x{height} = {width * height} pixels, "
                                  f"over the {MAX_IMAGE_PIXELS}-pixel limit")
            if width <= 0 or height <= 0:
                raise DecodeError(f"cannot decode image: it declares an empty size {width}x{height}")
            if draft_above is not None and width * height > draft_above:
                img.draft("RGB", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))  # JPEG only; a no-op for other formats
            img.load()
            return img.convert("RGB")
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise DecodeError(f"cannot decode image: not a recognised image format (starts with {bytes(data[:16])!r})") from err
    except Exception as err:  # noqa: BLE001 - any failure of a decoder on untrusted bytes is a decode failure
        raise DecodeError(f"cannot decode image: {type(err).__name__}: {str(err)[:200]}") from err

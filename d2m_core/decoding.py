"""Image decoding on the CPU with PIL, as the seed's webdataset 'pilrgb' decoder does."""

from __future__ import annotations

import io

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the seed: a truncated JPEG decodes with a grey tail
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # larger is treated as a decompression bomb


class DecodeError(ValueError):
    """The bytes are not a decodable image."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (palette/alpha/grayscale/CMYK converted as PIL does)."""
    if not data:
        raise DecodeError("empty image member")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {err}") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DecodeError(f"cannot decode image: {err}") from err

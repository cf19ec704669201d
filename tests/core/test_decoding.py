import io

import pytest
from PIL import Image

from d2m_core.decoding import DecodeError, decode_image


def _encode(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (31, 17), color=(200 if mode == "L" else (10, 20, 30, 128)[: len(mode)])).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP")])
def test_decodes_to_rgb(mode: str, fmt: str) -> None:
    image = decode_image(_encode(mode, fmt))
    assert image.mode == "RGB" and image.size == (31, 17)


@pytest.mark.parametrize("data", [b"", b"\x00" * 100, b"<html>hello</html>", b"\xff\xd8\xff" + b"\x13" * 50])
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_image(data)

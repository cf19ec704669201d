import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from d2m_core.reading.decoding import DecodeError, decode_image


def _encode(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    color = {"L": 200, "1": 1, "I;16": 40_000, "LA": (200, 100)}.get(mode, (10, 20, 30, 128)[: len(mode)])
    Image.new(mode, (31, 17), color=color).save(buf, fmt)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("RGB", "GIF")])
def test_decodes_to_rgb_as_pil_convert_does(mode: str, fmt: str) -> None:
    data = _encode(mode, fmt)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (31, 17)
    with Image.open(io.BytesIO(data)) as reference:  # webdataset's 'pilrgb'
        assert np.array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


@pytest.mark.parametrize("data", [b"", b"\x00" * 100, b"<html>hello</html>", b"\xff\xd8\xff" + b"\x13" * 50,
                                  b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(data)


def test_unknown_format_reason_shows_the_first_bytes() -> None:
    with pytest.raises(DecodeError, match=r"starts with b'<html>"):
        decode_image(b"<html><body>404</body></html>")


@pytest.mark.parametrize("side", [40_000, 15_000])
def test_decompression_bomb_is_refused_from_the_header(side: int) -> None:
    data = _png_declaring(side, side)
    assert len(data) < 1000
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data)


def test_the_pixel_limit_holds_even_with_pil_checks_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(DecodeError, match=r"declares 15000x15000 = 225000000 pixels"):
        decode_image(_png_declaring(15_000, 15_000))


def test_exif_orientation_is_not_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (1, 2, 3)).save(buf, "JPEG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert ImageOps.exif_transpose(img).size == (20, 40)
    assert decode_image(buf.getvalue()).size == (40, 20)


def test_draft_mode_only_above_the_threshold() -> None:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((2400, 2200)).convert("RGB").save(buf, "JPEG")
    data = buf.getvalue()
    assert decode_image(data).size == (2400, 2200)  # 5.3 Mpx: below DRAFT_ABOVE_PIXELS, decoded fully
    assert decode_image(data, draft_above=1_000_000).size == (1200, 1100)  # both sides stay >= DRAFT_MIN_SIDE
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((2400, 2200)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), draft_above=1_000_000).size == (2400, 2200)  # not a JPEG: no draft


def test_eps_is_never_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with Image.open(io.BytesIO(eps)) as img:  # PIL itself would open it (and run Ghostscript to load it)
        assert img.format == "EPS"
    with pytest.raises(DecodeError, match="not a recognised image format"):
        decode_image(eps)


def test_any_decoder_exception_is_a_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise KeyError("a plugin bug")

    monkeypatch.setattr(Image, "open", broken)
    with pytest.raises(DecodeError, match="KeyError"):
        decode_image(b"\xff\xd8\xff\xe0 whatever")


def test_truncated_jpeg_decodes_with_a_grey_tail() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    image = decode_image(data[: len(data) // 2])
    assert image.size == (128, 96)
    assert np.asarray(image)[-1].std() < 1  # the missing rows are flat grey, as the seed's LOAD_TRUNCATED_IMAGES

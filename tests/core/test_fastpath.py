"""The device preprocessing path (d2m_core.reading.fastpath) against the loader's PIL path, on the CPU.

Tolerances asserted (uint8 levels of the prepared pixels, before normalisation; 1 level is 1/255/std in
model-input units: 0.0150 for clip-aug's smallest std, 0.0078 for mean/std 0.5):
- max |fast - PIL| <= 2 levels per transform (measured on make_shards images: 2, 2 and 1 for clip-aug,
  dedup-aug and faces-aug), i.e. <= 0.030 (clip) / 0.016 (dedup, faces) in normalised units;
- mean |fast - PIL| <= 0.02 levels (measured 0.002, 0.010, 0.0001) and under 1e-4 of the values off by
  more than one level;
- faces-aug's padding side data: equal; CPU JPEG decoding: bit-identical to PIL's (both libjpeg-turbo).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2m_core.reading import batched_resize, fastpath
from d2m_core.reading.decoding import decode_image
from d2m_core.reading.transforms import CLIP_STD, IMAGE_TRANSFORMS, pil_to_uint8
from d2m_core.testdata.synth import make_shards

NAMES = ["clip-aug", "dedup-aug", "faces-aug"]
MAX_LEVELS = 2
MEAN_LEVELS = 0.02
SHARE_OVER_ONE = 1e-4


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs with sharp stripes (where bicubic overshoots and clipping matters)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).copy()
    pixels[::7] = 255 - pixels[::7]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def shard_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """48 make_shards samples up to 512 px: JPEGs (some grayscale), PNGs (some with alpha), many sizes."""
    root = tmp_path_factory.mktemp("fastpath")
    make_shards(root, shards=1, samples=48, max_side=512, seed=7)
    with tarfile.open(Path(root) / "00000.tar") as tf:
        found = [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))]
    assert len(found) == 48
    return found


@pytest.fixture(scope="module")
def edge_images() -> list[bytes]:
    sizes = [(1, 1), (2, 2), (3, 200), (200, 3), (224, 224), (224, 100), (100, 224), (512, 512), (60, 1500),
             (1500, 60), (225, 224), (513, 17), (800, 600)]
    return [_encode(_picture(w, h, seed=i), "PNG") for i, (w, h) in enumerate(sizes)]


def _compare(fast: fastpath.DevicePreprocessed, data: list[bytes]) -> dict[str, torch.Tensor]:
    reference = fastpath.reference_pixels(data, NAMES)
    assert fast.kept == [i for i in range(len(data)) if reference[NAMES[0]][i] is not None]
    return {n: torch.cat([(fast.pixels[n][row].cpu().int() - reference[n][i].int()).abs().flatten()
                          for row, i in enumerate(fast.kept)]).float() for n in NAMES}


@pytest.fixture(params=["per-size", "batched"])
def resize_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both resize paths of fastpath on the CPU: per image size (the CPU's), and batched_resize (CUDA's)."""
    monkeypatch.setattr(batched_resize, "ON_CPU", request.param == "batched")
    return request.param


@pytest.mark.parametrize("which", ["shard_images", "edge_images"])
def test_fidelity_against_the_pil_path(which: str, resize_path: str, request: pytest.FixtureRequest) -> None:
    data = request.getfixturevalue(which)
    fast = fastpath.preprocess_batch(data, NAMES, "cpu")
    assert not fast.failures
    for name, diff in _compare(fast, data).items():
        assert diff.max() <= MAX_LEVELS, (name, diff.max())
        assert diff.mean() <= MEAN_LEVELS, (name, diff.mean())
        assert (diff > 1).float().mean() <= SHARE_OVER_ONE, name


def test_batched_resize_matches_the_per_size_path(shard_images: list[bytes], edge_images: list[bytes],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched products and the per-size kernels sum the same taps in another order: at most a rare
    1-2 level flip at a .5 boundary; the large edge images (over MAX_SIDE) take the per-size path in both."""
    images = [i for i in fastpath.decode_batch(shard_images[:20] + edge_images, "cpu").images
              if fastpath.aspect_failure(*i.shape[-2:]) is None]
    per_size = fastpath.prepare_tensors(images, NAMES)
    monkeypatch.setattr(batched_resize, "ON_CPU", True)
    batched = fastpath.prepare_tensors(images, NAMES)
    monkeypatch.setattr(batched_resize, "CHUNK_PIXELS", 300 * 300)  # many chunks, of one image or a few
    chunked = fastpath.prepare_tensors(images, NAMES)
    assert len(batched_resize.chunks([tuple(i.shape[-2:]) for i in images])) > 8
    for name in NAMES:
        for other in (batched, chunked):
            diff = (other[name][0].int() - per_size[name][0].int()).abs()
            assert diff.max() <= MAX_LEVELS and (diff > 0).float().mean() < 1e-3, (name, diff.max())
    assert torch.equal(batched["faces-aug"][1], per_size["faces-aug"][1])
    assert torch.equal(chunked["faces-aug"][1], per_size["faces-aug"][1])


def test_batched_resize_weights_are_pil_taps() -> None:
    """Rows of a downscale sum to 1 over the image; a same-size pass is the identity; white padding's share
    goes to the padding column, not the matrix."""
    axes = [batched_resize.Axis(10, 0, 10, 4, 0), batched_resize.Axis(4, 0, 4, 4, 0), batched_resize.Axis(6, 2, 2, 3, 0)]
    matrix, padding = batched_resize.weights(axes, 3, 10, "bicubic", torch.device("cpu"))
    assert matrix.shape == (3, 3, 10) and padding.shape == (3, 3)
    torch.testing.assert_close(matrix[0].sum(-1), torch.ones(3))
    assert torch.equal(matrix[1][:, :4], torch.eye(4)[:3]) and not padding[1].any()
    assert not matrix[2][:, 2:].any()  # only 2 real pixels
    torch.testing.assert_close(matrix[2].sum(-1) + padding[2], torch.ones(3))
    assert padding[2][0] > 0.5 and padding[2][2] > 0.5 and padding[2][1] < 0.5  # real pixels 2-3 of 0-5: the outer outputs see mostly white


def test_model_inputs_match_finish_of_the_pil_path(shard_images: list[bytes]) -> None:
    data = shard_images[:16]
    images = fastpath.decode_batch(data, "cpu").images
    ours = fastpath.tensor_transforms(images, NAMES, torch.float32)
    reference = fastpath.reference_pixels(data, NAMES)
    unit = {"clip-aug": 1 / (255 * min(CLIP_STD)), "dedup-aug": 1 / 127.5, "faces-aug": 1 / 127.5}
    for name in NAMES:
        aux = None
        if name == "faces-aug":
            aux = torch.stack([IMAGE_TRANSFORMS[name].prepare(decode_image(d))[1] for d in data])
        expected = IMAGE_TRANSFORMS[name].finish(torch.stack(reference[name]), aux, torch.float32)
        got, want = (ours[name][0], expected[0]) if name == "faces-aug" else (ours[name], expected)
        assert (got - want).abs().max() <= MAX_LEVELS * unit[name] + 1e-5, name
        if name == "faces-aug":
            assert torch.equal(ours[name][1], expected[1])  # the padding side data


def test_shapes_dtypes_and_layout(shard_images: list[bytes]) -> None:
    images = fastpath.decode_batch(shard_images[:5], "cpu").images
    out = fastpath.tensor_transforms(images, NAMES, torch.bfloat16)
    assert out["clip-aug"].shape == (5, 3, 224, 224) and out["clip-aug"].dtype == torch.bfloat16
    assert out["dedup-aug"].shape == (5, 3, 512, 512) and out["dedup-aug"].dtype == torch.bfloat16
    assert out["dedup-aug"].is_contiguous(memory_format=torch.channels_last)
    pixels, padding = out["faces-aug"]
    assert pixels.shape == (5, 3, 224, 224) and pixels.dtype == torch.float32  # as FacesImageTransform.finish
    assert padding.shape == (5, 4) and padding.dtype == torch.float32
    prepared = fastpath.prepare_tensors(images, ["clip-aug"])
    assert prepared["clip-aug"][0].dtype == torch.uint8 and prepared["clip-aug"][1] is None


def test_faces_padding_equals_the_pil_path(edge_images: list[bytes]) -> None:
    fast = fastpath.preprocess_batch(edge_images, ["faces-aug"], "cpu")
    expected = torch.stack([IMAGE_TRANSFORMS["faces-aug"].prepare(decode_image(d))[1] for d in edge_images])
    assert torch.equal(fast.aux["faces-aug"], expected)
    assert expected[2].tolist()[::2] == [0.49000000953674316, 0.4950000047683716]  # 3x200: left 98, right 99


def test_mixed_formats_fall_back_to_pil_in_order() -> None:
    base = _picture(120, 90, seed=3)
    cases = {
        "jpeg": _encode(base, quality=90),
        "png": _encode(base, "PNG"),
        "webp": _encode(base, "WEBP"),
        "gray": _encode(base.convert("L"), quality=90),
        "corrupt": b"<html>not an image</html>",
        "cmyk": _encode(base.convert("CMYK"), quality=90),
        "progressive": _encode(base, quality=90, progressive=True),
        "truncated": _encode(base, quality=90)[:700],
        "empty": b"",
        "rgba_png": _encode(base.convert("RGBA"), "PNG"),
    }
    data = list(cases.values())
    decoded = fastpath.decode_batch(data, "cpu")
    backends = dict(zip(cases, decoded.backends))
    assert backends == {"jpeg": "torchvision", "png": "pil", "webp": "pil", "gray": "torchvision", "corrupt": None,
                        "cmyk": "pil", "progressive": "torchvision", "truncated": "pil", "empty": None,
                        "rgba_png": "pil"}
    failures = dict(zip(cases, decoded.failures))
    assert "cannot decode image" in failures["corrupt"] and "empty" in failures["empty"]
    for name, data_, image in zip(cases, data, decoded.images):
        if image is not None:  # same pixels as the seed's decode (PIL convert('RGB')), RGB even for grayscale
            assert image.shape == (3, 90, 120) and image.dtype == torch.uint8, name
            assert torch.equal(image, pil_to_uint8(decode_image(data_))), name
    fast = fastpath.preprocess_batch(data, NAMES, "cpu")
    assert sorted(fast.failures) == [4, 8] and fast.kept == [0, 1, 2, 3, 5, 6, 7, 9]
    assert fast.decoded_by == {"torchvision": 3, "pil": 5}
    reference = fastpath.reference_pixels(data, NAMES)
    for row, i in enumerate(fast.kept):  # rows stay aligned with the input
        assert (fast.pixels["clip-aug"][row].int() - reference["clip-aug"][i].int()).abs().max() <= MAX_LEVELS


def test_jpeg_header_routing() -> None:
    base = _picture(64, 48)
    header = fastpath.parse_jpeg_header(_encode(base, quality=80))
    assert header is not None and (header.width, header.height, header.components) == (64, 48, 3)
    assert header.device_decodable and header.sof == 0xC0
    assert fastpath.parse_jpeg_header(_encode(base, quality=80, progressive=True)).sof == 0xC2
    assert not fastpath.parse_jpeg_header(_encode(base.convert("CMYK"))).device_decodable
    cut = _encode(base)
    sos = cut.index(b"\xff\xda")
    assert not fastpath.parse_jpeg_header(cut[: sos + 40]).complete  # no EOI after the scan: truncated
    assert fastpath.parse_jpeg_header(cut[: sos - 10]) is None  # cut inside the header
    assert fastpath.parse_jpeg_header(_encode(base, "PNG")) is None
    assert fastpath.parse_jpeg_header(b"\xff\xd8\xff") is None


def test_a_batch_of_one_and_of_none(shard_images: list[bytes]) -> None:
    one = fastpath.preprocess_batch(shard_images[:1], NAMES, "cpu")
    assert one.kept == [0] and one.pixels["dedup-aug"].shape == (1, 3, 512, 512)
    assert one.finish(torch.float32)["faces-aug"][1].shape == (1, 4)
    none = fastpath.preprocess_batch([b"junk"], NAMES, "cpu")
    assert none.kept == [] and none.pixels == {} and list(none.failures) == [0]


def test_extreme_aspect_ratio_fails_as_in_the_loader() -> None:
    data = [_encode(Image.new("RGB", (1, 3000)), "PNG"), _encode(_picture(40, 40))]
    fast = fastpath.preprocess_batch(data, NAMES, "cpu")
    assert fast.kept == [1] and fast.failures[0].startswith("preprocessing failed: ValueError: aspect ratio")
    with pytest.raises(ValueError) as err:  # the loader's reason: f"preprocessing failed: {type}: {err}"
        IMAGE_TRANSFORMS["clip-aug"].prepare(decode_image(data[0]))
    assert fast.failures[0] == f"preprocessing failed: ValueError: {err.value}"
    assert fastpath.preprocess_batch(data, ["faces-aug"], "cpu").kept == [0, 1]  # only clip-aug refuses it


def test_row_chunks_give_the_same_pixels(edge_images: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    whole = fastpath.preprocess_batch(edge_images, NAMES, "cpu")
    monkeypatch.setattr(fastpath, "GROUP_PIXELS", 4096)  # every image converted and resized in row chunks
    chunked = fastpath.preprocess_batch(edge_images, NAMES, "cpu")
    for name in NAMES:
        assert torch.equal(whole.pixels[name], chunked.pixels[name]), name


def test_same_size_images_are_grouped_without_changing_results() -> None:
    data = [_encode(_picture(300, 200, seed=s)) for s in range(3)] + [_encode(_picture(200, 300))]
    images = fastpath.decode_batch(data, "cpu").images
    assert sorted(map(len, fastpath._groups(images))) == [1, 3]
    together = fastpath.prepare_tensors(images, NAMES)
    for i, image in enumerate(images):
        alone = fastpath.prepare_tensors([image], NAMES)
        for name in NAMES:
            assert torch.equal(together[name][0][i], alone[name][0][0]), (name, i)


def test_pil_only_decoding_gives_the_same_batch(shard_images: list[bytes]) -> None:
    data = shard_images[:12]
    fast = fastpath.preprocess_batch(data, NAMES, "cpu")
    pil = fastpath.preprocess_batch(data, NAMES, "cpu", use_torchvision=False)
    assert pil.decoded_by["torchvision"] == 0 and fast.decoded_by["torchvision"] > 0
    for name in NAMES:  # libjpeg-turbo in both on the CPU: bit-identical
        assert torch.equal(fast.pixels[name], pil.pixels[name]), name


def test_unknown_transforms_are_refused() -> None:
    assert fastpath.supports(NAMES) and not fastpath.supports(["clip-aug", "my-plugin-aug"])
    with pytest.raises(ValueError, match="my-plugin-aug"):
        fastpath.prepare_tensors([torch.zeros((3, 8, 8), dtype=torch.uint8)], ["my-plugin-aug"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_and_transforms_stay_within_tolerance(shard_images: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: single pixels can differ a lot at sharp
    colour edges, so only the mean is bounded, by torchvision's own bound for its CUDA decoder (< 2 levels)."""
    device = torch.device("cuda")
    decode = fastpath.decode_fidelity(shard_images, device)
    assert decode["torchvision_images"] > 0 and decode["mean_levels"] < 2.0, decode
    fast = fastpath.preprocess_batch(shard_images, NAMES, device)
    assert fast.pixels["clip-aug"].device.type == "cuda" and fast.decoded_by["torchvision"] > 0
    for name, diff in _compare(fast, shard_images).items():
        assert diff.mean() < 2.0, (name, diff.mean())
    assert batched_resize.applies(device)  # CUDA resizes in batches; the per-size kernels must agree with it
    images = [i for i in fastpath.decode_batch(shard_images, device).images if i is not None
              and fastpath.aspect_failure(*i.shape[-2:]) is None]
    batched = fastpath.prepare_tensors(images, NAMES)
    monkeypatch.setattr(batched_resize, "MAX_SIDE", 0)
    per_size = fastpath.prepare_tensors(images, NAMES)
    for name in NAMES:
        diff = (batched[name][0].int() - per_size[name][0].int()).abs()
        assert diff.max() <= MAX_LEVELS and (diff > 0).float().mean() < 1e-3, (name, diff.max())
    out = fast.finish(torch.bfloat16)
    assert out["clip-aug"].device.type == "cuda" and out["faces-aug"][1].device.type == "cuda"


def test_pixels_from_the_readers_become_device_images_and_keep_their_errors() -> None:
    """`gpu_decode: readers`: RGB bytes (from the ring, or inline bytes) -> (3, H, W) uint8; errors kept."""
    rgb = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    decoded = fastpath.pixels_batch([rgb.tobytes(), memoryview(bytearray(rgb[:, :4].tobytes())), None],
                                    [(2, 5), (2, 4), None], [None, None, "cannot decode image: broken"], "cpu")
    assert torch.equal(decoded.images[0], torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(decoded.images[1], torch.from_numpy(np.ascontiguousarray(rgb[:, :4])).permute(2, 0, 1))
    assert decoded.images[2] is None and decoded.failures == [None, None, "cannot decode image: broken"]
    assert decoded.ok == [0, 1]


def test_readers_pixels_are_gathered_into_the_same_canvas_and_model_inputs(shard_images: list[bytes],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Images that view one uploaded buffer (`pixels_batch`) are gathered into the batched resize's canvas in a
    few operations: the same canvas, value for value, and the same model inputs as images copied in one by one."""
    decoded = [decode_image(data) for data in shard_images[:24]]
    batch = fastpath.pixels_batch([image.tobytes() for image in decoded], [(i.height, i.width) for i in decoded],
                                  [None] * len(decoded), "cpu")
    views = [batch.images[i] for i in batch.ok]
    alone = [view.clone() for view in views]
    assert batched_resize._shared_buffer(views) is not None and batched_resize._shared_buffer(alone) is None
    assert len({tuple(v.shape) for v in views}) > 5  # differently sized, as DataComp's are
    assert torch.equal(batched_resize.canvas_of(views), batched_resize.canvas_of(alone))
    assert torch.equal(batched_resize.canvas_of(views[3:9]), batched_resize.canvas_of(alone[3:9]))  # offsets kept
    monkeypatch.setattr(batched_resize, "ON_CPU", True)
    gathered, copied = fastpath.prepare_tensors(views, NAMES), fastpath.prepare_tensors(alone, NAMES)
    for name in NAMES:
        assert torch.equal(gathered[name][0], copied[name][0]), name

import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from d2m_core.reading.decoding import decode_image
from d2m_core.reading.transforms import (CLIP_MEAN, CLIP_STD, ClipImageTransform, ClipTokenizer, DedupImageTransform,
                                 FacesImageTransform, IdentityText, square_padding)


@pytest.fixture(scope="module")
def images(shard_dir: Path) -> list[Image.Image]:
    with tarfile.open(shard_dir / "00001.tar") as tf:
        found = [decode_image(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))]
    assert len(found) == 9 and len({im.size for im in found}) > 3
    return found


def _run(transform, images: list[Image.Image]):
    prepared = [transform.prepare(im) for im in images]
    pixels = torch.stack([p for p, _ in prepared])
    assert pixels.dtype == torch.uint8
    aux = torch.stack([a for _, a in prepared]) if prepared[0][1] is not None else None
    return transform.finish(pixels, aux, torch.float32)


def test_clip_transform_matches_openai_pil_pipeline(images: list[Image.Image]) -> None:
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    ours = _run(ClipImageTransform(), images)
    expected = torch.stack([reference(im) for im in images])
    assert ours.shape == (9, 3, 224, 224)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_dedup_transform_matches_the_seed(images: list[Image.Image]) -> None:
    reference = T.Compose([T.Resize((512, 512)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ours = _run(DedupImageTransform(), images)
    assert ours.shape == (9, 3, 512, 512)
    assert torch.allclose(ours, torch.stack([reference(im) for im in images]), atol=1e-5)


def _seed_square_pad(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    w, h = image.size
    m = max(w, h)
    left, top = int((m - w) / 2), int((m - h) / 2)
    canvas = Image.new("RGB", (m, m), (255, 255, 255))
    canvas.paste(image, (left, top))
    x = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                   T.Normalize((0.5,) * 3, (0.5,) * 3)])(canvas)
    pad = torch.tensor([left, top, m - w - left, m - h - top], dtype=torch.float32) / m
    return x, pad


def test_faces_transform_matches_the_seed(images: list[Image.Image]) -> None:
    pixels, padding = _run(FacesImageTransform(), images)
    expected = [_seed_square_pad(im) for im in images]
    assert pixels.shape == (9, 3, 224, 224) and padding.shape == (9, 4)
    assert torch.allclose(pixels, torch.stack([e[0] for e in expected]), atol=1e-5)
    assert torch.allclose(padding, torch.stack([e[1] for e in expected]))
    assert square_padding(100, 40) == (0, 30, 0, 30) and square_padding(41, 100) == (29, 0, 30, 0)


def test_tokens_are_77_and_truncated_with_eot_last() -> None:
    tokens = ClipTokenizer()(["a photo of a cat", "word " * 200])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    eot = tokens[0].max().item()
    assert tokens[1, -1].item() == eot and (tokens[0] == eot).sum() == 1
    assert tokens[0, 0].item() == tokens[1, 0].item()  # start-of-text
    assert IdentityText()(["a", "b"]) == ["a", "b"]


def test_tokens_equal_open_clip_get_tokenizer() -> None:
    import open_clip

    captions = ["A Photo of a CAT &amp; a dog", "naïve café — ünïcödé", "", "word " * 200, "😀 emoji, numbers 1234"]
    expected = open_clip.get_tokenizer("ViT-B-32-quickgelu")(captions, context_length=77)
    assert torch.equal(ClipTokenizer()(captions), expected)


def test_extreme_aspect_ratios_are_refused_before_resizing() -> None:
    with pytest.raises(ValueError, match="aspect ratio of 1x3000 too extreme"):
        ClipImageTransform().prepare(Image.new("RGB", (1, 3000)))
    pixels, _ = ClipImageTransform().prepare(Image.new("RGB", (2, 400)))
    assert pixels.shape == (3, 224, 224)


def test_normalising_reuses_the_channel_values_and_keeps_the_values() -> None:
    """The mean and std tensors are made once a device (a tensor made from a list for CUDA is a copy that waits
    for the device), and normalising gives what ToTensor + Normalize give."""
    from d2m_core.reading.transforms import HALF, channel_values, normalize_uint8

    cpu = torch.device("cpu")
    assert channel_values(CLIP_MEAN, cpu) is channel_values(CLIP_MEAN, cpu)
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = (pixels.float() / 255.0 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(normalize_uint8(pixels, CLIP_MEAN, CLIP_STD, torch.float32), expected)
    with torch.inference_mode():  # made in inference mode first, used outside it after
        channel_values((0.25, 0.5, 0.75), cpu)
    assert torch.equal(normalize_uint8(pixels, (0.25, 0.5, 0.75), HALF, torch.float32),
                       (pixels.float() / 255.0 - torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)) / 0.5)

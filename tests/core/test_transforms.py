import io
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from d2m_core.decoding import decode_image
from d2m_core.transforms import CLIP_MEAN, CLIP_STD, ClipImageTransform, ClipTokenizer


def _images(shard_dir: Path) -> list[Image.Image]:
    with tarfile.open(shard_dir / "00001.tar") as tf:
        return [decode_image(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))]


def test_clip_transform_matches_openai_pil_pipeline(shard_dir: Path) -> None:
    reference = T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    transform = ClipImageTransform()
    images = _images(shard_dir)
    assert len(images) == 9 and len({im.size for im in images}) > 3
    batch = torch.stack([transform.prepare(im) for im in images])
    assert batch.dtype == torch.uint8 and batch.shape == (9, 3, 224, 224)
    ours = transform.finish(batch, torch.float32)
    expected = torch.stack([reference(im) for im in images])
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_tokens_are_77_and_truncated_with_eot_last() -> None:
    tokenizer = ClipTokenizer()
    tokens = tokenizer(["a photo of a cat", "word " * 200])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    eot = tokens[0].max().item()
    assert tokens[1, -1].item() == eot and (tokens[0] == eot).sum() == 1
    assert tokens[0, 0].item() == tokens[1, 0].item()  # start-of-text

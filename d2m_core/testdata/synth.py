"""Synthetic img2dataset-format webdataset shards built from photos bundled with scikit-image."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from webdataset import TarWriter

__all__ = ["make_shards"]

# Images shipped inside the scikit-image wheel (skimage/data/*); loading them never calls pooch.
COLOR_IMAGES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
GRAY_IMAGES: tuple[str, ...] = ("camera", "coins", "moon", "clock", "grass", "gravel", "brick", "page", "text")
RGBA_IMAGE: str = "logo"

# Fixed mtime for tar members so that the same seed gives byte-identical tars.
TAR_MTIME: float = 1_700_000_000.0

GRAY_FRACTION: float = 0.10
PNG_FRACTION: float = 0.10
SMALL_FRACTION: float = 0.20
KEEP_ORIGINAL_FRACTION: float = 0.25
EXIF_FRACTION: float = 0.20
MIN_SIDE: int = 16

PARQUET_SCHEMA: pa.Schema = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)

_SUBJECTS: tuple[str, ...] = (
    "dog", "golden retriever", "tabby cat", "astronaut", "cup of coffee", "red bicycle", "vintage car",
    "lighthouse", "mountain lake", "city skyline", "wooden table", "bowl of ramen", "pair of sneakers",
    "rocket on the launch pad", "old man", "young woman", "child", "sunflower", "coral reef", "snowy owl",
    "laptop", "leather sofa", "wedding cake", "street market", "train station", "ceramic vase",
    "espresso machine", "galaxy", "microscope slide", "wall clock", "pile of coins", "brick wall",
)
_ADJECTIVES: tuple[str, ...] = (
    "beautiful", "old", "small", "bright", "cozy", "modern", "rustic", "colorful", "quiet", "busy", "foggy",
    "sunny", "blurry", "elegant", "handmade", "abandoned", "tiny", "huge", "vintage", "minimalist", "empty",
)
_PLACES: tuple[str, ...] = (
    "the beach", "a kitchen", "the park", "downtown Chicago", "a forest", "the mountains", "a small café",
    "São Paulo", "Zürich", "the garden", "a studio", "Kraków old town", "Montréal", "the desert",
    "a living room", "Tōkyō", "the harbor", "a museum", "space",
)
_PREPOSITIONS: tuple[str, ...] = ("in", "near", "at", "on the way to", "outside", "behind", "above")
_TIMES: tuple[str, ...] = (
    "at sunset", "at night", "in the morning", "in winter", "during the rain", "on a sunny day", "at dawn",
)
_STYLES: tuple[str, ...] = (
    "stock photo", "illustration", "watercolor painting", "close-up", "aerial view", "portrait",
    "3d render", "black and white photo", "photograph",
)
_SUFFIXES: tuple[str, ...] = (
    " | high resolution", ", shot on film", " - royalty free image", " #travel #photography", " (detail)",
    " — édition limitée", ". Photo by a local photographer", " 4k wallpaper", ", free shipping",
    ", available in several sizes and colours",
)
_TEMPLATES: tuple[str, ...] = (
    "{style} of {a_adj_subj} {prep} {place}",
    "{A_adj_subj} {prep} {place} {time}",
    "{Subj} {time}",
    "{Adj} {subj} for sale",
    "photo of {a_subj}",
    "{Subj}, {place}, {year}",
    "how to choose {a_adj_subj}: {n} tips",
    "{A_adj_subj} next to {a_adj2_subj2} {prep} {place}",
    "IMG_{num}",
    "{Subj}",
    "{style}: {adj} {subj} and {subj2} {time} {prep} {place}",
)
_DOMAINS: tuple[str, ...] = (
    "images.example.com", "cdn.example.org", "static.example.net", "photos.example.com", "media.example.org",
)
_URL_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "JPG")
_CAMERAS: tuple[tuple[str, str], ...] = (
    ("Canon", "Canon EOS 5D Mark III"),
    ("NIKON CORPORATION", "NIKON D750"),
    ("Apple", "iPhone 12"),
    ("SONY", "ILCE-7M3"),
    ("FUJIFILM", "X-T3"),
)


@dataclass(frozen=True)
class _Bases:
    """Decoded base images, loaded once per `make_shards` call."""

    color: tuple[Image.Image, ...]
    gray: tuple[Image.Image, ...]
    rgba: Image.Image


@dataclass(frozen=True)
class _Sample:
    """One encoded sample: image bytes, caption and img2dataset metadata."""

    key: str
    ext: str
    image: bytes
    caption: str
    meta: dict[str, Any]


def _load_skimage(name: str) -> Image.Image:
    """Load one bundled scikit-image sample image as a PIL image."""
    import skimage.data

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    return Image.fromarray(np.ascontiguousarray(loader()))


def _load_bases() -> _Bases:
    """Load every base image (all bundled with scikit-image, no downloads)."""
    color = tuple(_load_skimage(n).convert("RGB") for n in COLOR_IMAGES)
    gray = tuple(_load_skimage(n).convert("L") for n in GRAY_IMAGES)
    rgba = _load_skimage(RGBA_IMAGE).convert("RGBA")
    return _Bases(color=color, gray=gray, rgba=rgba)


def _rng(seed: int, shard: int, index: int) -> np.random.Generator:
    """Independent generator per sample, so a sample does not depend on the others."""
    return np.random.default_rng([seed, shard, index])


def _pick(rng: np.random.Generator, items: tuple[Any, ...]) -> Any:
    """Uniformly pick one item of a tuple."""
    return items[int(rng.integers(len(items)))]


def make_uid(seed: int, shard: int, index: int) -> str:
    """Deterministic 32-char lowercase hex uid for a sample."""
    return hashlib.blake2b(f"d2m-synth/{seed}/{shard}/{index}".encode(), digest_size=16).hexdigest()


def make_key(shard: int, index: int) -> str:
    """img2dataset's sample key: 5-digit shard number then 4-digit index in the shard."""
    return f"{shard:05d}{index:04d}"


def _with_article(phrase: str) -> str:
    """Prefix 'a' or 'an' to a noun phrase."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _capitalize(text: str) -> str:
    """Upper-case the first character only."""
    return text[:1].upper() + text[1:]


def make_caption(rng: np.random.Generator) -> str:
    """Caption-like English text from a template and word lists."""
    subj, subj2 = _pick(rng, _SUBJECTS), _pick(rng, _SUBJECTS)
    adj, adj2 = _pick(rng, _ADJECTIVES), _pick(rng, _ADJECTIVES)
    a_adj_subj = _with_article(f"{adj} {subj}")
    fields = {
        "style": _capitalize(_pick(rng, _STYLES)),
        "subj": subj,
        "subj2": subj2,
        "Subj": _capitalize(subj),
        "adj": adj,
        "Adj": _capitalize(adj),
        "a_subj": _with_article(subj),
        "a_adj_subj": a_adj_subj,
        "A_adj_subj": _capitalize(a_adj_subj),
        "a_adj2_subj2": _with_article(f"{adj2} {subj2}"),
        "prep": _pick(rng, _PREPOSITIONS),
        "place": _pick(rng, _PLACES),
        "time": _pick(rng, _TIMES),
        "year": str(int(rng.integers(1950, 2024))),
        "n": str(int(rng.integers(3, 12))),
        "num": f"{int(rng.integers(10000)):04d}",
    }
    caption = _pick(rng, _TEMPLATES).format(**fields)
    if rng.random() < 0.35:
        picks = rng.choice(len(_SUFFIXES), size=int(rng.integers(1, 3)), replace=False)
        caption += "".join(_SUFFIXES[int(i)] for i in picks)
    return caption


def make_url(rng: np.random.Generator, uid: str) -> str:
    """Fake https URL under reserved example domains."""
    ext = _pick(rng, _URL_EXTENSIONS)
    return f"https://{_pick(rng, _DOMAINS)}/{int(rng.integers(1, 999))}/{uid[:12]}.{ext}"


def make_exif(rng: np.random.Generator) -> str | None:
    """Null or a small exifread-style json string, as img2dataset stores it."""
    if rng.random() >= EXIF_FRACTION:
        return None
    make, model = _pick(rng, _CAMERAS)
    tags = {
        "Image Make": make,
        "Image Model": model,
        "Image Orientation": "Horizontal (normal)",
        "EXIF ExposureTime": f"1/{int(rng.choice([30, 60, 125, 250, 500, 1000]))}",
        "EXIF ISOSpeedRatings": str(int(rng.choice([100, 200, 400, 800, 1600]))),
        "EXIF DateTimeOriginal": f"{int(rng.integers(2005, 2024))}:{int(rng.integers(1, 13)):02d}:"
        f"{int(rng.integers(1, 29)):02d} {int(rng.integers(24)):02d}:{int(rng.integers(60)):02d}:00",
    }
    return json.dumps(tags)


def _aspect_ratio(rng: np.random.Generator) -> float:
    """Width / height: half near-square, a quarter wide (up to 2.5), a quarter tall (down to 0.4)."""
    roll = rng.random()
    low, high = (0.75, 1.33) if roll < 0.5 else (1.33, 2.5) if roll < 0.75 else (0.4, 0.75)
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _random_box(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A random crop window (left, top, right, bottom) with a random aspect ratio inside `size`."""
    aspect = _aspect_ratio(rng)
    bw, bh = size
    max_w, max_h = (bh * aspect, bh) if bw / bh > aspect else (bw, bw / aspect)
    scale = rng.uniform(0.3, 1.0)
    cw = max(MIN_SIDE, min(bw, round(max_w * scale)))
    ch = max(MIN_SIDE, min(bh, round(max_h * scale)))
    x0 = int(rng.integers(0, bw - cw + 1))
    y0 = int(rng.integers(0, bh - ch + 1))
    return x0, y0, x0 + cw, y0 + ch


def _target_size(rng: np.random.Generator, size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Stored size: keep the original sometimes, else scale so the longest side is random in range."""
    w, h = size
    if max(w, h) <= max_side and rng.random() < KEEP_ORIGINAL_FRACTION:
        return w, h
    small_hi = min(223, max_side)
    if rng.random() < SMALL_FRACTION or max_side < 224:
        longest = int(rng.integers(min(48, small_hi), small_hi + 1))
    else:
        longest = int(rng.integers(224, max_side + 1))
    scale = longest / max(w, h)
    return max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale)))


def _alpha_mask(size: tuple[int, int]) -> Image.Image:
    """Soft vignette alpha: opaque centre, transparent corners."""
    return ImageOps.invert(Image.radial_gradient("L").resize(size, Image.Resampling.BILINEAR))


def _render_image(rng: np.random.Generator, bases: _Bases, max_side: int) -> tuple[Image.Image, tuple[int, int], str]:
    """Pick a base and format, crop/resize/flip; returns (image, original size, extension)."""
    roll = rng.random()
    if roll < GRAY_FRACTION:
        ext, base = "jpg", _pick(rng, bases.gray + bases.color)
    elif roll < GRAY_FRACTION + PNG_FRACTION:
        ext = "png"
        base = bases.rgba if rng.random() < 0.25 else _pick(rng, bases.color)
    else:
        ext, base = "jpg", _pick(rng, bases.color)
    box = _random_box(rng, base.size)
    original = (box[2] - box[0], box[3] - box[1])
    target = _target_size(rng, original, max_side)
    if target == original:
        img = base.crop(box)
    else:
        img = base.resize(target, Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if roll < GRAY_FRACTION:
        img = img.convert("L")
    elif ext == "png" and img.mode == "RGB" and rng.random() < 0.5:
        img.putalpha(_alpha_mask(img.size))
    return img, original, ext


def encode_image(img: Image.Image, ext: str, jpeg_quality: int) -> bytes:
    """Encode as JPEG (RGB or L) or PNG (any mode)."""
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def _make_sample(bases: _Bases, seed: int, shard: int, index: int, max_side: int, jpeg_quality: int) -> _Sample:
    """Build one deterministic sample of shard `shard`."""
    rng = _rng(seed, shard, index)
    uid = make_uid(seed, shard, index)
    key = make_key(shard, index)
    img, (orig_w, orig_h), ext = _render_image(rng, bases, max_side)
    data = encode_image(img, ext, jpeg_quality)
    caption = make_caption(rng)
    meta: dict[str, Any] = {
        "uid": uid,
        "url": make_url(rng, uid),
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": img.width,
        "height": img.height,
        "original_width": orig_w,
        "original_height": orig_h,
        "exif": make_exif(rng),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return _Sample(key=key, ext=ext, image=data, caption=caption, meta=meta)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)` to a temporary sibling, then rename onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class _ShardLog:
    """What a shard's parquet and stats need once its tar is written."""

    metas: list[dict[str, Any]]
    image_bytes: int = 0


def _write_tar(path: Path, samples: Iterator[_Sample], log: _ShardLog) -> None:
    """Stream samples into a webdataset tar, recording their metadata in `log`.

    Like img2dataset (which also uses webdataset's TarWriter), a sample's members are written
    sorted by extension: KEY.jpg, KEY.json, KEY.txt or KEY.json, KEY.png, KEY.txt.
    """
    with open(path, "wb") as f, TarWriter(f, encoder=False, mtime=TAR_MTIME) as writer:
        for s in samples:
            writer.write(
                {
                    "__key__": s.key,
                    s.ext: s.image,
                    "txt": s.caption.encode("utf-8"),
                    "json": json.dumps(s.meta, indent=4).encode("utf-8"),
                }
            )
            log.metas.append(s.meta)
            log.image_bytes += len(s.image)


def _write_parquet(path: Path, metas: list[dict[str, Any]]) -> None:
    """One row per sample with the json fields, in tar order."""
    pq.write_table(pa.Table.from_pylist(metas, schema=PARQUET_SCHEMA), path)


def _stats(log: _ShardLog, start_time: float, end_time: float) -> dict[str, Any]:
    """img2dataset-like per-shard stats."""
    n = len(log.metas)
    return {
        "count": n,
        "successes": n,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end_time - start_time,
        "bytes_downloaded": log.image_bytes,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": {"success": n},
        "status": "success",
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a json file with img2dataset's indent."""
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")


_WORKER_BASES: _Bases | None = None


def _init_worker() -> None:
    global _WORKER_BASES
    _WORKER_BASES = _load_bases()


def _make_sample_in_worker(args: tuple[int, int, int, int, int]) -> _Sample:
    assert _WORKER_BASES is not None
    return _make_sample(_WORKER_BASES, *args)


def _sample_stream(pool: Pool | None, bases: _Bases, shard: int, samples: int, seed: int, max_side: int,
                   jpeg_quality: int) -> Iterator[_Sample]:
    """The shard's samples in index order, rendered here or by the pool's processes (same bytes either way)."""
    if pool is None:
        return (_make_sample(bases, seed, shard, i, max_side, jpeg_quality) for i in range(samples))
    jobs = ((seed, shard, i, max_side, jpeg_quality) for i in range(samples))
    return pool.imap(_make_sample_in_worker, jobs, chunksize=32)


def _write_shard(
    out_dir: Path, bases: _Bases, shard: int, samples: int, seed: int, max_side: int, jpeg_quality: int,
    pool: Pool | None = None,
) -> Path:
    """Write NNNNN.tar, NNNNN.parquet and finally NNNNN_stats.json for one shard."""
    start_time = time.time()
    stream = _sample_stream(pool, bases, shard, samples, seed, max_side, jpeg_quality)
    name = f"{shard:05d}"
    tar_path = out_dir / f"{name}.tar"
    log = _ShardLog(metas=[])
    _write_atomic(tar_path, lambda p: _write_tar(p, stream, log))
    _write_atomic(out_dir / f"{name}.parquet", lambda p: _write_parquet(p, log.metas))
    stats = _stats(log, start_time, time.time())
    _write_atomic(out_dir / f"{name}_stats.json", lambda p: _write_json(p, stats))
    return tar_path


def make_shards(
    out_dir: str | Path,
    shards: int = 2,
    samples: int = 32,
    *,
    seed: int = 0,
    start: int = 0,
    max_side: int = 512,
    jpeg_quality: int = 95,
    workers: int = 1,
) -> list[Path]:
    """Write `shards` tars named f"{start+i:05d}.tar" into out_dir; returns the tar paths in order.

    Each shard gets, in this order, `NNNNN.tar`, `NNNNN.parquet` and `NNNNN_stats.json`, like
    img2dataset's webdataset output. Each sample has `KEY.jpg` or `KEY.png`, `KEY.txt` and
    `KEY.json`, with KEY = f"{shard:05d}{index:04d}" (the index widens past 9999 samples).
    Output depends only on (seed, shard number, index, max_side, jpeg_quality), so `start`
    selects shards of the same stream and equal seeds give byte-identical tars and images.
    `workers` > 1 renders samples in that many processes; the bytes written do not change.
    """
    if shards < 1 or samples < 1:
        raise ValueError(f"shards and samples must be >= 1, got {shards=} {samples=}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start=}")
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be >= {MIN_SIDE}, got {max_side=}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality=}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers=}")
    bases = _load_bases()
    if workers == 1:
        return [_write_shard(out, bases, start + i, samples, seed, max_side, jpeg_quality) for i in range(shards)]
    with get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        return [_write_shard(out, bases, start + i, samples, seed, max_side, jpeg_quality, pool) for i in range(shards)]

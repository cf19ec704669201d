"""A corpus of messy img2dataset shards: every fault real output shows, each with the outcome d2m guarantees.

`make_fault_shards(out_dir)` writes one tar per case (the tar's stem is the case name) and a `faults.json`
manifest, and returns the cases with, for every sample the tar holds (see d2m_core.reading.reading), what d2m does
with it: processed (a metadata row) or failed (a failure record {key, uid, reason} whose reason contains
`Expected.reason`). A tar that cannot be read at all has `shard_error` instead (the shard fails as a
whole, naming the file; the other shards of the run complete).

Outcomes assume a model that reads text (CLIP): a sample without txt fails with "no txt member" then, and
is processed when no selected model reads text.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from d2m_core.reading.reading import TRUNCATED, split_name
from d2m_core.testdata.synth import TAR_MTIME, encode_image, make_caption, make_key, make_url

__all__ = ["Expected", "FaultCase", "MANIFEST", "make_fault_shards"]

MANIFEST = "faults.json"
HUGE_SIZE = (9000, 7000)
BOMB_SIDE = 40_000
CANNOT_DECODE = "cannot decode image"
BOMB = "decompression bomb"


@dataclass(frozen=True)
class Expected:
    """One sample the tar holds and what d2m does with it."""

    key: str
    what: str
    processed: bool
    reason: str | None = None  # failed samples: a substring of the recorded reason
    uid: str | None = None  # the uid its row or failure record carries (None: the sample has none)


@dataclass(frozen=True)
class FaultCase:
    """One tar of the corpus."""

    name: str
    path: Path
    what: str
    samples: tuple[Expected, ...] = ()  # every sample the tar holds, in tar order
    shard_error: str | None = None  # set when the tar cannot be read at all: a substring of the error

    @property
    def processed(self) -> list[Expected]:
        return [s for s in self.samples if s.processed]

    @property
    def failed(self) -> list[Expected]:
        return [s for s in self.samples if not s.processed]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "what": self.what, "shard_error": self.shard_error,
                "samples": [asdict(s) for s in self.samples]}


@dataclass
class _Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass
class _Shard:
    """Members and expectations of one case, built sample by sample."""

    index: int
    seed: int
    members: list[_Member] = field(default_factory=list)
    expected: list[Expected] = field(default_factory=list)

    def key(self, i: int | None = None) -> str:
        return make_key(self.index, len(self.expected) if i is None else i)

    def uid(self, key: str) -> str:
        return hashlib.blake2b(f"d2m-faults/{self.seed}/{key}".encode(), digest_size=16).hexdigest()

    def rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(hashlib.md5(key.encode()).hexdigest()[:8], 16)])

    def meta(self, key: str, image: bytes, caption: str) -> dict[str, Any]:
        uid = self.uid(key)
        size = _size(image)
        return {"uid": uid, "url": make_url(self.rng(key), uid), "caption": caption, "key": key, "status": "success",
                "error_message": None, "width": size[0], "height": size[1], "original_width": size[0],
                "original_height": size[1], "exif": None, "sha256": hashlib.sha256(image).hexdigest()}

    def sample(self, what: str, image: bytes | None = None, *, ext: str = "jpg", processed: bool = True,
               reason: str | None = None, caption: str | bytes | None = None, meta: Any = "default",
               json_bytes: bytes | None = None, omit: tuple[str, ...] = (), key: str | None = None,
               prefix: str = "", uid: Any = "default") -> str:
        """Add one sample (members sorted by extension, as img2dataset's TarWriter writes them)."""
        key = key or self.key()
        image = _photo(self.rng(key)) if image is None else image
        text = make_caption(self.rng(key)) if caption is None else caption
        text_bytes = text if isinstance(text, bytes) else text.encode("utf-8")
        if meta == "default":
            meta = self.meta(key, image, text_bytes.decode("utf-8", "replace"))
        members = {ext: image, "txt": text_bytes,
                   "json": json_bytes if json_bytes is not None else json.dumps(meta, indent=4).encode()}
        for name in sorted(members):
            if name not in omit:
                self.members.append(_Member(f"{prefix}{key}.{name}", members[name]))
        if uid == "default":
            uid = meta.get("uid") if isinstance(meta, dict) and "json" not in omit and json_bytes is None else None
            uid = uid if isinstance(uid, str) and uid.strip() else None
        self.expected.append(Expected(f"{prefix}{key}", what, processed, reason, uid))
        return key

    def stray(self, name: str, data: bytes, what: str, reason: str, member_type: bytes = tarfile.REGTYPE,
              linkname: str = "") -> None:
        self.members.append(_Member(name, data, member_type, linkname))
        self.expected.append(Expected(split_name(name)[0] or name, what, False, reason, None))


def _size(data: bytes) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Exception:  # noqa: BLE001 - undecodable (or a bomb) on purpose
        return 0, 0


def _base(gray: bool = False) -> Image.Image:
    import skimage.data

    return Image.fromarray(np.ascontiguousarray(skimage.data.camera() if gray else skimage.data.astronaut()))


_BASES: dict[bool, Image.Image] = {}


def _picture(rng: np.random.Generator, size: tuple[int, int], gray: bool = False) -> Image.Image:
    """A crop of a bundled photo resized to `size` (different per rng)."""
    base = _BASES.setdefault(gray, _base(gray))
    side = int(rng.integers(200, 480))
    x, y = int(rng.integers(0, base.width - side)), int(rng.integers(0, base.height - side))
    return base.resize(size, Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))


def _photo(rng: np.random.Generator, size: tuple[int, int] = (64, 48)) -> bytes:
    return encode_image(_picture(rng, size), "jpg", 90)


def _save(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: any declared size, any bit depth, `raw` = filtered scanlines (maybe too few)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG with its SOF0 frame header patched to declare another size."""
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4:]


def _write_tar(path: Path, members: list[_Member], *, fmt: int = tarfile.PAX_FORMAT, encoding: str = "utf-8") -> None:
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mtime = m.type, m.linkname, TAR_MTIME
            info.mode = 0o755 if m.type == tarfile.DIRTYPE else 0o644
            info.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if info.size else None)


# --- the cases --------------------------------------------------------------------------------------------


def _undecodable(s: _Shard) -> str:
    rng = s.rng("undecodable")
    s.sample("a normal JPEG (control)")
    s.sample("random bytes named .jpg", rng.bytes(3000), processed=False, reason=CANNOT_DECODE)
    s.sample("a 0-byte .jpg member", b"", processed=False, reason="empty image member")
    html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>"
    s.sample("an HTML error page named .jpg", html, processed=False, reason=CANNOT_DECODE)
    s.sample("a JPEG cut inside its headers (first 100 bytes)", _photo(rng)[:100], processed=False, reason=CANNOT_DECODE)
    s.sample("a text file named .png", b"just some text\n" * 20, ext="png", processed=False, reason=CANNOT_DECODE)
    s.sample("a PNG signature followed by garbage", b"\x89PNG\r\n\x1a\n" + rng.bytes(500), ext="png",
             processed=False, reason=CANNOT_DECODE)
    return "images that cannot be decoded: failed with 'cannot decode image: ...' (the control is processed)"


def _odd_images(s: _Shard) -> str:
    rng = s.rng("odd")
    pic = _picture(rng, (64, 48))
    gray = _picture(rng, (40, 30), gray=True)
    s.sample("CMYK JPEG (PIL converts naively)", _save(pic.convert("CMYK"), "JPEG", quality=90))
    deep = (np.asarray(gray, np.uint16) * 257).astype(np.uint16)
    s.sample("16-bit grayscale PNG (PIL clips to 8 bits: mostly white, as the seed)", _save(Image.fromarray(deep), "PNG"),
             ext="png")
    rgb48 = np.asarray(pic, np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb48)
    s.sample("48-bit RGB PNG", _png(pic.width, pic.height, 16, 2, rows), ext="png")
    palette = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    s.sample("palette PNG with a transparent index", _save(palette, "PNG", transparency=0), ext="png")
    s.sample("palette PNG with per-entry alpha (tRNS bytes)", _save(palette, "PNG", transparency=bytes(range(0, 256, 16))),
             ext="png")
    s.sample("RGBA PNG (alpha dropped, not composited)", _save(pic.convert("RGBA"), "PNG"), ext="png")
    s.sample("grayscale + alpha PNG", _save(gray.convert("LA"), "PNG"), ext="png")
    s.sample("1-bit PNG", _save(gray.convert("1"), "PNG"), ext="png")
    s.sample("grayscale JPEG", _save(gray, "JPEG", quality=90))
    s.sample("lossy WebP stored as .webp", _save(pic, "WEBP", quality=80), ext="webp")
    s.sample("lossless WebP with alpha", _save(pic.convert("RGBA"), "WEBP", lossless=True), ext="webp")
    s.sample("1x1 PNG", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), ext="png")
    s.sample("1x1 JPEG stored as .jpeg", _save(Image.new("RGB", (1, 1), (10, 200, 10)), "JPEG"), ext="jpeg")
    s.sample("2x600 PNG strip (extreme aspect ratio)", _save(_picture(rng, (2, 600)), "PNG"), ext="png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    s.sample("JPEG with EXIF orientation 6 (NOT rotated: processed as stored, 64x32, as the seed)",
             _save(_picture(rng, (64, 32)), "JPEG", quality=90, exif=exif))
    s.sample("progressive JPEG", _save(pic, "JPEG", quality=90, progressive=True))
    big = _save(_picture(rng, (256, 192)), "JPEG", quality=90)
    s.sample("JPEG cut at 60% of its bytes (grey tail, as the seed's LOAD_TRUNCATED_IMAGES)", big[: len(big) * 6 // 10])
    s.sample("PNG bytes stored as .jpg (format sniffed from the bytes)", _save(pic, "PNG"))
    frames = [_picture(rng, (48, 48)).convert("P") for _ in range(2)]
    s.sample("animated GIF stored as .jpg (first frame)", _save(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    return "odd but valid images: all processed"


def _bombs(s: _Shard) -> str:
    s.sample("a normal JPEG (control)")
    bomb = _png(BOMB_SIDE, BOMB_SIDE, 8, 0, b"\x00" * (BOMB_SIDE + 1) * 4)  # 4 of its 40,000 rows
    s.sample(f"{len(bomb)}-byte PNG declaring {BOMB_SIDE}x{BOMB_SIDE}", bomb, ext="png", processed=False, reason=BOMB)
    s.sample("PNG declaring 15000x15000 (225 Mpx, just over the limit)",
             _png(15_000, 15_000, 8, 0, b"\x00" * 15_001), ext="png", processed=False, reason=BOMB)
    s.sample("baseline JPEG whose header declares 60000x60000", _jpeg_declaring(_photo(s.rng("bomb")), 60_000, 60_000),
             processed=False, reason=BOMB)
    s.sample("a normal JPEG (control)")
    return "decompression bombs: refused from the header, before any pixel is allocated"


def _huge(s: _Shard) -> str:
    rng = s.rng("huge")
    img = _picture(rng, HUGE_SIZE)
    s.sample(f"{HUGE_SIZE[0]}x{HUGE_SIZE[1]} JPEG (decoded in draft mode to 2250x1750)", _save(img, "JPEG", quality=85))
    s.sample("a normal JPEG (control)")
    return "a huge legal image: processed, with bounded memory"


def _metadata(s: _Shard) -> str:
    s.sample("a normal sample (control)")
    s.sample("no json member", omit=("json",), processed=False, reason="no json member")
    key = s.key()
    s.sample("json without uid", key=key, meta={"key": key, "caption": "no uid"}, processed=False, reason="json has no uid")
    key = s.key()
    s.sample("json with uid null", key=key, meta={"uid": None, "key": key}, processed=False, reason="json has no uid")
    key = s.key()
    s.sample("json with a number as uid", key=key, meta={"uid": 12345, "key": key}, processed=False,
             reason="uid is not a non-empty string")
    key = s.key()
    s.sample("json with an empty uid", key=key, meta={"uid": "", "key": key}, processed=False,
             reason="uid is not a non-empty string")
    s.sample("json member is a list", json_bytes=b'["uid", "x"]', processed=False, reason="json member is not an object")
    s.sample("json member is not JSON", json_bytes=b"{'uid': 'python repr'}", processed=False,
             reason="json member is not valid JSON")
    s.sample("json member is invalid UTF-8", json_bytes=b'{"uid": "\xff\xfe\xfd"}', processed=False,
             reason="json member is not valid JSON")
    s.sample("json nested 100,000 deep", json_bytes=b"[" * 100_000 + b"]" * 100_000, processed=False,
             reason="json member is not valid JSON")
    key = s.key()
    meta = s.meta(key, b"", "x") | {"caption": "lone surrogate \ud800 here"}
    s.sample("json caption with a lone-surrogate escape (kept, replaced by U+FFFD)", key=key, meta=meta,
             json_bytes=json.dumps(meta).encode(), uid=meta["uid"])
    key = s.key()
    s.sample("json with a uid and nothing else (other additional_fields are null)", key=key, meta={"uid": s.uid(key)})
    s.sample("no txt member (processed when no model reads text)", omit=("txt",), processed=False, reason="no txt member")
    s.sample("no image member", omit=("jpg",), processed=False, reason="no image member")
    return "missing or broken json/txt/uid: a row needs a uid, so samples without one fail; uid recorded as null"


def _captions(s: _Shard) -> str:
    s.sample("empty caption", caption="")
    s.sample("whitespace-only caption", caption=" \n\t ")
    s.sample("20,000-character caption (tokens truncated to 77)", caption=("a very long caption " * 1000))
    s.sample("caption with invalid UTF-8 (decoded with U+FFFD)", caption=b"caf\xe9 au lait \xff\xfe")
    s.sample("emoji caption", caption="🐶🐱 dog and cat 👍🏽 🏳️‍🌈")
    s.sample("right-to-left caption (Arabic and Hebrew)", caption="قطة على الأريكة — חתול על הספה")
    s.sample("caption with NUL and control characters", caption="a\x00b\x07c\x1bd\r\ne")
    s.sample("CJK caption", caption="東京の夜景、猫と犬")
    return "captions: all processed (text tokenized as given; invalid UTF-8 replaced)"


def _layout(s: _Shard) -> str:
    s.members.append(_Member("./", type=tarfile.DIRTYPE))
    s.stray("README.md", b"# shards\n", "README.md at the tar root", "not a sample")
    s.members.append(_Member("images/", type=tarfile.DIRTYPE))
    s.sample("a normal sample (control)")
    s.stray("LICENSE", b"MIT\n", "a file without extension", "not a sample")
    s.stray(".DS_Store", b"\x00\x00\x00\x01Bud1", "a hidden macOS file", "not a sample")
    key = s.key()
    s.sample("first of two samples with the same key", key=key)
    s.members.extend(_Member(m.name, m.data) for m in s.members[-3:])
    s.expected.append(Expected(key, "second sample with the same key", False, "duplicate key", s.uid(key)))
    key = s.key()
    s.sample("sample whose txt comes after another sample", key=key, omit=("txt",), processed=False, reason="no txt member")
    s.sample("the sample in between")
    s.members.append(_Member(f"{key}.txt", b"a stray caption"))
    s.expected.append(Expected(key, "the txt, after the other sample: a second sample with that key", False,
                               "duplicate key", None))
    s.sample("sample in a subfolder (key keeps the folder)", prefix="images/")
    s.sample("member names with '../../' (only ever a string)", prefix="../../etc/")
    s.sample("member names with an absolute path", prefix="/abs/")
    key = s.key()
    s.sample("image member is a symlink to /etc/passwd", key=key, omit=("jpg",), processed=False, reason="symlink")
    s.members.insert(len(s.members) - 2, _Member(f"{key}.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"))
    key = s.key()
    s.sample("image member is a character device", key=key, omit=("jpg",), processed=False, reason="special file")
    s.members.insert(len(s.members) - 2, _Member(f"{key}.jpg", type=tarfile.CHRTYPE))
    key = s.key()
    s.sample("upper-case extensions (.JPG/.JSON/.TXT)", key=key)
    for m in s.members[-3:]:
        stem, _, ext = m.name.rpartition(".")
        m.name = f"{stem}.{ext.upper()}"
    s.sample("member names over 100 characters", prefix="a-long-folder-name/" * 6)
    s.sample("member name in Latin-1, not UTF-8 (key gets U+FFFD)", prefix="caf\xe9-")
    s.expected[-1] = replace(s.expected[-1], key=s.expected[-1].key.replace("\xe9", "\ufffd"))
    return ("tar layout: directory entries skipped (not samples); stray files, duplicate keys and links failed; "
            "odd member names processed, their names only used as keys")


# A complete 6-sample tar, then damaged: (case, what, the member damaged (sample, ext), the damage, the sample at
# the cut and whether its json was read). Samples before the one at the cut are processed, later ones are gone.
_DAMAGED: tuple[tuple[str, str, tuple[int, str], str, int, bool], ...] = (
    ("truncated-mid-member", "cut inside sample 3's image: samples 0-2 processed, sample 3 failed",
     (3, "jpg"), "cut-in-data", 3, False),
    ("truncated-between-members", "cut after sample 3's image member: samples 0-2 processed, sample 3 failed",
     (3, "json"), "cut-before", 3, False),
    ("truncated-between-samples", "cut exactly between samples 2 and 3: samples 0-1 processed; sample 2 failed, "
     "since the reader cannot tell whether its members were all there", (3, "jpg"), "cut-before", 2, True),
    ("truncated-first-member", "cut inside the first member: its sample failed, the shard holds 1 sample",
     (0, "jpg"), "cut-in-data", 0, False),
    ("corrupt-header", "sample 3's json header has a bad checksum: samples 0-2 processed, sample 3 failed, "
     "the rest unreadable", (3, "json"), "bad-checksum", 3, False),
    ("zeroed-header", "sample 3's json header is zeroed (reads as the end of the tar): samples 0-2 processed, "
     "sample 3 failed", (3, "json"), "zero-header", 3, False),
)


def _normal_samples(what: str) -> Callable[[_Shard], str]:
    def build(s: _Shard) -> str:
        for _ in range(6):
            s.sample("a normal sample")
        return what

    return build


def _only_directories(s: _Shard) -> str:
    s.members += [_Member("./", type=tarfile.DIRTYPE), _Member("images/", type=tarfile.DIRTYPE)]
    return "only directory entries: 0 samples"


def _damage(path: Path, member: tarfile.TarInfo, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "cut-in-data":
        del data[member.offset_data + min(100, member.size // 2):]
    elif how == "cut-before":
        del data[member.offset:]
    elif how == "bad-checksum":
        data[member.offset + 148:member.offset + 156] = b"0000000\x00"
    elif how == "zero-header":
        data[member.offset:member.offset + 512] = bytes(512)
    path.write_bytes(bytes(data))


def make_fault_shards(out_dir: str | Path, *, seed: int = 0) -> dict[str, FaultCase]:
    """Write the fault corpus into out_dir (one `{case}.tar` per case, then `faults.json`); returns the cases by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, FaultCase] = {}

    def add(name: str, build: Callable[[_Shard], str], **tar_options: Any) -> _Shard:
        shard = _Shard(index=len(cases) + 1, seed=seed)
        what = build(shard)
        _write_tar(out / f"{name}.tar", shard.members, **tar_options)
        cases[name] = FaultCase(name, out / f"{name}.tar", what, tuple(shard.expected))
        return shard

    add("undecodable", _undecodable)
    add("odd-images", _odd_images)
    add("bombs", _bombs)
    add("huge", _huge)
    add("metadata", _metadata)
    add("captions", _captions)
    add("layout", _layout, fmt=tarfile.GNU_FORMAT, encoding="latin-1")
    for name, what, (index, ext), how, at_cut, json_read in _DAMAGED:
        shard = add(name, _normal_samples(what))
        path = cases[name].path
        with tarfile.open(path) as tar:
            member = tar.getmember(f"{shard.key(index)}.{ext}")
        _damage(path, member, how)
        kept = shard.expected[: at_cut + 1]
        kept[at_cut] = replace(kept[at_cut], what=what, processed=False, reason=TRUNCATED,
                               uid=kept[at_cut].uid if json_read else None)
        cases[name] = replace(cases[name], samples=tuple(kept))
    add("empty", lambda s: "a valid tar with no members (img2dataset writes these when every download failed): 0 samples")
    add("only-directories", _only_directories)

    def unreadable(name: str, data: bytes, error: str, what: str) -> None:
        path = out / f"{name}.tar"
        path.write_bytes(data)
        cases[name] = FaultCase(name, path, what, (), shard_error=error)

    unreadable("zero-bytes", b"", "empty file", "a 0-byte file: the shard fails, naming the file")
    unreadable("not-a-tar", b"<html><body>403 Forbidden</body></html>\n" * 30, "not a readable tar",
               "an HTML error page saved as .tar: the shard fails, naming the file")
    unreadable("cut-in-first-header", (out / "metadata.tar").read_bytes()[:300], "not a readable tar",
               "a tar cut inside its first header: the shard fails, naming the file")
    manifest = {name: case.as_dict() for name, case in cases.items()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return cases

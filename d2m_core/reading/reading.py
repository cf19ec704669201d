"""Tar reading: one streaming pass over an img2dataset tar, grouped into samples by key.

What "the samples a tar holds" means (the unit every count refers to):

- The tar's members are read in order; directory entries are skipped (they hold no data and are not samples).
- Every other member belongs to exactly one sample. A member named ``KEY.EXT`` (webdataset's `base_plus_ext`:
  KEY is the name up to the first dot of its last path component) joins the sample being read when its KEY
  is the same and its EXT (lower-cased) is not already in it; otherwise it starts a new sample. A member
  whose name has no ``KEY.EXT`` form (``README``, ``.DS_Store``) is a sample of its own, keyed by its name.
- Each sample is yielded exactly once, usable or with `problem` set, so for every shard
  ``samples yielded == samples_written + samples_failed`` once the loader has recorded the problems.

A sample has a problem (and is recorded as a failure, never processed) when: it holds a member that is not
a regular file (symlink, hard link, device) or one over MAX_MEMBER_BYTES; its key repeats an earlier
sample's key in the same tar; it has neither an image nor a json member (a stray file); its json is
missing, not valid JSON, not an object, or has no string uid (a DataComp row needs its uid); it has no
image member. A missing txt is the loader's business (a failure only when a model reads text); a caption
is decoded as UTF-8 with invalid bytes replaced by U+FFFD.

A tar that breaks part way (cut mid-member, cut at a member boundary without the end-of-archive blocks, a
corrupt header, data after a zeroed header) yields the samples read before the break; the last one, the
sample at the cut, whose remaining members may be lost, carries the truncation as its problem (the
reason starts with TRUNCATED). A tar from which no sample can be read at all (not a tar, 0 bytes, cut
inside its first header, a pipe that fails before any sample) raises ShardReadError naming the file.
A valid tar with no members holds 0 samples and is not an error (img2dataset writes those when every
download of a shard failed).

Names inside the tar are only ever used as strings (keys in records): nothing is extracted to disk and
links are never followed.
"""

from __future__ import annotations

import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

from d2m_core.reading.shards import ShardRef, open_shard

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")  # the seed's rename order: image="jpg;png;jpeg;webp"
MAX_MEMBER_BYTES = 256 * 2**20  # a larger member is skipped unread (a sample has a problem), bounding memory
TRUNCATED = "tar is truncated or corrupt"  # every truncation reason starts with this
PIPE_CHUNK = tarfile.RECORDSIZE  # tarfile's stream read size, as before

# What a broken tar stream raises from tarfile, its decompressors or the file system underneath.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, OverflowError, lzma.LZMAError)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


class ShardReadError(RuntimeError):
    """The shard cannot be opened or is not a tar at all; names the file."""


@dataclass(slots=True)
class RawSample:
    """The members of one sample as stored: encoded image bytes, caption text, parsed json."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    problem: str | None = None  # set when the sample cannot be used (missing image, bad json, ...)
    names: list[str] = field(default_factory=list)  # every member name of the sample, as stored

    @property
    def uid(self) -> str | None:
        uid = self.json.get("uid") if self.json else None
        return uid if isinstance(uid, str) and uid.strip() else None

    @property
    def image_ext(self) -> str | None:
        """The extension of the image member the sample is read by (the first of IMAGE_EXTENSIONS it holds)."""
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)

    @property
    def usable_image_ext(self) -> str | None:
        """`image_ext` of a sample that can be used (no problem), else None: the image a batch carries."""
        return self.image_ext if self.problem is None else None

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return None if ext is None else self.members[ext]

    @property
    def text(self) -> str | None:
        data = self.members.get("txt")
        return None if data is None else data.decode("utf-8", errors="replace")

    def add_problem(self, reason: str) -> None:
        """Keep the first problem; later ones are appended, so none is lost."""
        self.problem = reason if self.problem is None else f"{self.problem}; {reason}"


@dataclass(slots=True)
class ReadReport:
    """What one pass over a tar found, filled in as `iter_samples` goes (final once it is exhausted)."""

    url: str
    samples: int = 0  # samples yielded: the samples the tar holds (up to a break)
    members: int = 0  # non-directory members seen
    directories: int = 0  # directory entries skipped (not samples)
    truncated: str | None = None  # why the tar ended early; the last sample carries it as its problem
    done: bool = False  # the whole tar was read (normally or up to a break)


def split_name(name: str) -> tuple[str | None, str]:
    """'dir/000001.json' -> ('dir/000001', 'json'); (None, '') when the name has no KEY.EXT form."""
    if "/" not in name:  # the usual case, without the regular expression: KEY is all before the first dot
        dot = name.find(".")
        return (name[:dot], name[dot + 1:].lower()) if dot > 0 else (None, "")
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into parsed JSON


def _clean_text(text: str) -> str:
    """A str that can be written as UTF-8: each lone surrogate (an undecodable byte of a tar name, a JSON
    escape such as "\\ud800") becomes U+FFFD, as invalid bytes of a caption do."""
    return _SURROGATE.sub("\ufffd", text)


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, dict):
        return {_clean_text(k): _clean_json(v) for k, v in value.items()}
    return value


_decode_json = json.JSONDecoder().decode  # json.loads's decoder for a str (no hooks)


def _loads(data: bytes) -> Any:
    """json.loads(data), without its encoding detection when it would find UTF-8: an object's first two bytes
    are not NUL and not a byte order mark."""
    if data[:1] == b"{" and len(data) >= 4 and data[1]:
        return _decode_json(data.decode("utf-8", "surrogatepass"))  # as json.loads decodes UTF-8
    return json.loads(data)


def _parse_json(sample: RawSample) -> None:
    data = sample.members.get("json")
    if data is None:
        sample.add_problem("no json member, so no uid")
        return
    try:
        parsed = _loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        sample.add_problem(f"json member is not valid JSON: {type(err).__name__}: {str(err)[:200]}")
        return
    if not isinstance(parsed, dict):
        sample.add_problem(f"json member is not an object (a JSON {type(parsed).__name__})")
        return
    try:
        if _SURROGATE_ESCAPE.search(data) or data.count(b"{") + data.count(b"[") >= 100:  # else neither can fail
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800"-style escapes: keep the sample, as a caption's bad bytes are kept
        parsed = _clean_json(parsed)
    except (ValueError, RecursionError):  # nesting too deep to write back out
        sample.add_problem("json member is nested too deeply")
        return
    sample.json = parsed
    if sample.uid is None:
        uid = parsed.get("uid")
        sample.add_problem("json has no uid" if uid is None else f"json uid is not a non-empty string: {str(uid)[:64]!r}")


def _finish(sample: RawSample) -> RawSample:
    """Parse the json and set `problem` when the sample cannot become a row."""
    has_image = sample.image is not None
    if not has_image and "json" not in sample.members:
        names = ", ".join(repr(n[:100]) for n in sample.names[:5])
        sample.add_problem(f"not a sample: no image and no json member (stray file; members: {names})")
        return sample
    _parse_json(sample)
    if not has_image:
        sample.add_problem(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    return sample


class _Blocks:
    """A forward-only byte source over a stream, read in large chunks into one reused buffer: what tarfile's
    header parsing asks of a stream (`read`, `tell`, forward `seek`), plus `peek` and `advance`."""

    CHUNK = 1 << 20

    def __init__(self, raw: IO[bytes], chunk: int = CHUNK) -> None:
        self._raw = raw
        self._chunk = chunk
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        self._consumed = 0  # bytes of the stream before _buf[_pos]
        self._eof = False

    def _fill(self, n: int) -> int:
        """Have at least n bytes buffered from the read position, unless the stream ends; returns how many."""
        avail = self._end - self._pos
        if avail >= n or self._eof:
            return avail
        if self._pos:  # move the unread rest to the front (small: a header, a member's start)
            self._buf[:avail] = self._view[self._pos:self._end]
            self._pos, self._end = 0, avail
        if n > len(self._buf):  # a new, larger buffer (views of the old one, if any, keep it alive)
            self._buf = bytearray(n)
            self._buf[:avail] = self._view[:avail]
            self._view = memoryview(self._buf)
        while self._end < n:
            room = self._view[self._end:self._end + max(self._chunk, n - self._end)]
            got = self._raw.readinto(room)
            if not got:
                self._eof = True
                break
            self._end += got
        return self._end

    def peek(self, n: int) -> bytes:
        got = min(self._fill(n), n)
        return bytes(self._view[self._pos:self._pos + got])

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._chunk
        got = min(self._fill(n), n)
        data = bytes(self._view[self._pos:self._pos + got])
        self.advance(got)
        return data

    def advance(self, n: int) -> None:
        self._pos += n
        self._consumed += n

    def tell(self) -> int:
        return self._consumed

    def seek(self, offset: int) -> int:
        """Forward only (a stream): skip to `offset`, or to the end if it comes first."""
        while self._consumed < offset:
            got = min(self._fill(min(offset - self._consumed, len(self._buf))), offset - self._consumed)
            if not got:
                break
            self.advance(got)
        return self._consumed


class _Prefixed:
    """A stream that first gives back the bytes already taken from it (to sniff its compression)."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:  # what the decompressors read through
        buffer = bytearray(n if n >= 0 else 1 << 20)
        return bytes(buffer[:self.readinto(memoryview(buffer))])

    def readinto(self, buffer: memoryview) -> int:
        """Fill part of `buffer` (one read of the stream); 0 at its end."""
        if self._head:
            got = min(len(self._head), len(buffer))
            buffer[:got], self._head = self._head[:got], self._head[got:]
            return got
        into = getattr(self._rest, "readinto", None)
        if into is not None:
            return into(buffer) or 0
        data = self._rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


_COMPRESSED = ((b"\x1f\x8b\x08", "gzip"), (b"BZh", "bz2"), (b"\x5d\x00\x00\x80", "lzma"), (b"\xfd7zXZ", "lzma"))


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """The tar inside a gzip, bzip2 or xz stream (tarfile's "r|*" detection), or the stream itself."""
    head = raw.read(10)
    kind = next((k for magic, k in _COMPRESSED if head.startswith(magic)), None)
    if kind == "bz2" and head[4:10] != b"1AY&SY":
        kind = None
    stream = _Prefixed(head, raw)
    if kind is None:
        return stream  # type: ignore[return-value]
    import bz2
    import gzip
    import lzma

    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type]
    return (bz2.BZ2File if kind == "bz2" else lzma.LZMAFile)(stream, mode="rb")  # type: ignore[arg-type]


_FAST_TYPES = (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.XHDTYPE)
_USTAR_MAGIC = (b"ustar\x0000", b"ustar  ")  # POSIX ustar/pax, GNU
_NUMBER = re.compile(rb"[ ]*[0-7]*[ ]*(?:\x00.*)?", re.DOTALL)  # an octal field that tarfile's nti accepts
_CANONICAL = re.compile(rb"[0-7]{7}\x00[0-7]{7}\x00[0-7]{7}\x00[0-7]{11}\x00[0-7]{11}\x00[0-7]{6}\x00 ")  # 100:156
_CANONICAL_DEVICE = re.compile(rb"(?:[0-7]{7}\x00|\x00{8}){2}")  # 329:345
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))


def _plain_header(buf: bytes) -> tuple[str, bytes, int] | None:
    """(name, type, size) of a plain file, directory or pax extended header exactly as tarfile.TarInfo.frombuf
    reads it, or None when the header is anything else (end blocks, bad checksum, links, GNU extensions):
    those go through tarfile itself. About 10x faster than frombuf, which sums the header twice through struct."""
    if len(buf) != tarfile.BLOCKSIZE or buf[156:157] not in _FAST_TYPES or buf[257:265] not in _USTAR_MAGIC:
        return None
    if _CANONICAL.match(buf, 100, 156) is None or _CANONICAL_DEVICE.match(buf, 329, 345) is None:
        for lo, hi in _NUMBER_FIELDS:  # not as Python's tarfile writes them: check each as tarfile's nti would
            if buf[lo] in (0o200, 0o377) or _NUMBER.fullmatch(buf, lo, hi) is None:
                return None
    if _octal(buf, 148, 156) != sum(buf) - sum(buf[148:156]) + 256:
        return None
    size = _octal(buf, 124, 136)
    name = buf[0:100].split(b"\x00", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    kind = buf[156:157]
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    if buf[345]:  # a ustar name prefix
        name = buf[345:500].split(b"\x00", 1)[0].decode(tarfile.ENCODING, "surrogateescape") + "/" + name
    return name, kind, size


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # as tarfile parses a pax record
_PAX_IGNORED = {b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"}  # change no name, size or type
_PAX_FAST_BYTES = 1 << 16


def _ignorable_pax(data: bytes) -> bool:
    """True when a pax extended header holds only well-formed records that leave the member's name, size and
    type as its own header says (webdataset writes one per member, for a float mtime)."""
    pos = 0
    while True:
        match = _PAX_RECORD.match(data, pos)
        if not match:
            return not data[pos:].strip(b"\x00")
        length = int(match.group(1))
        if length == 0 or match.group(2) not in _PAX_IGNORED or data[match.start(1) + length - 1:match.start(1) + length] != b"\n":
            return False
        pos += length


def _block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _octal(buf: bytes, lo: int, hi: int) -> int:
    return int(buf[lo:hi].split(b"\x00", 1)[0].strip() or b"0", 8)


class _TarState:
    """What tarfile's header parsing (TarInfo.fromtarfile) needs of a TarFile, and how the member walk ended."""

    def __init__(self, blocks: _Blocks) -> None:
        self.fileobj = blocks
        self.encoding = tarfile.ENCODING
        self.errors = "surrogateescape"
        self.offset = 0  # where the next header starts
        self.pax_headers: dict[str, str] = {}  # global pax headers seen so far
        self.end: tarfile.HeaderError | None = None  # the header error that ended the walk


# A member as the walk yields it: (name, isdir, kind, size, data). kind is None for a regular file, else
# "symlink", "hard link", "special file"; data is the member's bytes when the fast scan read it with its header,
# else None (then `_member_data` reads it, before the next member, when it is readable). The fast scan's data
# is a view of the read buffer: valid until the next member is asked for.
Member = tuple[str, bool, "str | None", int, "bytes | memoryview | None"]


def readable(member: Member) -> bool:
    return member[2] is None and not member[1] and member[3] <= MAX_MEMBER_BYTES


def _member_data(state: _TarState, member: Member) -> bytes | memoryview:
    """The data of the member just walked to (read only when asked: tarfile reads it after the header too)."""
    if member[4] is not None:
        return member[4]
    data = state.fileobj.read(member[3])
    if len(data) != member[3]:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip_to_header(state: _TarState) -> None:
    """Skip the rest of the last member's data and padding, as tarfile does before reading a header."""
    blocks = state.fileobj
    if state.offset != blocks.tell():
        blocks.seek(state.offset - 1)
        if not blocks.read(1):
            raise tarfile.ReadError("unexpected end of data")


def _next_info(state: _TarState) -> tarfile.TarInfo | tuple[str, bytes, int] | None:
    """The next header, as tarfile.TarFile.next reads it in stream mode (same errors, same end), or None at
    the end of the members."""
    blocks = state.fileobj
    _skip_to_header(state)
    plain = None if state.pax_headers else _plain_header(blocks.peek(tarfile.BLOCKSIZE))
    if plain is not None and plain[1] == tarfile.XHDTYPE:  # a pax header for the next member: both or neither
        extended = _block(plain[2]) if plain[2] <= _PAX_FAST_BYTES else None
        after = blocks.peek(2 * tarfile.BLOCKSIZE + extended) if extended is not None else b""
        plain = _plain_header(after[tarfile.BLOCKSIZE + extended:]) if extended is not None else None
        if plain is None or plain[1] == tarfile.XHDTYPE or not _ignorable_pax(after[tarfile.BLOCKSIZE:tarfile.BLOCKSIZE + extended]):
            plain = None
        else:
            blocks.advance(tarfile.BLOCKSIZE + extended)
    if plain is not None:
        blocks.advance(tarfile.BLOCKSIZE)
        state.offset = blocks.tell() + (_block(plain[2]) if plain[1] == tarfile.REGTYPE else 0)
        return plain
    try:
        return tarfile.TarInfo.fromtarfile(state)  # type: ignore[arg-type]
    except tarfile.EOFHeaderError as err:
        state.end = err
    except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as err:
        if state.offset == 0:
            raise tarfile.ReadError(str(err)) from None
        state.end = err
    except tarfile.EmptyHeaderError as err:
        if state.offset == 0:
            raise tarfile.ReadError("empty file") from None
        state.end = err
    except tarfile.SubsequentHeaderError as err:
        raise tarfile.ReadError(str(err)) from None
    except zlib.error as err:
        raise tarfile.ReadError(f"zlib error: {err}") from None
    return None


def _tar_members(state: _TarState) -> Iterator[Member]:
    """Every member of the tar in order (its data: `_member_data`, before the next member). Runs of plain
    members already buffered come from `_scan` with their data; anything else from `_next_info`, one by one."""
    while True:
        fast = _scan(state)
        if fast:
            yield from fast
            continue
        info = _next_info(state)
        if info is None:
            return
        if isinstance(info, tuple):
            name, kind, size = info
            yield name, kind == tarfile.DIRTYPE, None, size, None
        else:
            special = None if info.isreg() else "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
            yield info.name, info.isdir(), special, info.size, None


# --- the fast scan: runs of plain members already in the buffer, read in one loop ---------------------------

# A header as Python's tarfile writes it, from byte 100 on: the number fields (mode, uid, gid, size, mtime,
# checksum) in canonical octal, the type byte and link name, ustar or GNU magic, the device numbers (octal or
# all NUL), no name prefix. tarfile reads such a header (GNU magic included) as `_plain_header` reads a ustar
# one: the same name, type and size. The checksum is checked apart (`_checksum_ok`).
_CANONICAL_HEADER = re.compile(
    rb"[0-7]{7}\x00[0-7]{7}\x00[0-7]{7}\x00([0-7]{11})\x00[0-7]{11}\x00([0-7]{6})\x00 "  # 100:156
    rb".{101}(?:ustar\x0000|ustar  \x00).{64}(?:[0-7]{7}\x00|\x00{8}){2}\x00",  # 156:257, 257:265, 265:329, 329:346
    re.DOTALL)
_SCAN_MIN = 8 * tarfile.BLOCKSIZE  # fewer bytes buffered than this: one member at a time
_known_pax: set[bytes] = set()  # pax headers with their data already found ignorable (webdataset repeats them)


def _checksum_ok(view: memoryview, at: int, stored: bytes) -> bool:
    """The header at `at` sums (its checksum field as 8 spaces) to its stored checksum, `stored` (6 octal digits
    then NUL and space): tarfile's unsigned check. Each half sums to at most 256 * 255 < 65521, so adler32's
    low half is its byte sum plus one."""
    total = (zlib.adler32(view[at:at + 256]) & 0xFFFF) + (zlib.adler32(view[at + 256:at + 512]) & 0xFFFF) - 2
    return int(stored, 8) == total - sum(stored) - 0x20 + 256


def _scan(state: _TarState) -> list[Member]:
    """The regular-file members (each alone, or after a pax header `_ignorable_pax` accepts) that lie whole in
    the buffer from the next header on, with their data, exactly as `_next_info` would read them (each header
    canonical: `_CANONICAL_HEADER`, `_checksum_ok`); [] when the next member is anything else or not whole in
    the buffer. Reads nothing from the stream."""
    if state.pax_headers:
        return []
    _skip_to_header(state)
    blocks = state.fileobj
    buf, start, end = blocks._buf, blocks._pos, blocks._end
    if end - start < _SCAN_MIN:
        return []
    view, match, known, encoding = blocks._view, _CANONICAL_HEADER.match, _known_pax, tarfile.ENCODING
    members: list[Member] = []
    at = start
    while at + 1024 <= end:
        head = at
        if buf[head + 156] == 0x78:  # "x": a pax header for the next member
            try:
                extended = int(buf[at + 124:at + 135], 8)  # checked below unless the header is a known one
            except ValueError:
                break
            if not 0 <= extended <= _PAX_FAST_BYTES:
                break
            head = at + 512 + ((extended + 511) & -512)
            if head + 512 > end:
                break
            pax = bytes(view[at:head])  # the header and its data: webdataset writes the same one again and again
            if pax not in known:
                fields = match(buf, at + 100)
                if fields is None or not _checksum_ok(view, at, fields[2]) or not _ignorable_pax(pax[512:]):
                    break
                if len(known) > 1024:
                    known.clear()
                known.add(pax)
        if buf[head + 156] != 0x30:  # "0": a regular file
            break
        fields = match(buf, head + 100)
        if fields is None:
            break
        size = int(fields[1], 8)
        after = head + 512 + ((size + 511) & -512)
        if size > MAX_MEMBER_BYTES or after > end or not _checksum_ok(view, head, fields[2]):
            break
        length = buf.find(b"\x00", head, head + 100)
        name = buf[head:head + (100 if length < 0 else length - head)].decode(encoding, "surrogateescape")
        members.append((name, False, None, size, view[head + 512:head + 512 + size]))  # a view: read it at once
        at = after
    if members:
        blocks.advance(at - start)
        state.offset = blocks.tell()
    return members


def _abnormal_end(state: _TarState) -> str | None:
    """Why a tar whose members were all read did not end properly, or None for a proper end."""
    end = state.end
    if isinstance(end, tarfile.EmptyHeaderError):
        return f"it ends at byte {state.offset} without the end-of-archive blocks (cut at a member boundary)"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"it is cut inside the member header at byte {state.offset}"
    if end is not None and not isinstance(end, tarfile.EOFHeaderError):
        return f"corrupt member header at byte {state.offset} ({end}); the rest of the tar cannot be read"
    # A proper end-of-archive block. Anything but zero padding after it means a header was zeroed.
    while True:
        chunk = state.fileobj.read(1 << 16)
        if not chunk:
            return None
        if chunk.count(0) != len(chunk):
            return f"data follows the end-of-archive block at byte {state.offset} (a zeroed header?); it is not read"


def _close(stream: IO[bytes]) -> str | None:
    try:
        stream.close()
        return None
    except Exception as err:  # noqa: BLE001 - a pipe's command failing (webdataset raises on its exit status)
        return f"closing the stream failed: {type(err).__name__}: {err}"


ImageSink = Callable[[memoryview], Any]


def iter_samples(shard: ShardRef, report: ReadReport | None = None, image_sink: ImageSink | None = None) -> Iterator[RawSample]:
    """Yield the samples a tar holds, in tar order (see the module docstring); `report` is filled in as it goes.

    `image_sink`, when given, receives each image member's data as a view of the read buffer, valid only during
    the call, and returns what the sample holds instead of the bytes (never None): a reader process places
    the image in shared memory there, so that no image is copied twice.

    Raises ShardReadError, naming the file, if the tar cannot be opened or no sample can be read from it.
    A tar that breaks part way yields the samples before the break, the last one carrying the truncation.
    """
    report = report if report is not None else ReadReport(url=shard.url)
    try:
        stream = open_shard(shard.url)
    except (OSError, ValueError) as err:
        raise ShardReadError(f"cannot open shard {shard.url}: {err}") from err
    current: RawSample | None = None
    current_stray = False  # a member without KEY.EXT form is a sample of its own
    seen: set[str] = set()
    broken: str | None = None
    closed = False
    try:
        try:
            # A pipe's command is checked at every read (webdataset): small reads keep what came before a failure.
            state = _TarState(_Blocks(_decompressed(stream), PIPE_CHUNK if shard.url.startswith("pipe:") else _Blocks.CHUNK))
            for member in _tar_members(state):
                name, isdir, special, size, data = member
                if isdir:
                    report.directories += 1
                    continue
                report.members += 1
                if not name.isascii():
                    name = _clean_text(name)
                if "/" in name:
                    key, ext = split_name(name)
                else:  # split_name's usual case, inline
                    dot = name.find(".")
                    key, ext = (name[:dot], name[dot + 1:].lower()) if dot > 0 else (None, "")
                stray = key is None
                if stray:
                    key = name
                if current is not None and (stray or current_stray or key != current.key or ext in current.members):
                    yield _finish(current)
                    report.samples += 1
                    current = None
                if current is None:
                    current, current_stray = RawSample(key=key), stray
                    if key in seen:
                        current.add_problem("duplicate key: an earlier sample in this tar has the same key")
                    seen.add(key)
                current.names.append(name)
                if special is not None:
                    current.add_problem(f"member {name[:100]!r} is a {special}, not a regular file")
                    current.members.setdefault(ext, b"")
                elif size > MAX_MEMBER_BYTES:
                    current.add_problem(f"member {name[:100]!r} is {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
                    current.members.setdefault(ext, b"")
                else:
                    if data is None:
                        data = _member_data(state, member)
                    if image_sink is not None and ext in IMAGE_EXTENSIONS:
                        current.members[ext] = image_sink(data if type(data) is memoryview else memoryview(data))
                    else:
                        current.members[ext] = data if type(data) is bytes else bytes(data)
                    data = member = None  # no view of the buffer outlives its member
            broken = _abnormal_end(state)
        except _READ_ERRORS as err:
            if current is None and report.samples == 0:
                raise ShardReadError(f"shard {shard.url} is not a readable tar: {type(err).__name__}: {err}") from err
            broken = f"{type(err).__name__}: {err}"
        closed = True
        closing = _close(stream)
        if closing is not None:
            broken = f"{broken}; {closing}" if broken else closing
        if broken is not None:
            report.truncated = f"{TRUNCATED}: {broken}"
        if current is not None:
            _finish(current)
            if broken is not None:  # the sample at the cut: its remaining members may be lost
                names = ", ".join(repr(n[:100]) for n in current.names[:5])
                current.problem = f"{report.truncated}; this is the last sample read and may be incomplete (members: {names})"
            yield current
            report.samples += 1
        elif broken is not None:  # only directory entries before the break (`current` is None only then)
            report.done = True
            raise ShardReadError(f"shard {shard.url}: {report.truncated}; no sample could be read")
        report.done = True
    finally:
        if not closed:
            _close(stream)


def count_samples(shard: ShardRef) -> ReadReport:
    """One full pass over the tar: how many samples it holds, and whether it is truncated."""
    report = ReadReport(url=shard.url)
    for _ in iter_samples(shard, report):
        pass
    return report

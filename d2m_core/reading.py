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
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from d2m_core.shards import ShardRef, open_shard

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")  # the seed's rename order: image="jpg;png;jpeg;webp"
MAX_MEMBER_BYTES = 256 * 2**20  # a larger member is skipped unread (a sample has a problem), bounding memory
TRUNCATED = "tar is truncated or corrupt"  # every truncation reason starts with this

# What a broken tar stream raises from tarfile, its decompressors or the file system underneath.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, OverflowError)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


class ShardReadError(RuntimeError):
    """The shard cannot be opened or is not a tar at all; names the file."""


@dataclass
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
    def image(self) -> bytes | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return self.members[ext]
        return None

    @property
    def text(self) -> str | None:
        data = self.members.get("txt")
        return None if data is None else data.decode("utf-8", errors="replace")

    def add_problem(self, reason: str) -> None:
        """Keep the first problem; later ones are appended, so none is lost."""
        self.problem = reason if self.problem is None else f"{self.problem}; {reason}"


@dataclass
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
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


_SURROGATE = re.compile("[\ud800-\udfff]")


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


def _parse_json(sample: RawSample) -> None:
    data = sample.members.get("json")
    if data is None:
        sample.add_problem("no json member, so no uid")
        return
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        sample.add_problem(f"json member is not valid JSON: {type(err).__name__}: {str(err)[:200]}")
        return
    if not isinstance(parsed, dict):
        sample.add_problem(f"json member is not an object (a JSON {type(parsed).__name__})")
        return
    try:
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


class _TarInfo(tarfile.TarInfo):
    """Remembers the header error that ended iteration: tarfile ends silently on all of them past offset 0."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as err:
            tarfile_.d2m_end = err  # type: ignore[attr-defined]
            raise


def _abnormal_end(tf: tarfile.TarFile) -> str | None:
    """Why a tar that tarfile read to its end did not end properly, or None for a proper end."""
    end = getattr(tf, "d2m_end", None)
    if isinstance(end, tarfile.EmptyHeaderError):
        return f"it ends at byte {tf.offset} without the end-of-archive blocks (cut at a member boundary)"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"it is cut inside the member header at byte {tf.offset}"
    if end is not None and not isinstance(end, tarfile.EOFHeaderError):
        return f"corrupt member header at byte {tf.offset} ({end}); the rest of the tar cannot be read"
    # A proper end-of-archive block. Anything but zero padding after it means a header was zeroed.
    while True:
        chunk = tf.fileobj.read(1 << 16)
        if not chunk:
            return None
        if chunk.count(0) != len(chunk):
            return f"data follows the end-of-archive block at byte {tf.offset} (a zeroed header?); it is not read"


def _close(stream: IO[bytes]) -> str | None:
    try:
        stream.close()
        return None
    except Exception as err:  # noqa: BLE001 - a pipe's command failing (webdataset raises on its exit status)
        return f"closing the stream failed: {type(err).__name__}: {err}"


def iter_samples(shard: ShardRef, report: ReadReport | None = None) -> Iterator[RawSample]:
    """Yield the samples a tar holds, in tar order (see the module docstring); `report` is filled in as it goes.

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
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
            for info in tf:
                tf.members = []  # streaming: do not keep every header
                if info.isdir():
                    report.directories += 1
                    continue
                report.members += 1
                name = _clean_text(info.name)
                key, ext = split_name(name)
                stray = key is None
                key = name if key is None else key
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
                if not info.isreg():
                    kind = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
                    current.add_problem(f"member {name[:100]!r} is a {kind}, not a regular file")
                    current.members.setdefault(ext, b"")
                elif info.size > MAX_MEMBER_BYTES:
                    current.add_problem(f"member {name[:100]!r} is {info.size} bytes, over the {MAX_MEMBER_BYTES}-byte limit")
                    current.members.setdefault(ext, b"")
                else:
                    current.members[ext] = tf.extractfile(info).read()
            broken = _abnormal_end(tf)
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

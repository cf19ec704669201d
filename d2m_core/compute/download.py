"""`d2m weights download`: fetch missing weights files from the sources their weights entries document.

Each file is written to `<name>.part` (resumed with an HTTP Range request after a dropped connection or an
interrupted command), then hashed and moved into place only once its sha256 matches the pin (or the release's
sha256 prefix, or the 8-hex-digit prefix in a torch.hub-style name such as `-0b549669.ckpt`). A mirror serving
every file as BASE_URL/<file name> can replace the sources (`--base-url`, $D2M_WEIGHTS_BASE_URL).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from d2m_core.compute.weights import weights_dir
from d2m_core.compute.weights_files import DEDUP_MODEL, DEDUP_REFERENCE_FILES, MODEL_FILES
from d2m_core.config import D2MConfig

BASE_URL_ENV = "D2M_WEIGHTS_BASE_URL"
ATTEMPTS = 4  # per file: the first request and up to three resumes
CHUNK = 1 << 20
TIMEOUT_S = 60.0
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^/]+$")
# The detoxify tokenizer folder, from the Hugging Face repo its weights entry names (no pins upstream).
HF_XLMR = "https://huggingface.co/FacebookAI/xlm-roberta-base/resolve/main"
FOLDER_FILES = {"nsfw-detoxify": [("xlm-roberta-base/config.json", f"{HF_XLMR}/config.json"),
                                  ("xlm-roberta-base/tokenizer.json", f"{HF_XLMR}/tokenizer.json"),
                                  ("xlm-roberta-base/sentencepiece.bpe.model", f"{HF_XLMR}/sentencepiece.bpe.model")]}


class DownloadError(RuntimeError):
    """A weights file that could not be fetched or did not verify; the message names it and what to do."""


@dataclass(frozen=True)
class Download:
    """One file to fetch: where it goes (relative to the weights folder), from where, and its pin."""

    model: str
    filename: str
    url: str | None  # None: no downloadable source; `source` says where to get it by hand
    sha256: str | None
    source: str
    sha256_prefix: str | None = None  # the only pin some releases give

    def expected_sha256(self) -> tuple[str | None, bool]:
        """(expected digest or prefix, whether it is only a prefix)."""
        if self.sha256:
            return self.sha256.lower(), False
        if self.sha256_prefix:
            return self.sha256_prefix.lower(), True
        match = _HASH_IN_NAME.search(self.filename)
        return (match.group(1), True) if match else (None, False)


def _url(source: str) -> str | None:
    return source if source.startswith(("http://", "https://")) else None


def planned_downloads(models: Sequence[str] | None, directory: Path, base_url: str | None = None,
                      data_files: Sequence[str] | None = None) -> list[Download]:
    """The files missing from `directory` for these models (all built-ins when None) and filter data files (all
    when None), from their entries: for a model with alternative files, the first with a downloadable source,
    unless one of them is already there."""
    from d2m_core.subsets.filter_files import DATA_FILES

    names = [m for m in models if m in MODEL_FILES] if models is not None else list(MODEL_FILES)  # custom: their own
    mirror = base_url.rstrip("/") if base_url else None
    plan: list[Download] = []
    for name in DATA_FILES if data_files is None else data_files:
        for spec in DATA_FILES[name]:
            there = (directory / spec.filename).exists() or (name == "wordnet" and (directory / "wordnet.zip").is_file())
            if not there:
                url = f"{mirror}/{spec.filename}" if mirror else _url(spec.source)
                plan.append(Download(f"filter data {name}", spec.filename, url, spec.sha256, spec.source))
    for name in names:
        groups = [MODEL_FILES[name]] + [[f] for f in (DEDUP_REFERENCE_FILES if name == DEDUP_MODEL else [])]
        for accepted in groups:
            if not accepted or any((directory / f.filename).is_file() for f in accepted):
                continue
            pick = next((f for f in accepted if mirror or _url(f.source)), accepted[0])
            url = f"{mirror}/{pick.filename}" if mirror else _url(pick.source)
            plan.append(Download(name, pick.filename, url, pick.sha256, pick.source,
                                 pick.sha256_prefix))
        for filename, url in FOLDER_FILES.get(name, []):
            if not (directory / filename).is_file():
                plan.append(Download(name, filename, f"{mirror}/{filename}" if mirror else url, None, url))
    return plan


def fetch(item: Download, directory: Path, *, progress: bool = True, attempts: int = ATTEMPTS,
          log: Callable[[str], None] | None = None) -> Path:
    """Download one file into `directory`, resuming `<file>.part`; verify, then move it into place."""
    if item.url is None:
        raise DownloadError(f"{item.model}: {item.filename} has no download source: get it from {item.source} "
                            f"and put it in {directory}")
    target = directory / item.filename
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(attempts):
        try:
            _stream_to(item.url, part, progress=progress, label=item.filename)
            break
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadError(f"{item.model}: {item.url} answered HTTP {err.code} {err.reason}; "
                                    f"get {item.filename} from {item.source}") from None
            last_error = f"{type(err).__name__}: {err}"
            if log is not None:
                log(f"{item.filename}: {last_error}; resuming from byte {part.stat().st_size if part.exists() else 0}")
            time.sleep(min(2.0 ** attempt * 0.5, 8.0))
    else:
        raise DownloadError(f"{item.model}: {item.url} failed {attempts} times ({last_error}); the partial file "
                            f"{part} is kept: run the command again to resume")
    actual = _sha256_file(part)
    expected, prefix_only = item.expected_sha256()
    if expected is not None and not (actual.startswith(expected) if prefix_only else actual == expected):
        part.unlink()
        raise DownloadError(f"{item.model}: {item.url} gave a file with sha256 {actual}, expected "
                            f"{expected + '...' if prefix_only else expected}: deleted; the source or mirror serves "
                            f"a corrupt or different file")
    os.replace(part, target)
    return target


def _stream_to(url: str, part: Path, *, progress: bool, label: str) -> None:
    """Append the rest of `url` to `part` (Range from its size); restart if the server ignores the Range."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part is complete
            return
        raise
    with response:
        resumed = response.status == 206
        mode = "ab" if resumed else "wb"
        remaining = response.headers.get("Content-Length")
        total = (have if resumed else 0) + int(remaining) if remaining is not None else None
        done = have if resumed else 0
        bar = _bar(label, total, done) if progress else None
        try:
            with part.open(mode) as fh:
                while block := response.read(CHUNK):
                    fh.write(block)
                    done += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)


def _bar(label: str, total: int | None, initial: int):  # noqa: ANN202 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_missing(config: D2MConfig | None, configured_dir: str | None, *, base_url: str | None = None,
                     out: IO[str] = sys.stdout) -> list[str]:
    """Fetch every missing file the config needs (everything `d2m weights` lists without one); one line per
    file to `out`. Returns the failure lines (empty: all there)."""
    from d2m_core.subsets.filter_files import files_for

    directory = weights_dir(configured_dir)
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    models = data_files = None
    if config is not None:
        models = list(config.models)
        data_files = sorted({n for f in config.filters for n in files_for(f.name, f.image_based_scale)
                             if n not in f.data_files})
    plan = planned_downloads(models, directory, base_url, data_files)
    if not plan:
        print(f"all weights files are in {directory}", file=out)
        return []
    failures: list[str] = []
    for item in plan:
        try:
            path = fetch(item, directory, log=lambda m: print(f"retry    {m}", file=out, flush=True))
            print(f"ok       {item.model}: {path}", file=out, flush=True)
        except DownloadError as err:
            failures.append(str(err))
            print(f"FAILED   {err}", file=out, flush=True)
    print(f"{len(plan) - len(failures)} of {len(plan)} file(s) fetched into {directory}"
          + (f"; {len(failures)} failed (see above)" if failures else ""), file=out)
    return failures

"""The fault corpus through the real engine: every sample of every shard is a row or a failure record."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from d2m_core.compute.engine import Engine, ShardResult
from d2m_core.compute.pipeline import build_engine
from d2m_core.config import parse_config
from d2m_core.reading import decoding
from d2m_core.reading.decoding import DecodeError, decode_image
from d2m_core.reading.loader import prepare_batch
from d2m_core.reading.readers import RawBatch
from d2m_core.reading.reading import TRUNCATED, RawSample, count_samples, iter_samples
from d2m_core.reading.shards import ShardRef
from d2m_core.reading.transforms import IMAGE_TRANSFORMS, ClipImageTransform
from d2m_core.testdata.faults import HUGE_SIZE, MANIFEST, FaultCase, make_fault_shards

CASES = ["undecodable", "odd-images", "bombs", "huge", "metadata", "captions", "layout", "truncated-mid-member",
         "truncated-between-members", "truncated-between-samples", "truncated-first-member", "corrupt-header",
         "zeroed-header", "empty", "only-directories", "zero-bytes", "not-a-tar", "cut-in-first-header"]
UNREADABLE = ["zero-bytes", "not-a-tar", "cut-in-first-header"]
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")  # PIL, on purpose


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FaultCase]:
    return make_fault_shards(tmp_path_factory.mktemp("faults"))


def _ref(case: FaultCase) -> ShardRef:
    return ShardRef(case.name, str(case.path))


def _run_order(corpus: dict[str, FaultCase]) -> list[str]:
    """Each unreadable tar is followed by a readable one, in the same run."""
    readable = [n for n in corpus if n not in UNREADABLE]
    order: list[str] = []
    for i, name in enumerate(readable):
        if i < len(UNREADABLE):
            order.append(UNREADABLE[i])
        order.append(name)
    return order


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 2, "batch_size": 4, "device": "cpu",
                           "input_tars": "unused.tar", "output_metadata_dir": "/unused"})
    return build_engine(config, ["clip_b32_features"])[0]


@pytest.fixture(scope="module")
def results(engine: Engine, corpus: dict[str, FaultCase]) -> dict[str, ShardResult]:
    order = _run_order(corpus)
    out = list(engine.run([_ref(corpus[n]) for n in order]))
    assert [r.shard.stem for r in out] == order
    return {r.shard.stem: r for r in out}


def test_the_corpus_has_every_case_and_a_manifest(corpus: dict[str, FaultCase]) -> None:
    assert list(corpus) == CASES
    manifest = json.loads((corpus["empty"].path.parent / MANIFEST).read_text(encoding="utf-8"))
    assert list(manifest) == CASES
    assert manifest["bombs"]["samples"][1]["reason"] == "decompression bomb"
    for case in corpus.values():
        assert case.path.name == f"{case.name}.tar" and case.path.exists()
        assert (case.shard_error is None) == (case.name not in UNREADABLE)


def test_make_fault_shards_is_deterministic(tmp_path: Path, corpus: dict[str, FaultCase]) -> None:
    again = make_fault_shards(tmp_path)
    for name in ("undecodable", "metadata", "layout", "truncated-mid-member"):
        assert again[name].path.read_bytes() == corpus[name].path.read_bytes()
        assert again[name].samples == corpus[name].samples


@pytest.mark.parametrize("name", [c for c in CASES if c not in UNREADABLE])
def test_every_sample_is_a_row_or_a_failure(name: str, corpus: dict[str, FaultCase],
                                            results: dict[str, ShardResult]) -> None:
    case, result = corpus[name], results[name]
    assert result.error is None
    assert result.keys == [s.key for s in case.processed], [s.what for s in case.samples]
    assert result.uids == [s.uid for s in case.processed]
    failures = result.stats.failures
    assert [(f.key, f.uid) for f in failures] == [(s.key, s.uid) for s in case.failed]
    for failure, expected in zip(failures, case.failed):
        assert expected.reason and expected.reason in failure.reason, (expected.what, failure.reason)
    # the invariant: what the reader says the tar holds == rows + failure records
    held = count_samples(_ref(case)).samples
    assert held == len(case.samples) == result.stats.samples_read
    assert result.stats.samples_written + result.stats.samples_failed == held
    if case.processed:
        image = result.outputs["oai-clip-vit-b32"]["image"]
        text = result.outputs["oai-clip-vit-b32"]["text"]
        assert image.shape == (len(case.processed), 512) and text.shape == (len(case.processed), 512)
        assert np.isfinite(image).all() and np.isfinite(text).all()
        assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=1e-4)
    # what the pipeline writes next must accept every key, uid and json (no lone surrogates left)
    pa.array(result.keys, pa.string()), pa.array(result.uids, pa.string())
    pa.array([json.dumps(j) for j in result.jsons], pa.string())
    json.dumps(result.stats.as_dict(), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize(("in_readers", "share"), [(False, 1.0), (True, 1.0), (True, 0.5)],
                         ids=["device-decode", "readers-decode", "readers-decode-half"])
def test_the_device_path_gives_the_corpus_the_same_rows_and_failures(engine: Engine, corpus: dict[str, FaultCase],
                                                                     results: dict[str, ShardResult], in_readers: bool,
                                                                     share: float) -> None:
    """The GPU fast path's code on the CPU device, decoding with nvJPEG's stand-in (torchvision) and PIL, in
    the reader processes (`gpu_decode: readers`), or half the batches each way (`reader_decode_share: 0.5`):
    every shard's rows, failures and reasons as the PIL path's."""
    order = _run_order(corpus)
    engine.decode_on_device, engine.decode_in_readers, engine.decode_share = True, in_readers, share
    try:
        out = list(engine.run([_ref(corpus[n]) for n in order]))
    finally:
        engine.decode_on_device = engine.decode_in_readers = False
        engine.decode_share = 1.0
    for got in out:
        ref = results[got.shard.stem]
        assert (got.error, got.keys, got.uids) == (ref.error, ref.keys, ref.uids), got.shard.stem
        assert [(f.key, f.reason) for f in got.stats.failures] == [(f.key, f.reason) for f in ref.stats.failures]


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_tar_fails_the_shard_naming_it_and_the_next_shard_completes(
        name: str, corpus: dict[str, FaultCase], results: dict[str, ShardResult]) -> None:
    case, result = corpus[name], results[name]
    assert result.error is not None and str(case.path) in result.error and case.shard_error in result.error
    assert result.stats.samples_written == result.stats.samples_failed == 0
    order = _run_order(corpus)
    following = results[order[order.index(name) + 1]]
    assert following.error is None and following.stats.samples_written > 0


def test_truncated_tars_keep_the_samples_before_the_cut(corpus: dict[str, FaultCase],
                                                        results: dict[str, ShardResult]) -> None:
    for name in ("truncated-mid-member", "truncated-between-members", "truncated-between-samples",
                 "truncated-first-member", "corrupt-header", "zeroed-header"):
        case, result = corpus[name], results[name]
        report = count_samples(_ref(case))
        assert report.truncated is not None and report.truncated.startswith(TRUNCATED) and report.done
        assert result.keys == [s.key for s in case.samples[:-1]]  # all before the cut
        assert result.stats.failures[-1].key == case.samples[-1].key
        assert result.stats.failures[-1].reason.startswith(TRUNCATED)


def test_empty_tars_hold_no_sample_and_are_not_errors(results: dict[str, ShardResult]) -> None:
    for name in ("empty", "only-directories"):
        assert results[name].error is None and results[name].stats.samples_read == 0


def _members(case: FaultCase) -> dict[str, RawSample]:
    return {s.key: s for s in iter_samples(_ref(case))}


def test_exif_orientation_is_not_applied(corpus: dict[str, FaultCase]) -> None:
    case = corpus["odd-images"]
    (expected,) = [s for s in case.samples if "EXIF" in s.what]
    data = _members(case)[expected.key].image
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif()[0x0112] == 6 and ImageOps.exif_transpose(img).size == (32, 64)
    assert decode_image(data).size == (64, 32)  # as stored, as webdataset's pilrgb decodes it


def test_odd_modes_decode_like_pil_convert_rgb(corpus: dict[str, FaultCase]) -> None:
    for raw in iter_samples(_ref(corpus["odd-images"])):
        ours = decode_image(raw.image)
        with Image.open(io.BytesIO(raw.image)) as img:
            img.load()
            reference = img.convert("RGB")  # the seed's 'pilrgb'
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(reference)), raw.key


def test_missing_txt_is_processed_when_no_model_reads_text(corpus: dict[str, FaultCase]) -> None:
    case = corpus["metadata"]
    (expected,) = [s for s in case.samples if s.reason == "no txt member"]
    raw = _members(case)[expected.key]
    assert raw.text is None and raw.problem is None
    batch = prepare_batch("metadata", RawBatch.of(_ref(case), [raw]), [ClipImageTransform()], needs_text=False, pin=False)
    assert batch.keys == [expected.key] and batch.uids == [expected.uid] and not batch.failures
    batch = prepare_batch("metadata", RawBatch.of(_ref(case), [raw]), [ClipImageTransform()], needs_text=True, pin=False)
    assert batch.failures[0].reason == "no txt member"


def test_captions_and_json_text_are_kept_as_valid_unicode(corpus: dict[str, FaultCase]) -> None:
    samples = list(iter_samples(_ref(corpus["captions"])))
    texts = {s.what: raw.text for s, raw in zip(corpus["captions"].samples, samples)}
    assert texts["empty caption"] == ""
    assert len(texts["20,000-character caption (tokens truncated to 77)"]) == 20_000
    assert texts["caption with invalid UTF-8 (decoded with U+FFFD)"] == "caf\ufffd au lait \ufffd\ufffd"
    assert texts["emoji caption"].startswith("🐶🐱")
    metadata = corpus["metadata"]
    (lone,) = [s for s in metadata.samples if "lone-surrogate" in s.what]
    assert _members(metadata)[lone.key].json["caption"] == "lone surrogate \ufffd here"
    (latin1,) = [s for s in corpus["layout"].samples if "Latin-1" in s.what]
    assert "\ufffd" in latin1.key and latin1.key in _members(corpus["layout"])


def test_huge_jpeg_is_drafted_within_tolerance_of_a_full_decode(corpus: dict[str, FaultCase]) -> None:
    data = next(iter(iter_samples(_ref(corpus["huge"])))).image
    drafted = decode_image(data)
    full = decode_image(data, draft_above=None)
    assert full.size == HUGE_SIZE and drafted.size == (HUGE_SIZE[0] // 4, HUGE_SIZE[1] // 4)
    assert min(drafted.size) >= decoding.DRAFT_MIN_SIDE
    for transform in IMAGE_TRANSFORMS.values():  # every model input: clip-aug, dedup-aug, faces-aug
        a, b = transform.prepare(full)[0].int(), transform.prepare(drafted)[0].int()
        diff = (a - b).abs().float()
        assert diff.max() <= 6 and diff.mean() <= 0.5, (transform.name, diff.max(), diff.mean())


BOMB_PROBE = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("decoding", sys.argv[1])
decoding = importlib.util.module_from_spec(spec); spec.loader.exec_module(decoding)
data = open(sys.argv[2], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decoding.decode_image(data)
    print("decoded")
except decoding.DecodeError as err:
    print(err)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_bombs_are_refused_before_allocating(corpus: dict[str, FaultCase], tmp_path: Path) -> None:
    case = corpus["bombs"]
    raws = _members(case)
    for expected in case.failed:
        path = tmp_path / f"{expected.key}.img"
        path.write_bytes(raws[expected.key].image)
        assert path.stat().st_size < 100_000  # a small file ...
        probe = subprocess.run([sys.executable, "-c", BOMB_PROBE, decoding.__file__, str(path)],
                               capture_output=True, text=True, timeout=60)
        reason, grown = probe.stdout.strip().splitlines()
        assert "decompression bomb" in reason, probe.stdout + probe.stderr
        assert float(grown) < 32, (expected.what, grown)  # ... never decoded: memory stays bounded


def test_unreadable_tars_raise_shard_read_error_naming_the_file(corpus: dict[str, FaultCase]) -> None:
    from d2m_core.reading.reading import ShardReadError

    for name in UNREADABLE:
        with pytest.raises(ShardReadError, match=corpus[name].path.name):
            count_samples(_ref(corpus[name]))


def test_decode_errors_are_decode_errors_only(corpus: dict[str, FaultCase]) -> None:
    case = corpus["undecodable"]
    raws = _members(case)
    for expected in case.failed:
        with pytest.raises(DecodeError, match=expected.reason):
            decode_image(raws[expected.key].image)


def test_layout_members_never_touch_the_file_system(corpus: dict[str, FaultCase], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tarfile.TarFile, "extract", lambda *a, **k: pytest.fail("extract called"))
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extractall called"))
    keys = [s.key for s in iter_samples(_ref(corpus["layout"]))]
    assert any(k.startswith("../../etc/") for k in keys) and any(k.startswith("/abs/") for k in keys)
    assert list(tmp_path.iterdir()) == []


from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gone as _gone, tar_samples
from d2m_core.compute.engine import Engine
from d2m_core.compute.pipeline import build_engine, device_preprocessing
from d2m_core.config import parse_config
from d2m_core.reading.loader import Batch, Loader, ShardEnd, ShardStart
from d2m_core.reading.shards import ShardRef
from d2m_core.reading.transforms import ClipImageTransform


def _refs(shard_dir: Path) -> list[ShardRef]:
    return [ShardRef(s, str(shard_dir / f"{s}.tar")) for s in ("00000", "00001")]


def test_loader_brackets_shards_and_keeps_a_last_batch_of_one(shard_dir: Path) -> None:
    items = list(Loader(_refs(shard_dir), batch_size=4, transforms=[ClipImageTransform()], needs_text=True, nworkers=2,
                        readers=1))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["ShardStart", "Batch", "Batch", "Batch", "ShardEnd"] * 2
    batches = [i for i in items if isinstance(i, Batch)]
    assert [b.samples_read for b in batches] == [4, 4, 1, 4, 4, 1]
    assert batches[-1].images["clip-aug"].shape == (1, 3, 224, 224)
    assert batches[1].failures[0].key == "000000004" and "cannot decode" in batches[1].failures[0].reason
    assert isinstance(items[0], ShardStart) and isinstance(items[4], ShardEnd)


def engine_config():
    return parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 2, "batch_size": 4, "device": "cpu",
                         "input_tars": "unused.tar", "output_metadata_dir": "/unused"})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_engine(engine_config(), ["clip_b32_features"])[0]


def test_one_pass_gives_aligned_unit_norm_features_and_records_failures(engine: Engine, shard_dir: Path) -> None:
    progress = []
    results = list(engine.run(_refs(shard_dir), progress.append))
    assert [p.shards_done for p in progress] == [1, 2]
    first, second = results
    expected_keys = [s["key"] for s in tar_samples(shard_dir / "00000.tar") if s["key"] != "000000004"]
    assert first.keys == expected_keys
    assert first.uids == [s["json"]["uid"] for s in tar_samples(shard_dir / "00000.tar") if s["key"] != "000000004"]
    assert first.stats.samples_read == 9 and first.stats.samples_written == 8 and first.stats.samples_failed == 1
    failure = first.stats.failures[0]
    assert failure.key == "000000004" and failure.uid is not None and "cannot decode" in failure.reason
    for result, rows in ((first, 8), (second, 9)):
        out = result.outputs["oai-clip-vit-b32"]
        assert out["image"].shape == (rows, 512) and out["text"].shape == (rows, 512)
        assert out["image"].dtype == np.float32
        assert np.allclose(np.linalg.norm(out["image"], axis=1), 1, atol=1e-5)
        assert np.allclose(np.linalg.norm(out["text"], axis=1), 1, atol=1e-5)
        # the model time split where the engine thread spends it (issuing, waiting for the device), and its CPU
        timings = result.stats.timings
        assert 0 < timings["dispatch_s"] and 0 <= timings["sync_s"] and 0 < timings["engine_cpu_s"]
        assert timings["dispatch_s"] + timings["sync_s"] <= timings["model_s"]


def test_rows_do_not_depend_on_batching(engine: Engine, shard_dir: Path) -> None:
    ref = _refs(shard_dir)[1]
    batched = next(engine.run([ref])).outputs["oai-clip-vit-b32"]["image"]
    engine.batch_size = 1
    try:
        single = next(engine.run([ref])).outputs["oai-clip-vit-b32"]["image"]
    finally:
        engine.batch_size = 4
    assert np.allclose(batched, single, atol=1e-4)


def test_unreadable_shard_is_reported_and_others_complete(engine: Engine, shard_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"garbage" * 100)
    results = list(engine.run([ShardRef("broken", str(bad)), _refs(shard_dir)[1]]))
    assert results[0].error is not None and "broken.tar" in results[0].error
    assert results[1].error is None and results[1].stats.samples_written == 9


class _Stub:
    """Carries a model's declared inputs; records what it is called with."""

    def __init__(self, name, raw_inputs, preprocessors, dependencies=()):
        self.name, self.raw_inputs, self.preprocessors = name, raw_inputs, preprocessors
        self.dependencies, self.to_device, self.output_fields, self.calls = list(dependencies), True, {"x": 0}, []

    def __call__(self, *inputs):
        self.calls.append(inputs)
        first = inputs[0][0] if isinstance(inputs[0], tuple) else inputs[0]  # a dependency's output tuple
        return (torch.zeros(len(first)),)


def test_one_decode_and_one_preprocessing_per_distinct_transform(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import d2m_core.reading.loader as loader

    decodes = []
    real = loader.decode_image
    monkeypatch.setattr(loader, "decode_image", lambda data: decodes.append(1) or real(data))
    a = _Stub("a", ["image", "text"], ["clip-aug", "clip-tokens"])
    b = _Stub("b", ["image", "text", "image"], ["clip-aug", "clip-tokens", "dedup-aug"])
    c = _Stub("c", ["text"], ["identity"])
    engine = Engine({"b": b, "a": a, "c": c}, device=torch.device("cpu"), dtype=torch.float32, batch_size=4, nworkers=1)
    assert [t.name for t in engine.image_transforms] == ["clip-aug", "dedup-aug"]
    assert list(engine.text_preprocessors) == ["clip-tokens", "identity"]
    (result,) = engine.run(_refs(shard_dir)[1:])
    assert len(decodes) == 9 and result.stats.samples_written == 9
    assert a.calls[0][0] is b.calls[0][0] and a.calls[0][1] is b.calls[0][1]  # the same tensors, prepared once
    assert isinstance(c.calls[0][0], list) and len(c.calls[0][0]) == 4


def test_dependencies_run_first_and_get_their_outputs(shard_dir: Path) -> None:
    base = _Stub("base", ["image"], ["clip-aug"])
    head = _Stub("head", [], [], dependencies=["base"])
    engine = Engine({"head": head, "base": base}, device=torch.device("cpu"), dtype=torch.float32, batch_size=9, nworkers=1)
    assert engine.order == ["base", "head"]
    next(engine.run(_refs(shard_dir)[1:]))
    assert isinstance(head.calls[0][0], tuple) and head.calls[0][0][0].shape == (9,)


def test_models_that_wait_for_the_device_are_issued_last(shard_dir: Path) -> None:
    """A model whose call waits for the device (faces: its boxes are made on the host) goes after the others
    (its dependencies before it), so the device has their work queued; the outputs keep the models' order."""
    calls: list[str] = []
    stubs = {n: _Stub(n, ["image"], ["clip-aug"]) for n in ("faces", "clip", "dedup")}
    stubs["head"] = _Stub("head", [], [], dependencies=["faces"])
    stubs["faces"].waits_for_device = True
    for name, stub in stubs.items():
        stub.calls = _Recorder(calls, name)
    engine = Engine(stubs, device=torch.device("cpu"), dtype=torch.float32, batch_size=9, nworkers=1)
    assert engine.order == ["faces", "clip", "dedup", "head"]
    assert engine.issue_order == ["clip", "dedup", "faces", "head"]
    result = next(engine.run(_refs(shard_dir)[1:]))
    assert calls == ["clip", "dedup", "faces", "head"] and list(result.outputs) == engine.order


class _Recorder(list):
    """A stub's `calls`, also noting the order models are called in."""

    def __init__(self, order: list[str], name: str) -> None:
        super().__init__()
        self.order, self.name = order, name

    def append(self, inputs: object) -> None:
        self.order.append(self.name)
        super().append(inputs)


def test_progress_is_reported_while_a_shard_runs(engine: Engine, shard_dir: Path) -> None:
    events = []
    list(engine.run(_refs(shard_dir), events.append, progress_every_s=0.0))
    running = [e for e in events if not e.finished]
    assert [e.samples for e in running if e.shard == "00001"] == [4, 8, 9]
    finished = [(e.shard, e.shards_done) for e in events if e.finished]  # in the order shards complete
    assert [done for _, done in finished] == [1, 2] and sorted(shard for shard, _ in finished) == ["00000", "00001"]


def _started_ahead(monkeypatch: pytest.MonkeyPatch) -> list[Loader]:
    """The loaders `Engine.read_ahead` starts, as it starts them."""
    started: list[Loader] = []
    read_ahead = Engine.read_ahead
    monkeypatch.setattr(Engine, "read_ahead", lambda self, shards: started.append(read_ahead(self, shards)) or started[-1])
    return started


def test_readers_started_before_the_model_build_feed_the_run_over_those_shards(engine: Engine, shard_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from d2m_core.compute import pipeline

    refs = _refs(shard_dir)
    started = _started_ahead(monkeypatch)
    monkeypatch.setattr(pipeline, "readers_tokenize", lambda device: True)  # as on CUDA: the readers start slowly
    running: list[bool] = []
    load_models = pipeline.load_models
    monkeypatch.setattr(pipeline, "load_models", lambda *a: running.append(not _gone(started[0].reader_pids, 0)) or load_models(*a))
    early, _ = build_engine(engine_config(), ["clip_b32_features"], read_ahead=refs)
    pids = started[0].reader_pids
    assert running == [True] and len(pids) == 2  # reading while the models built
    results = list(early.run(refs))  # takes the readers over
    assert _gone(pids)
    for new, ref in zip(results, engine.run(refs)):
        assert new.keys == ref.keys and len(new.keys) > 0
        np.testing.assert_array_equal(new.outputs["oai-clip-vit-b32"]["image"], ref.outputs["oai-clip-vit-b32"]["image"])
    other, _ = build_engine(engine_config(), ["clip_b32_features"], read_ahead=refs)
    other.close()  # never run: close stops them
    assert _gone(started[1].reader_pids)
    monkeypatch.setattr(pipeline, "readers_tokenize", lambda device: False)
    build_engine(engine_config(), ["clip_b32_features"], read_ahead=refs)
    assert len(started) == 2  # readers that start fast are not started ahead


def test_a_failed_model_build_stops_the_readers_it_started(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from d2m_core.compute import pipeline

    started = _started_ahead(monkeypatch)
    monkeypatch.setattr(pipeline, "readers_tokenize", lambda device: True)

    def fail(*args: object) -> None:
        raise RuntimeError("weights vanished")

    monkeypatch.setattr(pipeline, "load_models", fail)
    with pytest.raises(RuntimeError, match="weights vanished"):
        build_engine(engine_config(), ["clip_b32_features"], read_ahead=_refs(shard_dir))
    assert len(started) == 1 and _gone(started[0].reader_pids)


@pytest.mark.parametrize("on_device", [False, True], ids=["pil", "device-decode"])
def test_tokenizing_in_the_readers_gives_the_same_rows_and_text_features(engine: Engine, shard_dir: Path,
                                                                         on_device: bool) -> None:
    refs = _refs(shard_dir)
    engine.decode_on_device = on_device
    try:
        reference = list(engine.run(refs))
        engine.text_in_readers = True  # what GPU runs do
        batches = [b for b in engine.loader(refs) if isinstance(b, Batch)]
        got = list(engine.run(refs))
    finally:
        engine.decode_on_device = engine.text_in_readers = False
    tokenize = engine.text_preprocessors["clip-tokens"]
    assert sum(len(b) for b in batches) == 17 and any(b.failures for b in batches)  # the undecodable image dropped
    for batch in batches:  # the readers' rows follow the samples kept
        assert torch.equal(batch.text_inputs["clip-tokens"], tokenize(batch.texts))
    for ref, new in zip(reference, got):
        assert new.keys == ref.keys and len(new.keys) > 0
        np.testing.assert_allclose(new.outputs["oai-clip-vit-b32"]["text"], ref.outputs["oai-clip-vit-b32"]["text"],
                                   atol=1e-6)


@pytest.mark.parametrize("in_readers", [False, True], ids=["device-decode", "readers-decode"])
def test_decoding_on_the_device_gives_the_same_rows_and_features(engine: Engine, shard_dir: Path, in_readers: bool) -> None:
    refs = _refs(shard_dir)
    reference = list(engine.run(refs))
    engine.decode_on_device = True  # the GPU fast path's code, run on the CPU device
    engine.decode_in_readers = in_readers  # `gpu_decode: readers`: PIL's pixels from the readers, resized here
    try:
        fast = list(engine.run(refs))
    finally:
        engine.decode_on_device = engine.decode_in_readers = False
    for ref, got in zip(reference, fast):
        assert got.keys == ref.keys and got.uids == ref.uids
        assert [(f.key, f.reason) for f in got.stats.failures] == [(f.key, f.reason) for f in ref.stats.failures]
        a, b = ref.outputs["oai-clip-vit-b32"]["image"], got.outputs["oai-clip-vit-b32"]["image"]
        assert (a * b).sum(1).min() > 0.999


@pytest.mark.parametrize(("gpu_decode", "device", "transforms", "expected"), [
    ("auto", "cuda", ["clip-aug"], True),
    ("auto", "cpu", ["clip-aug"], False),
    ("on", "cpu", ["clip-aug", "dedup-aug"], True),
    ("readers", "cpu", ["clip-aug"], True),
    ("on", "cuda", ["clip-aug", "my-plugin-aug"], False),  # a plugin's transform: the PIL path
    ("off", "cuda", ["clip-aug"], False),
    ("auto", "cuda", [], False),  # text only: nothing to decode
])
def test_gpu_decode_chooses_where_images_are_decoded_and_resized(gpu_decode: str, device: str, transforms: list[str],
                                                                  expected: bool) -> None:
    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 4, "device": "cpu",
                           "input_tars": "x.tar", "output_metadata_dir": "out", "gpu_decode": gpu_decode})
    assert device_preprocessing(config, torch.device(device), transforms) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_decode", ["on", "readers", "off"])
def test_issuing_a_batch_on_cuda_never_waits_for_the_device(shard_dir: Path, gpu_decode: str) -> None:
    """What the engine's thread does for a batch (inputs up, every model issued, outputs' copies back) makes no
    call that waits for the device, so the next batch is issued while this one runs: torch's sync debug mode
    raises on any (a copy from pageable memory, a tensor made from a list, an item())."""
    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 2, "batch_size": 4, "device": 0,
                           "precision": "bf16", "gpu_decode": gpu_decode, "input_tars": "unused.tar",
                           "output_metadata_dir": "/unused"})
    engine = build_engine(config, ["clip_b32_features"])[0]
    engine.text_in_readers = True
    batches = [b for b in engine.loader(_refs(shard_dir)) if isinstance(b, Batch) and len(b)]
    engine.forward(batches[0])  # warm-up: lazy initialisation, cached constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        issued = [engine.issue(batch) for batch in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = [engine.collect(i)["oai-clip-vit-b32"]["image"] for i in issued]
    assert [len(r) for r in rows] == [len(b) for b in batches[1:]] and all(np.isfinite(r).all() for r in rows)

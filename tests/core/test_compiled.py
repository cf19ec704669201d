"""Fixed-size batches (d2m_core.compute.compiled): `torch_compile: true` through torch.compile on the CPU, and
`cuda_graphs: true` (its capture and replay on CUDA only)."""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from d2m_core.compute.compiled import StaticBatch, StaticInput, _replace, _resolve, bucket, buckets, static_models
from d2m_core.compute.models.clip import OaiClipVitB32
from d2m_core.compute.models.isc import IscFtV107
from d2m_core.compute.weights import resolve_weights
from d2m_core.config import D2MConfig

CUDA = torch.cuda.is_available()


def test_bucket_pads_up_to_the_next_halving_of_the_batch_size() -> None:
    assert [bucket(n, 512) for n in (512, 511, 272, 257, 256, 129, 128, 3, 1)] == [512, 512, 512, 512, 256, 256, 128, 4, 1]
    assert bucket(600, 512) == 600  # larger than a batch: as it is (the loader never makes one)
    assert buckets(512) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert buckets(100) == [100, 50, 25, 12, 6, 3, 1]
    assert {bucket(n, 100) for n in range(1, 101)} == set(buckets(100))  # a graph for every size a batch pads to


class Tiny:
    def __init__(self, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.static_parts = {"net": StaticInput((3, 12, 12), memory_format)}
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.net[1].running_mean.uniform_(-1, 1)
        self.net[1].running_var.uniform_(0.5, 2)
        self.net.eval()


def _batch(rows: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(rows, 3, 12, 12, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_parts_give_the_eager_outputs_for_short_batches_without_new_graphs(memory_format: torch.memory_format) -> None:
    model = Tiny(memory_format)
    eager = Tiny().net
    torch._dynamo.reset()
    counters.clear()
    seconds = static_models({"tiny": model}, batch_size=8, device=torch.device("cpu"), dtype=torch.float32,
                            compile=True, graphs=False)
    assert list(seconds) == ["tiny"] and isinstance(model.net, StaticBatch)
    assert counters["stats"]["unique_graphs"] == 1  # compiled at build, for the full batch
    x = _batch(8)  # made outside inference mode, as the engine's inputs are; the models run in it
    with torch.inference_mode():
        for rows in (8, 7, 5):  # 7 and 5 are padded to 8: the graph compiled at build
            out = model.net(x[:rows])
            assert out.shape == (rows, 8)
            torch.testing.assert_close(out, eager(x[:rows]), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
        torch.testing.assert_close(model.net(x[:3]), eager(x[:3]), rtol=1e-4, atol=1e-5)  # padded to 4: one more
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("cls", [IscFtV107, OaiClipVitB32])
def test_the_parts_models_name_are_whole_networks(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2M_RANDOM_WEIGHTS", "1")
    model = cls("cpu", weights=resolve_weights(cls.name, cls.weights_files, Path("/nonexistent")))
    for path, part in cls.static_parts.items():
        owner, leaf = _resolve(model, path)
        with torch.inference_mode():
            out = getattr(owner, leaf)(torch.zeros((2, *part.shape), dtype=part.dtype or torch.float32))
        assert out.shape[0] == 2 and out.ndim == 2  # (B, features): one network, whole
    assert [p for p, part in cls.static_parts.items() if part.compile] == ["model" if cls is IscFtV107 else "model.visual"]


def test_a_method_replaced_by_its_static_batch_serves_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP's text tower is a method (`encode_text`): the StaticBatch put in its place is what the model calls,
    short batches padded, the outputs the eager ones."""
    monkeypatch.setenv("D2M_RANDOM_WEIGHTS", "1")
    model = OaiClipVitB32("cpu", weights=resolve_weights(OaiClipVitB32.name, OaiClipVitB32.weights_files, Path("/nonexistent")))
    image = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(1, 49000, (3, 77), generator=torch.Generator().manual_seed(3))
    tokens[:, 10] = 49407  # the end of text, where CLIP pools
    eager = model(image, tokens)
    wrapped = StaticBatch(model.model.encode_text, 4, compile=False)
    _replace(model.model, "encode_text", wrapped)
    assert model.model.encode_text is wrapped
    calls = []
    wrapped.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    for got, expected in zip(model(image, tokens), eager):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert calls == [3]  # through the wrapper, which padded to 4 inside


def test_cuda_graphs_need_cuda(caplog: pytest.LogCaptureFixture) -> None:
    model = Tiny()
    with caplog.at_level(logging.WARNING):
        seconds = static_models({"tiny": model}, batch_size=8, device=torch.device("cpu"), dtype=torch.float32,
                                compile=False, graphs=True)
    assert seconds == {} and isinstance(model.net, nn.Sequential)  # left as it is
    assert "cuda_graphs: true needs a CUDA device" in caplog.text


def test_a_part_that_cannot_be_captured_runs_without_a_graph(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A network that cannot be captured (one that waits for the device inside, say) still runs, padded,
    without a graph, and the warning names it: results are not lost to an optimisation."""
    def refuse(self: StaticBatch, *args: object) -> None:
        self.graphs[8] = ("half-made", None, None)  # what a capture that failed part way may leave
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticBatch, "capture", refuse)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)  # this machine has no CUDA device
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, eager = Tiny(), Tiny().net
    with caplog.at_level(logging.WARNING):
        static_models({"tiny": model}, batch_size=8, device=torch.device("cuda"), dtype=torch.float32,
                      compile=False, graphs=True)
    assert "tiny: net could not be captured as a CUDA graph, so it runs without one: RuntimeError" in caplog.text
    assert isinstance(model.net, StaticBatch) and model.net.graphs == {}
    with torch.inference_mode():
        torch.testing.assert_close(model.net(_batch(5)), eager(_batch(5)), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_the_eager_outputs_for_every_batch_size() -> None:
    model = Tiny()
    model.net.cuda()
    eager = Tiny().net.cuda()
    seconds = static_models({"tiny": model}, batch_size=8, device=torch.device("cuda"), dtype=torch.float32,
                            compile=False, graphs=True)
    assert list(seconds) == ["tiny"] and sorted(model.net.graphs) == [1, 2, 4, 8]
    x = _batch(8, "cuda")
    with torch.inference_mode():
        for rows in (8, 5, 3, 2, 1):
            out = model.net(x[:rows])
            assert out.shape == (rows, 8)
            torch.testing.assert_close(out, eager(x[:rows]), rtol=1e-4, atol=1e-5)
        first = model.net(x[:2])
        model.net(x[2:4])  # the next replay does not change an output already handed on
        torch.testing.assert_close(first, eager(x[:2]), rtol=1e-4, atol=1e-5)


def test_torch_compile_and_cuda_graphs_are_off_unless_asked(tmp_path: Path) -> None:
    base = dict(models=["oai-clip-vit-b32"], nworkers=1, batch_size=4, device="cpu", input_tars=str(tmp_path / "*.tar"),
                output_metadata_dir=str(tmp_path / "out"))
    assert D2MConfig(**base).torch_compile is False and D2MConfig(**base).cuda_graphs is False
    assert D2MConfig(**base, torch_compile=True).torch_compile is True
    assert D2MConfig(**base, cuda_graphs=True).cuda_graphs is True

"""`torch_compile: true` (d2m_core.compute.compiled): padded fixed-size batches through torch.compile, on the CPU."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from d2m_core.compute.compiled import StaticBatch, _resolve, bucket, compile_models
from d2m_core.compute.models.clip import OaiClipVitB32
from d2m_core.compute.models.isc import IscFtV107
from d2m_core.compute.weights import resolve_weights
from d2m_core.config import D2MConfig


def test_bucket_pads_up_to_the_next_halving_of_the_batch_size() -> None:
    assert [bucket(n, 512) for n in (512, 511, 272, 257, 256, 129, 128, 3, 1)] == [512, 512, 512, 512, 256, 256, 128, 4, 1]
    assert bucket(600, 512) == 600  # larger than a batch: as it is (the loader never makes one)


class Tiny:
    def __init__(self, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.compiled_parts = {"net": ((3, 12, 12), memory_format)}
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.net[1].running_mean.uniform_(-1, 1)
        self.net[1].running_var.uniform_(0.5, 2)
        self.net.eval()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_parts_give_the_eager_outputs_for_short_batches_without_new_graphs(memory_format: torch.memory_format) -> None:
    model = Tiny(memory_format)
    eager = Tiny().net
    torch._dynamo.reset()
    counters.clear()
    seconds = compile_models({"tiny": model}, batch_size=8, device=torch.device("cpu"), dtype=torch.float32)
    assert list(seconds) == ["tiny"] and isinstance(model.net, StaticBatch)
    assert counters["stats"]["unique_graphs"] == 1  # compiled at build, for the full batch
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))  # made outside inference mode, as
    with torch.inference_mode():  # the engine's inputs are; the models run in it
        for rows in (8, 7, 5):  # 7 and 5 are padded to 8: the graph compiled at build
            out = model.net(x[:rows])
            assert out.shape == (rows, 8)
            torch.testing.assert_close(out, eager(x[:rows]), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
        torch.testing.assert_close(model.net(x[:3]), eager(x[:3]), rtol=1e-4, atol=1e-5)  # padded to 4: one more
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("cls", [IscFtV107, OaiClipVitB32])
def test_the_parts_models_name_are_their_image_networks(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2M_RANDOM_WEIGHTS", "1")
    model = cls("cpu", weights=resolve_weights(cls.name, cls.weights_files, Path("/nonexistent")))
    for path, (shape, _) in cls.compiled_parts.items():
        owner, leaf = _resolve(model, path)
        network = getattr(owner, leaf)
        assert isinstance(network, nn.Module)
        with torch.inference_mode():
            out = network(torch.zeros((2, *shape)))
        assert out.shape[0] == 2 and out.ndim == 2  # (B, features): one image network, whole


def test_torch_compile_is_off_unless_asked(tmp_path: Path) -> None:
    base = dict(models=["oai-clip-vit-b32"], nworkers=1, batch_size=4, device="cpu", input_tars=str(tmp_path / "*.tar"),
                output_metadata_dir=str(tmp_path / "out"))
    assert D2MConfig(**base).torch_compile is False
    assert D2MConfig(**base, torch_compile=True).torch_compile is True

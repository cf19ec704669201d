"""faces-scrfd10g with the seed's checkpoint format: exact loading, and d2m's batched path against a reference
computation written here from the seed's documented pre- and post-processing (one image at a time):
pad white to a centred square, bicubic 224, (p - 127.5) / 127.5, the network, anchor-centre decode, clip to the
frame, score > 0.3, NMS at IoU 0.45, boxes in [0, 1] of the unpadded image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import nms

from d2m_core.compute.models import faces
from d2m_core.compute.models.faces import Scrfd10G
from d2m_core.compute.models.scrfd_net import STRIDES, ScrfdNet, random_scrfd_net
from d2m_core.compute.weights import ResolvedWeights, WeightsError, WeightsFile, resolve_weights, sha256_of
from d2m_core.reading.transforms import FacesImageTransform

SIZE = 224
PINNED = Scrfd10G.weights_files[0]


def fixed_net() -> ScrfdNet:
    """Fixed random weights, score bias set so that a few anchors per image pass 0.3."""
    net = random_scrfd_net(7)
    with torch.no_grad():
        net.bbox_head.stride_cls["0"].weight.mul_(2.0)
        net.bbox_head.stride_cls["0"].bias.fill_(-4.5)
        for scale, value in zip(net.bbox_head.scales, (1.0, 0.8, 1.2)):
            scale.scale.fill_(value)
    return net


def write_checkpoint(net: ScrfdNet, path: Path) -> Path:
    """The seed's format: torch.load(path)["state_dict"] (plus mmcv's "meta")."""
    torch.save({"meta": {"epoch": 640, "mmdet_version": "2.7.0"}, "state_dict": net.state_dict()}, path)
    return path


def pin(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Pin this test checkpoint's sha256 in place of the release's."""
    spec = WeightsFile(PINNED.filename, PINNED.format, sha256_of(path), PINNED.source, PINNED.input_norm)
    monkeypatch.setattr(Scrfd10G, "weights_files", [spec, *Scrfd10G.weights_files[1:]])


def resolve(directory: Path, monkeypatch: pytest.MonkeyPatch) -> ResolvedWeights:
    monkeypatch.delenv("D2M_RANDOM_WEIGHTS", raising=False)
    return resolve_weights(Scrfd10G.name, Scrfd10G.weights_files, directory)


def images() -> list[Image.Image]:
    """Landscape, portrait and square images with shapes on them (made here, deterministic)."""
    rng = np.random.default_rng(3)
    out = []
    for size in ((320, 200), (150, 260), (224, 224), (500, 90)):
        base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(6, 40))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(img)
    return out


def reference_boxes(net: ScrfdNet, image: Image.Image) -> list[list[float]]:
    """The seed's documented processing of one image, written independently of d2m's code."""
    w, h = image.size
    side = max(w, h)
    left, top = int((side - w) / 2), int((side - h) / 2)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, (left, top))
    pad = np.array([left, top, side - w - left, side - h - top], np.float32) / side
    resized = canvas.resize((SIZE, SIZE), Image.BICUBIC)
    x = (torch.from_numpy(np.asarray(resized, np.float32)).permute(2, 0, 1)[None] - 127.5) / 127.5
    with torch.no_grad():
        outputs = net(x)
    scores, boxes = [], []
    for level, stride in enumerate(STRIDES):
        n = SIZE // stride
        s = outputs[level][0, :, 0]
        d = outputs[len(STRIDES) + level][0] * stride
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float().mul(stride).expand(-1, 2, 2).reshape(-1, 2)
        b = torch.cat([centres - d[:, :2], centres + d[:, 2:]], 1).clamp(0, SIZE)
        scores.append(s)
        boxes.append(b)
    s, b = torch.cat(scores), torch.cat(boxes)
    keep = s > 0.3
    s, b = s[keep], b[keep]
    b = b[nms(b, s, 0.45)]
    out = []
    for x1, y1, x2, y2 in b.tolist():
        fx = lambda v: min(max((v - pad[0] * SIZE) / ((1 - pad[0] - pad[2]) * SIZE), 0.0), 1.0)  # noqa: E731
        fy = lambda v: min(max((v - pad[1] * SIZE) / ((1 - pad[1] - pad[3]) * SIZE), 0.0), 1.0)  # noqa: E731
        out.append([fx(x1), fy(y1), fx(x2), fy(y2)])
    return out


def d2m_boxes(model: Scrfd10G, batch: list[Image.Image]) -> list[list[list[float]]]:
    """d2m's path: the faces-aug transform as the loader applies it, then the model on the whole batch."""
    transform = FacesImageTransform()
    prepared = [transform.prepare(img) for img in batch]
    pixels, padding = transform.finish(torch.stack([p for p, _ in prepared]), torch.stack([a for _, a in prepared]),
                                       torch.float32)
    (boxes,) = model((pixels, padding))
    return boxes


def compare(got: list[list[list[float]]], want: list[list[list[float]]]) -> dict[str, float | int]:
    """Boxes equal (|diff| <= 1e-5), within 0.01, and unmatched (greedy by distance, per image)."""
    equal = close = unmatched = 0
    worst = 0.0
    for g, w in zip(got, want):
        remaining = list(w)
        for box in g:
            if not remaining:
                unmatched += 1
                continue
            dist = [max(abs(a - b) for a, b in zip(box, r)) for r in remaining]
            i = int(np.argmin(dist))
            if dist[i] > 0.01:
                unmatched += 1
                continue
            worst = max(worst, float(dist[i]))
            equal += int(dist[i] <= 1e-5)
            close += 1
            remaining.pop(i)
        unmatched += len(remaining)
    return {"boxes": sum(map(len, want)), "equal": equal, "within_0.01": close, "unmatched": unmatched,
            "max_abs_diff": worst}


def test_seed_checkpoint_through_d2m_equals_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = fixed_net()
    path = write_checkpoint(net, tmp_path / "scrfd_10g.pt")
    pin(monkeypatch, path)
    weights = resolve(tmp_path, monkeypatch)
    assert weights.record.kind == "official" and weights.file.format == "scrfd-torch"
    model = Scrfd10G(torch.device("cpu"), weights=weights)
    assert model.backend == "onnxruntime" and (model.input_scale, model.input_shift) == (1.0, 0.0)  # (p-127.5)/127.5
    batch = images()
    want = [reference_boxes(net, img) for img in batch]
    assert sum(map(len, want)) >= 10 and all(len(w) < 60 for w in want)
    monkeypatch.setattr(faces, "export_scrfd_onnx", broken_export)
    in_torch = Scrfd10G(torch.device("cpu"), weights=weights)  # the fallback: the torch module itself
    assert in_torch.backend == "torch"
    for backend, model in (("onnxruntime", model), ("torch", in_torch)):
        got = d2m_boxes(model, batch)
        figures = compare(got, want)
        print(json.dumps({"kind": "faces_vs_reference", "backend": backend} | figures))
        assert figures["unmatched"] == 0 and figures["within_0.01"] == figures["boxes"]
        assert figures["max_abs_diff"] < 1e-4
        assert [len(g) for g in got] == [len(w) for w in want]


def broken_export(*args: object, **kwargs: object) -> None:
    raise RuntimeError("no exporter")


def test_loader_refuses_wrong_hash_and_missing_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = fixed_net()
    path = write_checkpoint(net, tmp_path / "scrfd_10g.pt")
    with pytest.raises(WeightsError, match="963570df5e0ebf6bb313239d0f9f3f0c096c1ff6937e8e28e45abad4d8b1d5c7"):
        resolve(tmp_path, monkeypatch)  # the release's pin: this file is not the release's
    state = net.state_dict()
    del state["bbox_head.stride_reg.0.weight"]
    torch.save({"state_dict": state}, path)
    pin(monkeypatch, path)
    with pytest.raises(WeightsError, match=r"1 missing keys \['bbox_head.stride_reg.0.weight'\]"):
        Scrfd10G(torch.device("cpu"), weights=resolve(tmp_path, monkeypatch))
    state = net.state_dict() | {"bbox_head.stride_kps.0.weight": torch.zeros(20, 80, 3, 3)}
    torch.save({"state_dict": state}, path)
    pin(monkeypatch, path)
    with pytest.raises(WeightsError, match=r"1 unexpected keys \['bbox_head.stride_kps.0.weight'\]"):
        Scrfd10G(torch.device("cpu"), weights=resolve(tmp_path, monkeypatch))
    torch.save(net.state_dict(), path)  # a bare state dict is not the seed's format
    pin(monkeypatch, path)
    with pytest.raises(WeightsError, match="'state_dict'"):
        Scrfd10G(torch.device("cpu"), weights=resolve(tmp_path, monkeypatch))


def test_seed_checkpoint_is_the_default_and_insightface_the_alternative() -> None:
    files = {f.filename: f for f in Scrfd10G.weights_files}
    assert list(files) == ["scrfd_10g.pt", "scrfd_10g_bnkps.onnx", "det_10g.onnx"]
    seed = files["scrfd_10g.pt"]
    assert seed.sha256 == "963570df5e0ebf6bb313239d0f9f3f0c096c1ff6937e8e28e45abad4d8b1d5c7"
    assert seed.source.endswith("dataset2metadata/releases/download/v0.1.0-alpha/scrfd_10g.pt")
    assert (seed.input_norm.mean, seed.input_norm.std) == (127.5, 127.5)
    assert {(f.input_norm.mean, f.input_norm.std) for f in Scrfd10G.weights_files[1:]} == {(127.5, 128.0)}


def test_a_cuda_device_without_onnxruntime_gpu_runs_the_network_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    assert faces.onnx_unusable(torch.device("cpu")) is None
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    reason = faces.onnx_unusable(torch.device("cuda", 0))
    assert reason is not None and "no CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert faces.onnx_unusable(torch.device("cuda", 0)) is None

"""faces-scrfd10g: SCRFD decode, threshold, NMS and padding mapping on onnxruntime, batched.

Most tests use a tiny ONNX model with SCRFD's output signature whose detections are placed by the input: at stride 8
an 8x8 cell whose channel 0 is v scores sigmoid(10 v' - 5) on both anchors (v' = v * 127.5/128, the model's input
scale) with a box of 16 px each side of the anchor centre (x*8, y*8); at stride 16 channel 2 does the same with a
16 px box (1 stride); stride 32 never fires. Both anchors of a cell give the same box, so every detection also
checks that NMS removes an exact duplicate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from d2m_core.compute.models.faces import Scrfd10G, ScrfdGraph
from d2m_core.compute.weights import resolve_weights
from d2m_core.reading.transforms import HALF, FacesImageTransform, normalize_uint8

SIZE = 224
GAIN, BIAS = 10.0, -5.0


class FixedBatchGraph(ScrfdGraph):
    """Outputs reshaped to (1, -1, C): a graph that cannot batch (forces the one-image-per-run fallback)."""

    def head_output(self, x: str, channels: int, layout: str) -> str:
        t = self.op("Transpose", [x], perm=[0, 2, 3, 1])
        return self.op("Reshape", [t, self.const(np.array([1, -1, channels], np.int64), "shape")])


def build_random_scrfd_onnx(seed: int = 0, *, layout: str = "spatial", kps: bool = True) -> onnx.ModelProto:
    """An ONNX model with SCRFD-10G's signature (2 anchors, strides 8/16/32, 9 outputs with `kps`) and
    deterministic random weights, batch- and size-dynamic, about 1.3 G multiply-adds per 224x224 image (SCRFD-10G:
    "10 GFLOPs" as mmcv counts them, i.e. multiply-adds, at 640x480, so about 1.6 G at 224x224): a stem of 3x3
    convs to strides 8/16/32 and per level three 3x3 convs of width 80 (SCRFD's stacked_convs 3, feat 80) and 1x1
    outputs.
    """
    rng = np.random.default_rng(seed)
    g = ScrfdGraph()

    def conv_relu(x: str, cin: int, cout: int, stride: int = 1) -> str:
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * np.sqrt(2.0 / (9 * cin))
        return g.op("Relu", [g.conv(x, w, np.zeros(cout, np.float32), stride)])

    def out_conv(x: str, cin: int, cout: int, bias: float, gain: float) -> str:
        w = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32) * gain / np.sqrt(cin)
        return g.conv(x, w, np.full(cout, bias, np.float32))

    x = conv_relu(g.input_name, 3, 32, 2)  # 112
    x = conv_relu(x, 32, 128, 2)  # 56
    x = conv_relu(x, 128, 128)
    x = conv_relu(x, 128, 128)
    levels = [conv_relu(x, 128, 56, 2)]  # stride 8
    levels.append(conv_relu(levels[-1], 56, 88, 2))  # stride 16
    levels.append(conv_relu(levels[-1], 88, 224, 2))  # stride 32
    anchors = 2
    heads: list[tuple[str, str, str | None]] = []
    for feat, cin in zip(levels, (56, 88, 224)):
        h = conv_relu(feat, cin, 80)
        h = conv_relu(h, 80, 80)
        h = conv_relu(h, 80, 80)
        scores = g.op("Sigmoid", [out_conv(h, 80, anchors, -1.3, 2.0)])
        # distances in stride units: softplus keeps them positive, so boxes are well formed
        boxes = g.op("Softplus", [out_conv(h, 80, anchors * 4, 1.0, 1.0)])
        points = out_conv(h, 80, anchors * 10, 0.0, 1.0) if kps else None
        heads.append((scores, boxes, points))
    model = g.model(heads, layout, "random SCRFD-shaped ONNX model (tests)")
    onnx.helper.set_model_props(model, {"d2m_random_weights": "1", "d2m_seed": str(seed)})
    return model


def known_box_model(layout: str = "spatial", graph: ScrfdGraph | None = None, kps: bool = True) -> onnx.ModelProto:
    g = graph or ScrfdGraph()
    heads = []
    for stride, channel, distance in ((8, 0, 2.0), (16, 2, 1.0), (32, None, 1.0)):
        pooled = g.op("AveragePool", [g.input_name], kernel_shape=[stride, stride], strides=[stride, stride])
        w = np.zeros((2, 3, 1, 1), np.float32)
        if channel is not None:
            w[:, channel] = GAIN
        bias = np.full(2, BIAS if channel is not None else -30.0, np.float32)
        scores = g.op("Sigmoid", [g.conv(pooled, w, bias)])
        boxes = g.conv(pooled, np.zeros((8, 3, 1, 1), np.float32), np.full(8, distance, np.float32))
        points = g.conv(pooled, np.zeros((20, 3, 1, 1), np.float32), np.zeros(20, np.float32)) if kps else None
        heads.append((scores, boxes, points))
    return g.model(heads, layout)


def write_model(model: onnx.ModelProto, directory: Path, name: str = "scrfd_10g_bnkps.onnx",
                fixed_batch: bool = False) -> Path:
    """Save as a weights file; `fixed_batch` mimics the released exports: input batch 1 and export-time shapes."""
    if fixed_batch:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
        model = onnx.shape_inference.infer_shapes(model)
        assert len(model.graph.value_info) > 0
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    onnx.save(model, str(path))
    return path


def load_real(directory: Path) -> Scrfd10G:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("D2M_RANDOM_WEIGHTS", raising=False)
        weights = resolve_weights(Scrfd10G.name, Scrfd10G.weights_files, directory)
    assert not weights.is_random
    return Scrfd10G(torch.device("cpu"), weights=weights)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scrfd10G]]:
    root = tmp_path_factory.mktemp("faces")
    built = {layout: load_real(write_model(known_box_model(layout), root / layout).parent)
             for layout in ("spatial", "batch", "batch2d")}
    built["loop"] = load_real(write_model(known_box_model("batch", FixedBatchGraph()), root / "loop").parent)
    yield built


@pytest.fixture(scope="module")
def random_model() -> Scrfd10G:
    """D2M_RANDOM_WEIGHTS: the seed's architecture with random weights (exported, on onnxruntime)."""
    weights = resolve_weights(Scrfd10G.name, Scrfd10G.weights_files, Path("/nonexistent"))
    assert weights.is_random
    return Scrfd10G(torch.device("cpu"), weights=weights)


@pytest.fixture(scope="module")
def random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Scrfd10G:
    """A user-supplied insightface-signature ONNX file (random weights) on onnxruntime."""
    return load_real(write_model(build_random_scrfd_onnx(0), tmp_path_factory.mktemp("random_onnx")).parent)


def canvas(batch: int = 1) -> torch.Tensor:
    return torch.full((batch, 3, SIZE, SIZE), -1.0)


def light(img: torch.Tensor, stride: int, row: int, col: int, value: float = 1.0) -> None:
    channel = {8: 0, 16: 2}[stride]
    img[channel, row * stride : (row + 1) * stride, col * stride : (col + 1) * stride] = value


def box8(row: int, col: int) -> list[float]:
    return [8 * col - 16, 8 * row - 16, 8 * col + 16, 8 * row + 16]


def expected(box: list[float], pad: list[float]) -> list[float]:
    """The seed's mapping, written independently: clip to the frame, remove the padding, clamp to [0, 1]."""
    left, top, right, bottom = pad
    x1, y1, x2, y2 = (min(max(v, 0.0), SIZE) for v in box)

    def fx(x: float) -> float:
        return min(max((x - left * SIZE) / ((1 - left - right) * SIZE), 0.0), 1.0)

    def fy(y: float) -> float:
        return min(max((y - top * SIZE) / ((1 - top - bottom) * SIZE), 0.0), 1.0)

    return [fx(x1), fy(y1), fx(x2), fy(y2)]


def assert_boxes(got: list[list[float]], want: list[list[float]], *, ordered: bool = False, tol: float = 1e-6) -> None:
    """Same boxes (as a set unless `ordered`), coordinates within `tol`."""
    if not ordered:
        got, want = sorted(got), sorted(want)
    assert len(got) == len(want), (got, want)
    if want:
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=tol)


def detect(model: Scrfd10G, pixels: torch.Tensor, padding: torch.Tensor | None = None) -> list[list[list[float]]]:
    if padding is None:
        padding = torch.zeros(pixels.shape[0], 4)
    (boxes,) = model((pixels, padding))
    assert isinstance(boxes, list) and len(boxes) == pixels.shape[0]
    return boxes


@pytest.mark.parametrize("pad", [[0.125, 0.0, 0.125, 0.0], [0.0, 0.2, 0.0, 0.3]], ids=["portrait", "landscape"])
def test_known_box_is_mapped_to_the_unpadded_image(models: dict[str, Scrfd10G], pad: list[float]) -> None:
    img = canvas()
    light(img[0], 8, 10, 12)
    (boxes,) = detect(models["spatial"], img, torch.tensor([pad]))
    assert len(boxes) == 1  # the second anchor's identical box is removed by NMS
    assert boxes[0] == pytest.approx(expected(box8(10, 12), pad), abs=1e-6)
    if pad[0]:
        assert boxes[0] == pytest.approx([52 / 168, 64 / 224, 84 / 168, 96 / 224], abs=1e-6)


@pytest.mark.parametrize("layout", ["spatial", "batch", "batch2d", "loop"])
def test_threshold_nms_and_levels(models: dict[str, Scrfd10G], layout: str) -> None:
    img = canvas()
    light(img[0], 8, 10, 12, 1.0)  # A: score 0.993
    light(img[0], 8, 10, 13, 0.8)  # B: 0.95, IoU 0.6 with A > 0.45: suppressed
    light(img[0], 8, 10, 14, 0.8)  # G: 0.95, IoU 1/3 with A and C: kept
    light(img[0], 8, 10, 16, 0.8)  # C: touches A only: kept
    light(img[0], 8, 20, 5, 0.45)  # D: 0.373 > 0.3: kept
    light(img[0], 8, 25, 25, 0.40)  # E: 0.266 <= 0.3: dropped
    light(img[0], 16, 3, 5, 1.0)  # F at stride 16: box 16 px each side of (80, 48)
    (boxes,) = detect(models[layout], img)
    want = [box8(10, 12), box8(10, 14), box8(10, 16), box8(20, 5), [64, 32, 96, 64]]
    assert_boxes(boxes, [expected(b, [0, 0, 0, 0]) for b in want])


def test_boxes_are_clipped_to_the_frame_and_the_image(models: dict[str, Scrfd10G]) -> None:
    img = canvas(2)
    for i in range(2):
        light(img[i], 8, 0, 0)
        light(img[i], 8, 27, 27)
    pad = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.25]])
    plain, padded = detect(models["spatial"], img, pad)
    assert_boxes(plain, [[0, 0, 16 / 224, 16 / 224], [200 / 224, 200 / 224, 1, 1]])
    # in the padding band: y clamps to 0 / 1 (the seed keeps such boxes)
    assert_boxes(padded, [[0, 0, 16 / 224, 0], [200 / 224, 1, 1, 1]])


def test_no_face_gives_an_empty_list(models: dict[str, Scrfd10G]) -> None:
    assert detect(models["spatial"], canvas(1)) == [[]]
    assert detect(models["spatial"], canvas(3)) == [[], [], []]


def test_layout_probe(models: dict[str, Scrfd10G]) -> None:
    assert {k: m.layout for k, m in models.items()} == {
        "spatial": "spatial", "batch": "batch", "batch2d": "batch", "loop": "loop"}
    assert models["batch"].out_ranks == [3] * 9 and models["spatial"].out_ranks == [2] * 9


@pytest.mark.parametrize("layout", ["spatial", "batch", "batch2d", "loop"])
def test_batch_equals_one_by_one(models: dict[str, Scrfd10G], layout: str) -> None:
    img = canvas(4)
    light(img[0], 8, 10, 12)
    light(img[0], 16, 9, 9)
    light(img[2], 8, 3, 20, 0.6)
    light(img[2], 8, 3, 21, 0.9)
    light(img[3], 16, 13, 0)
    pad = torch.tensor([[0.1, 0, 0.1, 0], [0, 0, 0, 0], [0, 0.3, 0, 0.1], [0.05, 0, 0.2, 0]])
    batched = detect(models[layout], img, pad)
    single = [detect(models[layout], img[i : i + 1], pad[i : i + 1])[0] for i in range(4)]
    assert batched == single
    assert [len(b) for b in batched] == [2, 0, 1, 1]


def test_random_model_batch_equals_one_by_one(random_model: Scrfd10G) -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(6, 3, SIZE, SIZE, generator=gen) * 2 - 1
    pad = torch.zeros(6, 4)
    pad[:, 0] = pad[:, 2] = torch.linspace(0, 0.2, 6)
    batched = detect(random_model, pixels, pad)
    single = [detect(random_model, pixels[i : i + 1], pad[i : i + 1])[0] for i in range(6)]
    assert sum(map(len, batched)) > 0
    assert [len(b) for b in batched] == [len(s) for s in single]
    for b, s in zip(batched, single):
        assert_boxes(b, s, ordered=True, tol=1e-4)


def test_decode_matches_insightface_scrfd(random_onnx: Scrfd10G) -> None:
    """Same input conversion, output layout and anchor decode as insightface's own one-image path."""
    random_model = random_onnx
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels = normalize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], HALF, HALF, torch.float32)
    blob = (pixels * random_model.input_scale).contiguous()
    scores, boxes = random_model.decode(random_model.forward_raw(blob), SIZE, SIZE)
    ref_scores, ref_boxes, _ = random_model.detector.forward(np.ascontiguousarray(rgb[:, :, ::-1]), 0.0)
    np.testing.assert_allclose(scores[0].numpy(), np.concatenate(ref_scores)[:, 0], atol=1e-4)
    np.testing.assert_allclose(boxes[0].numpy(), np.concatenate(ref_boxes), atol=1e-3)


def test_real_file_with_fixed_batch_loads_through_resolve_weights(tmp_path: Path) -> None:
    write_model(known_box_model("spatial"), tmp_path, fixed_batch=True)
    model = load_real(tmp_path)
    assert model.weights.record.kind == "user" and model.weights.file.filename == "scrfd_10g_bnkps.onnx"
    assert (model.input_scale, model.input_shift) == (127.5 / 128, 0.0)  # insightface's (p - 127.5) / 128
    assert model.weights.record.sha256 and model.layout == "spatial" and model.providers == ["CPUExecutionProvider"]
    img = canvas(3)
    light(img[1], 8, 10, 12)
    assert detect(model, img) == [[], [pytest.approx(expected(box8(10, 12), [0, 0, 0, 0]), abs=1e-6)], []]


def test_det_10g_name_is_accepted(tmp_path: Path) -> None:
    write_model(known_box_model("batch", kps=False), tmp_path, name="det_10g.onnx")
    model = load_real(tmp_path)
    assert model.weights.file.filename == "det_10g.onnx" and model.fmc == 3 and not model.detector.use_kps
    img = canvas()
    light(img[0], 16, 7, 7)
    assert detect(model, img) == [[pytest.approx([96 / 224, 96 / 224, 128 / 224, 128 / 224], abs=1e-6)]]


def test_random_weights_contract(random_model: Scrfd10G) -> None:
    assert random_model.weights.is_random and random_model.weights.record.as_dict()["kind"] == "random"
    assert (Scrfd10G.name, Scrfd10G.raw_inputs, Scrfd10G.preprocessors, Scrfd10G.output_fields) == (
        "faces-scrfd10g", ["image"], ["faces-aug"], {"boxes": -1})
    assert random_model.backend == "onnxruntime" and (random_model.input_scale, random_model.input_shift) == (1.0, 0.0)
    transform = FacesImageTransform()
    prepared = [transform.prepare(Image.new("RGB", size, color)) for size, color in
                (((300, 180), (200, 120, 90)), ((120, 260), (30, 60, 90)))]
    pixels, padding = transform.finish(torch.stack([p for p, _ in prepared]), torch.stack([a for _, a in prepared]),
                                       torch.float32)
    (boxes,) = random_model((pixels, padding))
    assert len(boxes) == 2
    assert all(len(b) == 4 and all(0.0 <= v <= 1.0 for v in b) for img in boxes for b in img)


def test_onnxruntime_is_the_gpu_build() -> None:
    import onnxruntime

    assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_io_binding_matches_cpu(random_onnx: Scrfd10G) -> None:
    random_model = random_onnx
    gpu = Scrfd10G(torch.device("cuda", 0), weights=random_model.weights)
    assert gpu.io_binding and gpu.providers[0] == "CUDAExecutionProvider"
    pixels = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    pad = torch.zeros(5, 4)
    on_cpu = detect(random_model, pixels, pad)
    on_gpu = detect(gpu, pixels.cuda(), pad.cuda())
    assert [len(b) for b in on_gpu] == [len(b) for b in on_cpu]
    for g, c in zip(on_gpu, on_cpu):
        assert_boxes(g, c, tol=1e-3)

"""SCRFD-10G face boxes, batched, as the seed's `faces-scrfd10g`.

Default: the seed's released checkpoint `scrfd_10g.pt` (SCRFD-10G with a GroupNorm head and no keypoints, the
network DataComp's `face_bboxes` came from), verified by the seed's sha256 and loaded exactly into d2m's own
torch architecture (`scrfd_net.py`), fed the seed's normalisation (p - 127.5) / 127.5, which is faces-aug's
output as is. The loaded network is exported in memory to ONNX (once per process and weights) and run in float32
on onnxruntime like the files below (on 2 CPU threads onnxruntime ran it about 3x faster than torch); if the
export fails, the torch module runs it.

Alternative: insightface's ONNX exports (`scrfd_10g_bnkps.onnx`, or `det_10g.onnx` from the buffalo_l pack), the
BN + keypoints variant of the same detector (boxes close to the seed's, not equal), on onnxruntime, fed
insightface's normalisation (p - 127.5) / 128 (`cv2.dnn.blobFromImage(bgr, 1/128, mean 127.5, swapRB=True)`).
insightface's `SCRFD` detector class reads the export's signature (output count -> strides, anchors per location,
keypoints; input name). Its own `detect` runs one image per `session.run`, so the batched decode is done here.
Any SCRFD export with 6/9 (strides 8/16/32, 2 anchors) or 10/15 outputs runs here.

The input normalisation belongs to the weights entry (`WeightsFile.input_norm`): with faces-aug's
x = (p/255 - 0.5)/0.5, blob = ((x + 1) * 127.5 - mean) / std, done with torch on the device.

Both backends give the outputs in insightface's order, batch first: scores (B, N, 1) per stride, then distances
(B, N, 4) in stride units, rows (y, x, anchor). The decode follows the seed (mmdet's SCRFDHead.get_bboxes with the
seed's test_cfg, then FaceDetector.detect_faces): anchor centres (x*stride, y*stride) for both anchors,
`distance2bbox` on the stride-scaled distances, boxes clipped to the 224 frame, score > 0.3, greedy NMS at IoU
0.45 (torchvision's, as the seed; thresholding before NMS keeps the same boxes, as lower scores never suppress
higher ones), no cap on faces, then mapped to [0, 1] of the original unpadded image.

ONNX batching (one `session.run` per batch): the released exports (2021) give 2-D outputs, (rows, C), from
`permute(2, 3, 0, 1).reshape(-1, C)` in insightface's SCRFD head at export time, so with a batch B the rows are
ordered (y, x, image, anchor); their input's batch dimension may be fixed to 1. At load time a fixed batch
dimension of the graph input is made symbolic, the outputs' fixed dimensions too, and stale `value_info` shapes
are dropped (in memory; the file is not touched).
A probe then runs two different images as one batch and one by one and picks the layout of the outputs that
reproduces the single runs: "spatial" (rows (y, x, image, anchor), the released exports), or "batch" (image first:
3-D (B, N, C) outputs of the later exports, or 2-D rows (image, y, x, anchor)). If no layout matches, or the
batched run fails, the model runs one image per `session.run` (a warning says so).

The onnxruntime session runs through IO binding: the input is bound to the torch tensor's memory and the outputs to
preallocated torch tensors (shapes known from the anchors and the probed layout). On CUDA (CUDAExecutionProvider)
that memory is on the device, so nothing goes through the host except the final boxes; decode and NMS run in torch
on the same device.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from d2m_core.compute.models.scrfd_net import (
    ANCHORS,
    STRIDES,
    ScrfdNet,
    load_scrfd_state_dict,
    random_scrfd_net,
    read_scrfd_checkpoint,
)
from d2m_core.compute.weights import PixelNorm, ResolvedWeights
from d2m_core.compute.weights_files import MODEL_FILES, SEED_NORM

log = logging.getLogger(__name__)

SIZE = 224
SCORE_THRESHOLD = 0.3  # the seed's detect_faces: keep score > 0.3
NMS_IOU = 0.45  # the seed's TEST_CFG nms iou_threshold
PIXEL_MEAN = 127.5  # what faces-aug's mean/std 0.5 undo: p = (x + 1) * 127.5

Layout = Literal["spatial", "batch", "loop"]


# ---------------------------------------------------------------------------------------------------------------
# ONNX graphs with SCRFD's output signature (tests build their own models with it).
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ScrfdGraph:
    """A small onnx.helper graph builder whose outputs follow SCRFD's signature.

    Outputs are, in order: scores for strides 8/16/32, then boxes (distances in stride units), then keypoints,
    as insightface's SCRFD class expects. `layout` chooses the export's output shape: "spatial" is the released
    models' `permute(2,3,0,1).reshape(-1, C)` (2-D), "batch" the later `permute(0,2,3,1).reshape(B, -1, C)` (3-D),
    "batch2d" `permute(0,2,3,1).reshape(-1, C)` (2-D, image first).
    """

    input_name: str = "input.1"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray, stride: int = 1) -> str:
        k = weight.shape[-1]
        return self.op(
            "Conv", [x, self.const(weight.astype(np.float32), "w"), self.const(bias.astype(np.float32), "b")],
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
        )

    def head_output(self, x: str, channels: int, layout: str) -> str:
        """(B, A*C, H, W) -> the export's output shape for C values per anchor."""
        if layout == "spatial":
            t = self.op("Transpose", [x], perm=[2, 3, 0, 1])
            return self.op("Reshape", [t, self.const(np.array([-1, channels], np.int64), "shape")])
        t = self.op("Transpose", [x], perm=[0, 2, 3, 1])
        if layout == "batch":
            return self.op("Reshape", [t, self.const(np.array([0, -1, channels], np.int64), "shape")])
        if layout == "batch2d":
            return self.op("Reshape", [t, self.const(np.array([-1, channels], np.int64), "shape")])
        raise ValueError(f"unknown layout {layout!r}")

    def model(self, heads: list[tuple[str, str, str | None]], layout: str, doc: str = "") -> onnx.ModelProto:
        """Finish the graph: `heads` is per stride (8, 16, 32) the NCHW (scores, boxes, keypoints or None)."""
        outputs: list[str] = []
        widths = (1, 4, 10)
        for component in range(3):
            for head in heads:
                if head[component] is not None:
                    outputs.append(self.head_output(head[component], widths[component], layout))
        rank = 3 if layout == "batch" else 2
        value_infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * rank) for o in outputs]
        graph = helper.make_graph(
            self.nodes, "scrfd_like",
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
            value_infos, self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="d2m",
                                  doc_string=doc)
        model.ir_version = 9
        onnx.checker.check_model(model)
        return model


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    return next(v for v in model.graph.input if v.name not in initializers)


def make_batch_dynamic(model: onnx.ModelProto) -> list[str]:
    """Edit `model` in place so it accepts any batch size; return what was changed (for the log).

    The input's batch dimension becomes symbolic; fixed output dimensions become symbolic (their row count scales
    with the batch); `value_info` (intermediate shapes recorded at export, batch 1) is dropped, onnxruntime
    infers shapes again. A fixed input height/width other than 224 is an error: the export must be dynamic.
    """
    changes: list[str] = []
    value = _graph_input(model)
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f"SCRFD input {value.name!r} must be NCHW, got rank {len(dims)}")
    if dims[0].HasField("dim_value"):
        changes.append(f"input {value.name} batch {dims[0].dim_value} -> dynamic")
        dims[0].dim_param = "batch"
    for axis in (2, 3):
        if dims[axis].HasField("dim_value") and dims[axis].dim_value != SIZE:
            raise ValueError(
                f"SCRFD input {value.name!r} has a fixed size {dims[axis].dim_value} on axis {axis}; "
                f"faces-scrfd10g needs {SIZE}x{SIZE}: use insightface's dynamic-shape export"
            )
    for out in model.graph.output:
        for i, dim in enumerate(out.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dim.dim_param = f"{out.name}_dim{i}"
                changes.append(f"output {out.name} dim {i} -> dynamic")
    if len(model.graph.value_info):
        changes.append(f"dropped {len(model.graph.value_info)} value_info shapes")
        del model.graph.value_info[:]
    return changes


PROBE_TOLERANCE = 1e-2  # batched vs single runs: mean |difference| / mean |value| (TF32, other conv algorithms)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(float(ref.abs().mean()), float(got.abs().mean()), 1e-6)
    return float((got - ref).abs().mean()) / scale


def _to_bnc(out: torch.Tensor, layout: Layout, batch: int, anchors: int) -> torch.Tensor:
    """One raw output -> (B, N, C) with N in insightface's (y, x, anchor) order."""
    if out.dim() == 3:
        return out
    channels = out.shape[-1]
    if layout == "spatial":
        return out.reshape(-1, batch, anchors, channels).transpose(0, 1).reshape(batch, -1, channels)
    return out.reshape(batch, -1, channels)


_EXPORTS: dict[str, bytes] = {}  # exported graphs by weights sha256 ("random" for the random weights)


def onnx_unusable(device: torch.device) -> str | None:
    """Why onnxruntime cannot run SCRFD on `device` here (None when it can): a missing package, or a CUDA device
    with an onnxruntime build that has no CUDAExecutionProvider (the CPU wheel where onnxruntime-gpu belongs).
    The seed-format network then runs in torch on that device instead of onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
        from insightface.model_zoo.scrfd import SCRFD  # noqa: F401 - reads the signature of the session
    except ImportError as exc:
        return f"{exc.name or exc} is not installed"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return None


def export_scrfd_onnx(net: ScrfdNet, key: str | None = None) -> onnx.ModelProto:
    """The network as an ONNX graph with insightface's SCRFD output signature (6 outputs, batch first), for
    onnxruntime (faster than torch on the CPU); cached within a process under `key` (the weights' sha256)."""
    if key is None or key not in _EXPORTS:
        buffer = io.BytesIO()
        names = [f"score_{s}" for s in STRIDES] + [f"bbox_{s}" for s in STRIDES]
        axes = {"input.1": {0: "batch", 2: "height", 3: "width"}} | {n: {0: "batch", 1: "rows"} for n in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(net.cpu().eval(), torch.zeros(1, 3, SIZE, SIZE), buffer, dynamo=False,
                              opset_version=17, input_names=["input.1"], output_names=names, dynamic_axes=axes)
        if key is None:
            return onnx.load_from_string(buffer.getvalue())
        _EXPORTS[key] = buffer.getvalue()
    return onnx.load_from_string(_EXPORTS[key])


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class Scrfd10G:
    """SCRFD-10G face detector: per image the list of face boxes [x1, y1, x2, y2] in [0, 1] of the original image.

    Default weights: the seed's released `scrfd_10g.pt` (what DataComp's `face_bboxes` were computed with), loaded
    into d2m's own torch architecture (`scrfd_net.ScrfdNet`), exported in memory and run on onnxruntime in float32.
    Alternative: insightface's ONNX exports (`scrfd_10g_bnkps.onnx` / `det_10g.onnx`, BN head with keypoints:
    close to the seed's boxes, not equal) on onnxruntime. Each weights entry carries the input normalisation its
    network was trained with.
    """

    name = "faces-scrfd10g"
    raw_inputs = ["image"]
    preprocessors = ["faces-aug"]
    dependencies: list[str] = []
    to_device = True
    waits_for_device = True  # its boxes are lists made on the host (NMS keeps a data-dependent count): issued last
    output_fields = {"boxes": -1}  # -1 = ragged: per sample a list of [x1, y1, x2, y2]
    weights_files = MODEL_FILES["faces-scrfd10g"]

    score_threshold = SCORE_THRESHOLD
    nms_iou = NMS_IOU

    def __init__(self, device: torch.device | int | str, *, dtype: torch.dtype = torch.float32,
                 weights: ResolvedWeights) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype  # SCRFD runs in float32 whatever the pipeline's dtype, as the seed ran it
        self.weights = weights
        spec = weights.file or self.weights_files[0]
        norm = spec.input_norm or SEED_NORM
        # blob = ((x + 1) * 127.5 - mean) / std, x = faces-aug's [-1, 1] pixels; the seed's entry: blob = x
        self.input_scale = PIXEL_MEAN / norm.std
        self.input_shift = (PIXEL_MEAN - norm.mean) / norm.std
        self._centers: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self.strides: list[int] = list(STRIDES)
        if weights.is_random or spec.format == "scrfd-torch":
            net = self._load_net()
            reason = onnx_unusable(self.device)
            if reason is None:
                try:
                    model = export_scrfd_onnx(net, weights.record.sha256 or "random")
                except Exception as exc:  # noqa: BLE001 - the torch module runs the same graph, only slower on CPU
                    reason = f"ONNX export of the SCRFD network failed ({exc})"
            if reason is not None:
                log.warning("%s: %s; running the network in torch on %s", self.name, reason, self.device)
                self.backend = "torch"
                self.net = net.to(self.device, torch.float32).eval()
                self.run_device = self.device
                self.fmc, self.anchors = len(STRIDES), ANCHORS
                return
            self._init_onnx(norm, model, check_norm=False)
        else:
            self._init_onnx(norm, onnx.load(str(weights.path)), check_norm=True)

    def _load_net(self) -> ScrfdNet:
        if self.weights.is_random:
            log.warning("%s: RANDOM weights (SCRFD-10G architecture, random init); boxes are meaningless", self.name)
            return random_scrfd_net()
        net = ScrfdNet()
        trusted = self.weights.record.kind == "official"
        load_scrfd_state_dict(net, read_scrfd_checkpoint(self.weights.path, trusted=trusted), self.weights.path)
        return net.eval()

    def _init_onnx(self, norm: PixelNorm, model: onnx.ModelProto, check_norm: bool) -> None:
        import onnxruntime as ort
        from insightface.model_zoo.scrfd import SCRFD

        self.backend = "onnxruntime"
        changes = make_batch_dynamic(model)
        if changes:
            log.info("%s: batch made dynamic in memory: %s", self.name, "; ".join(changes))

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.device.type == "cuda":
            try:  # CUDA/cuDNN libraries of the nvidia-* wheels, as insightface does (no-op once torch loaded them)
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - the session below reports what is really missing
                log.debug("onnxruntime.preload_dlls failed: %s", exc)
            providers: list = [("CUDAExecutionProvider", {"device_id": self.device.index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        self.io_binding = self.device.type == "cuda" and self.providers[0] == "CUDAExecutionProvider"
        self.run_device = self.device if self.io_binding else torch.device("cpu")
        if self.device.type == "cuda" and not self.io_binding:
            log.warning("%s: onnxruntime could not start CUDAExecutionProvider (providers %s); running on the CPU",
                        self.name, self.providers)

        self.detector = SCRFD(session=self.session)  # signature, names
        if not hasattr(self.detector, "fmc"):
            raise ValueError(f"{self.name}: {len(self.session.get_outputs())} outputs is not an SCRFD signature")
        if check_norm and (self.detector.input_mean, self.detector.input_std) != (norm.mean, norm.std):
            log.warning("%s: insightface reads normalisation (%s, %s) from %s; the weights entry says (%s, %s), "
                        "which is used", self.name, self.detector.input_mean, self.detector.input_std,
                        self.weights.path, norm.mean, norm.std)
        self.detector.det_thresh, self.detector.nms_thresh = SCORE_THRESHOLD, NMS_IOU  # for its own detect()
        self.input_name: str = self.detector.input_name
        self.output_names: list[str] = list(self.detector.output_names)
        self.fmc: int = self.detector.fmc
        self.strides = list(self.detector._feat_stride_fpn)
        self.anchors: int = self.detector._num_anchors
        self.layout, self.out_ranks, self.out_channels = self._probe_layout()
        if self.layout == "loop":
            log.warning("%s: the model does not batch; running one image per session.run", self.name)

    # -- running the graph -----------------------------------------------------------------------------------

    def _run_numpy(self, blob: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: blob})

    def _probe_layout(self) -> tuple[Layout, list[int], list[int]]:
        """Find how a batch of 2 lays out the outputs by comparing with two single-image runs."""
        rng = np.random.default_rng(0)
        ramp = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
        probe = np.stack([
            rng.uniform(-1.0, 1.0, (3, SIZE, SIZE)).astype(np.float32),
            np.broadcast_to(ramp[None, None, :] * ramp[None, :, None], (3, SIZE, SIZE)) * np.float32(-1.0),
        ]) * np.float32(self.input_scale)
        singles = [self._run_numpy(np.ascontiguousarray(probe[i : i + 1])) for i in range(2)]
        ranks = [o.ndim for o in singles[0]]
        channels = [o.shape[-1] for o in singles[0]]
        for k, out in enumerate(singles[0]):
            rows = out.shape[-2]
            expected = self._rows(k, SIZE, SIZE)
            if rows != expected:
                raise ValueError(f"{self.name}: output {self.output_names[k]} has {rows} rows at {SIZE}x{SIZE}, "
                                 f"SCRFD's anchors need {expected}")
        try:
            both = self._run_numpy(probe)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot batch
            log.warning("%s: batched probe failed: %s", self.name, exc)
            return "loop", ranks, channels
        reference = [torch.from_numpy(np.concatenate([s[k].reshape(1, -1, channels[k]) for s in singles]))
                     for k in range(len(ranks))]
        # how different the two probe images' outputs are: a wrong layout mixes them up by about this much
        distinct = max(_relative_error(r[0], r[1]) for r in reference)
        candidates: tuple[Layout, ...] = ("batch",) if all(r == 3 for r in ranks) else ("spatial", "batch")
        errors: dict[Layout, float] = {}
        for layout in candidates:
            try:
                got = [_to_bnc(torch.from_numpy(o), layout, 2, self.anchors) for o in both]
            except RuntimeError:
                continue
            if all(g.shape == r.shape for g, r in zip(got, reference)):
                errors[layout] = max(_relative_error(g, r) for g, r in zip(got, reference))
        matching = [layout for layout, err in errors.items() if err <= PROBE_TOLERANCE]
        if not matching:
            log.warning("%s: batched outputs match no known layout (relative errors %s)", self.name, errors)
            return "loop", ranks, channels
        if distinct < 5 * PROBE_TOLERANCE:
            log.warning("%s: layout probe inconclusive (outputs barely depend on the input); assuming %r",
                        self.name, matching[0])
        return matching[0], ranks, channels

    def _rows(self, k: int, height: int, width: int) -> int:
        stride = self.strides[k % self.fmc]
        return (height // stride) * (width // stride) * self.anchors

    def _run(self, blob: torch.Tensor) -> list[torch.Tensor]:
        """One session.run with IO binding: the input is read from, and the outputs written to, torch tensors on
        the run device (CUDA memory with CUDAExecutionProvider, else host memory): no copies, no numpy."""
        blob = blob.to(self.run_device, torch.float32).contiguous()
        batch, _, height, width = blob.shape
        outputs = []
        for k, (rank, channels) in enumerate(zip(self.out_ranks, self.out_channels)):
            rows = self._rows(k, height, width)
            shape = (batch, rows, channels) if rank == 3 else (batch * rows, channels)
            outputs.append(torch.empty(shape, dtype=torch.float32, device=blob.device))
        kind, index = blob.device.type, blob.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, kind, index, np.float32, tuple(blob.shape), blob.data_ptr())
        for name, out in zip(self.output_names, outputs):
            binding.bind_output(name, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(blob.device).synchronize()  # the blob was written on torch's stream
        self.session.run_with_iobinding(binding)  # returns once onnxruntime's work (and stream) is done
        return outputs

    def forward_raw(self, blob: torch.Tensor) -> list[torch.Tensor]:
        """The outputs for a (B, 3, H, W) float32 blob, each as (B, N, C) in insightface's row order."""
        if self.backend == "torch":  # onnxruntime unusable here (onnx_unusable) or the ONNX export failed
            with torch.inference_mode():
                return self.net(blob.to(self.run_device, torch.float32))
        batch = blob.shape[0]
        if self.layout == "loop":
            per_image = [self.forward_raw_single(blob[i : i + 1]) for i in range(batch)]
            return [torch.cat([p[k] for p in per_image]) for k in range(len(self.output_names))]
        return [_to_bnc(o, self.layout, batch, self.anchors) for o in self._run(blob)]

    def forward_raw_single(self, blob: torch.Tensor) -> list[torch.Tensor]:
        return [_to_bnc(o, "batch", 1, self.anchors) for o in self._run(blob)]

    # -- decoding -------------------------------------------------------------------------------------------

    def anchor_centers(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(N, 2) anchor centres for all levels, as insightface builds them: (x*stride, y*stride), per anchor;
        made once a size and device (a copy to CUDA from pageable memory waits for the device's queued work)."""
        key = (height, width, device)
        if key not in self._centers:
            parts = []
            for stride in self.strides:
                ys, xs = np.mgrid[: height // stride, : width // stride]
                centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
                parts.append(np.repeat(centers, self.anchors, axis=0))
            self._centers[key] = torch.from_numpy(np.concatenate(parts)).to(device)
        return self._centers[key]

    def decode(self, outputs: list[torch.Tensor], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (B, N, C) outputs -> (scores (B, N), boxes (B, N, 4) in input pixels, not clipped)."""
        fmc = self.fmc
        scores = torch.cat([outputs[i][..., 0] for i in range(fmc)], dim=1)
        distances = torch.cat([outputs[fmc + i] * stride for i, stride in enumerate(self.strides)], dim=1)
        centers = self.anchor_centers(height, width, distances.device)
        boxes = torch.cat([centers - distances[..., :2], centers + distances[..., 2:4]], dim=-1)  # distance2bbox
        return scores, boxes

    def postprocess(self, scores: torch.Tensor, boxes: torch.Tensor, padding: torch.Tensor, height: int,
                    width: int) -> list[list[list[float]]]:
        """Clip to the frame, keep score > 0.3, NMS 0.45 per image, map to [0, 1] of the unpadded image."""
        from torchvision.ops import batched_nms

        batch = scores.shape[0]
        frame = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), frame)
        image, anchor = (scores > self.score_threshold).nonzero(as_tuple=True)
        cand_boxes, cand_scores = boxes[image, anchor], scores[image, anchor]
        keep = batched_nms(cand_boxes, cand_scores, image, self.nms_iou)  # sorted by decreasing score
        kept_boxes, kept_image = cand_boxes[keep], image[keep]
        order = torch.sort(kept_image, stable=True).indices  # group by image, keep score order
        kept_boxes, kept_image = kept_boxes[order], kept_image[order]
        pad = padding.to(kept_boxes.device, torch.float32)[kept_image]  # (K, 4) left, top, right, bottom
        # the seed's detect_faces: x' = (x - padL*W) / ((1 - padL - padR) * W), clamped to [0, 1]; y likewise
        lo = pad[:, [0, 1, 0, 1]] * frame
        extent = torch.stack([1 - pad[:, 0] - pad[:, 2], 1 - pad[:, 1] - pad[:, 3]], dim=1).repeat(1, 2) * frame
        mapped = ((kept_boxes - lo) / extent).clamp(0, 1)
        counts = torch.bincount(kept_image, minlength=batch).tolist()
        flat = mapped.cpu().tolist()
        result, start = [], 0
        for n in counts:
            result.append(flat[start : start + n])
            start += n
        return result

    @torch.inference_mode()
    def __call__(self, faces_input: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[list[list[float]]]]:
        """faces_input = (pixels (B, 3, 224, 224) in [-1, 1], RGB, from faces-aug; padding (B, 4) =
        [left, top, right, bottom] / max side of the original image). Returns (boxes,), boxes[i] the list of
        [x1, y1, x2, y2] in [0, 1] of image i (possibly empty)."""
        pixels, padding = faces_input
        blob = pixels.to(self.run_device, torch.float32).mul(self.input_scale)
        if self.input_shift:
            blob = blob.add(self.input_shift)
        blob = blob.contiguous()
        height, width = blob.shape[-2:]
        scores, boxes = self.decode(self.forward_raw(blob), height, width)
        return (self.postprocess(scores, boxes, padding, height, width),)

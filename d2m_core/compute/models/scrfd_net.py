"""SCRFD-10G as the seed's released checkpoint `scrfd_10g.pt` holds it (GroupNorm head, no keypoints), in torch.

The graph (facts from the seed's `face_detection` port of insightface's mmdet SCRFD, MODEL_CONFIG there):
- backbone, ResNet "v1e": a deep stem of three 3x3 conv-BN-ReLU (3 -> 28 stride 2, 28 -> 28, 28 -> 56), a 2x2
  max pool, then four stages of BasicBlocks (3, 4, 2, 3 blocks; widths 56, 88, 88, 224; the first block of
  stages 2-4 has stride 2, its shortcut a 2x2 average pool (ceil mode, padding not counted) + 1x1 conv + BN);
  outputs at strides 4, 8, 16, 32.
- neck, PAFPN on the stride 8/16/32 outputs, 56 channels, plain convs with bias (no norm, no activation):
  1x1 laterals, top-down sums with nearest upsampling, 3x3 output convs, a bottom-up path (3x3 stride-2 convs
  added to the next level, then 3x3 convs on levels 2-3).
- head, shared by the three levels: three 3x3 conv-GN(16 groups)-ReLU (56 -> 80 -> 80 -> 80, no bias), then a
  3x3 conv to 2 score logits (2 anchors) and one to 2 x 4 box distances, the distances multiplied by a learned
  per-level scalar; distances are in stride units (the decoder multiplies by the stride).

`load_scrfd_state_dict` loads a checkpoint into this module strictly: the parameter names are those of the
checkpoint (`backbone.stem.0.weight`, `neck.lateral_convs.0.conv.weight`, `bbox_head.cls_stride_convs.0.0.gn.weight`,
`bbox_head.scales.0.scale`, `bbox_head.integral.project`, ...), every key must be present with its shape.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from d2m_core.compute.weights import WeightsError

STEM = 56
STAGES = ((3, 56, 1), (4, 88, 2), (2, 88, 2), (3, 224, 2))  # (blocks, width, stride of the first block)
NECK = 56
HEAD = 80
HEAD_GROUPS = 16
HEAD_CONVS = 3
ANCHORS = 2  # anchor scales 1 and 2, one ratio: two anchors per location, same centre
STRIDES = (8, 16, 32)
REG_MAX = 8  # the checkpoint keeps the (unused) distribution-focal integral buffer: linspace(0, 8, 9)


def conv3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        half = STEM // 2
        self.stem = nn.Sequential(
            conv3(3, half, 2), nn.BatchNorm2d(half), nn.ReLU(),
            conv3(half, half), nn.BatchNorm2d(half), nn.ReLU(),
            conv3(half, STEM), nn.BatchNorm2d(STEM), nn.ReLU(),
        )
        self.maxpool = nn.MaxPool2d(2, 2)
        cin = STEM
        for index, (blocks, width, stride) in enumerate(STAGES, start=1):
            layer = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*layer))
            cin = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for index in range(1, len(STAGES) + 1):
            x = getattr(self, f"layer{index}")(x)
            outs.append(x)
        return outs


class ConvUnit(nn.Module):
    """A conv with an optional GroupNorm + ReLU: the checkpoint's `<name>.conv.*` / `<name>.gn.*` keys."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not groups)
        if groups:
            self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(self.gn(x)) if hasattr(self, "gn") else x


class Neck(nn.Module):
    """PAFPN over the backbone's stride 8/16/32 outputs."""

    def __init__(self, widths: tuple[int, ...] = tuple(w for _, w, _ in STAGES[1:])) -> None:
        super().__init__()
        levels = len(widths)
        self.lateral_convs = nn.ModuleList(ConvUnit(w, NECK, 1) for w in widths)
        self.fpn_convs = nn.ModuleList(ConvUnit(NECK, NECK, 3) for _ in range(levels))
        self.downsample_convs = nn.ModuleList(ConvUnit(NECK, NECK, 3, stride=2) for _ in range(levels - 1))
        self.pafpn_convs = nn.ModuleList(ConvUnit(NECK, NECK, 3) for _ in range(levels - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        mid = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        for i in range(len(mid) - 1):  # bottom-up
            mid[i + 1] = mid[i + 1] + self.downsample_convs[i](mid[i])
        return [mid[0]] + [conv(x) for conv, x in zip(self.pafpn_convs, mid[1:])]


class LevelScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))


class Head(nn.Module):
    """The shared head: per level (score logits (B, A, H, W), distances in stride units (B, 4A, H, W))."""

    def __init__(self) -> None:
        super().__init__()
        tower = [ConvUnit(NECK if i == 0 else HEAD, HEAD, 3, groups=HEAD_GROUPS) for i in range(HEAD_CONVS)]
        self.cls_stride_convs = nn.ModuleDict({"0": nn.ModuleList(tower)})
        self.stride_cls = nn.ModuleDict({"0": conv3(HEAD, ANCHORS, bias=True)})
        self.stride_reg = nn.ModuleDict({"0": conv3(HEAD, 4 * ANCHORS, bias=True)})
        self.scales = nn.ModuleList(LevelScale() for _ in STRIDES)
        self.integral = nn.Module()
        self.integral.register_buffer("project", torch.linspace(0, REG_MAX, REG_MAX + 1))

    def forward(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for x, scale in zip(feats, self.scales):
            for conv in self.cls_stride_convs["0"]:
                x = conv(x)
            out.append((self.stride_cls["0"](x), self.stride_reg["0"](x) * scale.scale))
        return out


class ScrfdNet(nn.Module):
    """SCRFD-10G (GN head, no keypoints). forward: (B, 3, H, W) normalised RGB -> the outputs in insightface's
    SCRFD signature, batch first: scores (B, N, 1) after the sigmoid for strides 8, 16, 32, then box distances
    (B, N, 4) in stride units for strides 8, 16, 32; rows ordered (y, x, anchor)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.bbox_head = Head()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.bbox_head(self.neck(self.backbone(x)[1:]))
        batch = x.shape[0]
        scores = [logits.permute(0, 2, 3, 1).reshape(batch, -1, 1).sigmoid() for logits, _ in levels]
        boxes = [distances.permute(0, 2, 3, 1).reshape(batch, -1, 4) for _, distances in levels]
        return scores + boxes


def random_scrfd_net(seed: int = 2) -> ScrfdNet:
    """The architecture with deterministic random weights (D2M_RANDOM_WEIGHTS): He-initialised convs, score
    logits biased to -2.5 so that, as with trained weights, few anchors pass the 0.3 threshold (the default seed gives a few boxes per image of d2m's synthetic shards)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        net = ScrfdNet()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        cls = net.bbox_head.stride_cls["0"].weight
        nn.init.normal_(cls, std=0.05)
        cls.sub_(cls.mean(dim=(1, 2, 3), keepdim=True))  # zero-mean: the ReLU features' mean does not shift logits
        nn.init.constant_(net.bbox_head.stride_cls["0"].bias, -2.5)
        nn.init.normal_(net.bbox_head.stride_reg["0"].weight, std=0.05)
        nn.init.constant_(net.bbox_head.stride_reg["0"].bias, 2.0)
    return net.eval()


def read_scrfd_checkpoint(path: PathLike[str] | str, *, trusted: bool) -> dict[str, torch.Tensor]:
    """The state dict of a seed-format checkpoint ({"state_dict": {...}, ...}, as `torch.load(path)["state_dict"]`
    in the seed). Read with weights_only=True; a file whose pickle needs more (mmcv's "meta") is read fully only
    when `trusted` (its sha256 is the pinned release's)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            raise WeightsError(f"faces-scrfd10g: {path} holds more than tensors and plain containers, and its sha256 "
                               f"is not the release's: refusing to unpickle it ({exc})") from exc
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"faces-scrfd10g: cannot read {path} as a torch checkpoint: {exc}") from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"faces-scrfd10g: {path} is not a seed-format checkpoint: expected a dict with a "
                           f"'state_dict' of tensors (the seed's scrfd_10g.pt)")
    return dict(state)


def load_scrfd_state_dict(net: ScrfdNet, state: Mapping[str, torch.Tensor], path: object = "") -> None:
    """Exact load: every key of the architecture present with its shape, no other key; else a WeightsError."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise WeightsError(
            f"faces-scrfd10g: {path} does not match SCRFD-10G (GN head, no keypoints): {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} wrong shapes {shapes[:5]}"
        )
    net.load_state_dict(dict(state), strict=True)

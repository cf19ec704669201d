"""ISC21 copy-detection descriptor `isc_ft_v107` (the seed's `dedup-isc-ft-v107`) and the dedup score.

Architecture (lyakaap/ISC21-Descriptor-Track-1st, isc_feature_extractor/model.py, which the seed installs
from sagadre's fork unchanged): timm `tf_efficientnetv2_m` (in21k -> in1k, `features_only`, last feature map,
512 channels at stride 32) -> GeM pooling with p = eval_p = 1.0 (eps 1e-6, i.e. average pooling of the map
clamped at 1e-6) -> Linear(512, 256, bias=False) -> BatchNorm1d(256) -> L2 normalisation.

Checkpoint: the release file `isc_ft_v107.pth.tar` is the training script's (exp/v107.py) `save_checkpoint`
dict {"epoch", "arch" ("tf_efficientnetv2_m_in21ft1k"), "state_dict", "optimizer", "args" (argparse.Namespace,
`args.input_size` = 512)}; the model was wrapped in DistributedDataParallel (SyncBatchNorm), so every
state-dict key carries a leading "module.": `module.backbone.conv_stem.weight`, `module.backbone.bn1.*`,
`module.backbone.blocks.S.B.*`, `module.fc.weight`, `module.bn.{weight,bias,running_mean,running_var,
num_batches_tracked}`. `create_model` strips "module." and loads strictly; so does this module.

The dedup score is, as in the seed, max_j z . ref_j over DataComp's evaluation-set embeddings
(`eval_dedup_embeddings.pt`, a (N, 256) tensor, used as stored), computed from stored features by `dedup_scores`.
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Mapping
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2m_core.compute.compiled import StaticInput
from d2m_core.compute.weights import ResolvedWeights, WeightsError
from d2m_core.compute.weights_files import MODEL_FILES

log = logging.getLogger(__name__)

TIMM_ARCH = "tf_efficientnetv2_m.in21k_ft_in1k"
# names the release checkpoint's "arch" may carry: the timm name at training time and its current spelling
ACCEPTED_ARCHS = ("tf_efficientnetv2_m_in21ft1k", TIMM_ARCH)
INPUT_SIZE = 512
FEATURE_DIM = 256
GEM_P = 1.0
GEM_EPS = 1e-6
UNIT_NORM_TOLERANCE = 1e-3  # reference rows within this of norm 1 count as unit norm


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling over the spatial dims of (B, C, H, W) -> (B, C, 1, 1), as ISC21's `gem`."""
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


class IscNet(nn.Module):
    """ISC21's ISCNet in eval form: backbone -> GeM(p) -> fc -> bn -> L2 normalise; same submodule names."""

    def __init__(self, backbone: nn.Module, fc_dim: int = FEATURE_DIM, p: float = GEM_P) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_info.info[-1]["num_chs"], fc_dim, bias=False)
        self.bn = nn.BatchNorm1d(fc_dim)
        self.p = p
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.constant_(self.bn.weight, 1)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)[-1]
        x = gem(x, self.p).flatten(1)
        x = self.bn(self.fc(x))
        return F.normalize(x)


def build_isc_net() -> IscNet:
    """The architecture with timm's (and ISCNet's) initialisation; never downloads anything."""
    import timm  # 0.3 s and torch._dynamo (2 s): imported when an ISC model is built, not with the registry

    backbone = timm.create_model(TIMM_ARCH, pretrained=False, features_only=True)
    return IscNet(backbone)


RESIDUAL_GAIN = 0.2


def stable_random_init(model: nn.Module) -> nn.Module:
    """Re-initialise the backbone so that EVAL-mode activations stay O(1) (random weights only).

    timm's EfficientNet init (fan-out) relies on batch statistics; in eval mode, with running stats 0/1, the
    activations of a freshly built tf_efficientnetv2_m grow to ~1e9 at the last stage and the output becomes
    numerically chaotic (a batch of 1 and a batch of 2 give features 0.1-0.2 apart). Fan-in He init of every
    conv and a small gain on the last BatchNorm of each residual branch keep them O(1) and reproducible.
    """
    for mod in model.backbone.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for mod in model.backbone.modules():
        if getattr(mod, "has_skip", False):
            norms = [c for c in mod.children() if isinstance(c, nn.BatchNorm2d)]
            if norms:
                nn.init.constant_(norms[-1].weight, RESIDUAL_GAIN)
    return model


def _torch_load(path: PathLike[str] | str, what: str) -> object:
    """torch.load with weights_only=True, allowing the argparse.Namespace the ISC21 release stores as "args"."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{what}: cannot read {path} as a torch file (weights_only): {exc}") from exc


def isc_state_dict(checkpoint: object, path: object = "") -> dict[str, torch.Tensor]:
    """The ISCNet state dict of a release checkpoint ({"state_dict": {"module.backbone...": ...}, ...}).

    A bare state dict is accepted as well. A leading "module." (DataParallel/DDP) is removed from each key.
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"dedup-isc-ft-v107: {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    arch = checkpoint.get("arch")
    if arch is not None and arch not in ACCEPTED_ARCHS:
        raise WeightsError(f"dedup-isc-ft-v107: {path} is a checkpoint of {arch!r}, expected one of {ACCEPTED_ARCHS}")
    args = checkpoint.get("args")
    input_size = getattr(args, "input_size", None)
    if input_size is not None and input_size != INPUT_SIZE:
        log.warning("dedup-isc-ft-v107: %s was trained at input_size %s; d2m feeds %s", path, input_size, INPUT_SIZE)
    raw = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"dedup-isc-ft-v107: {path} has no state dict of tensors (keys: {sorted(checkpoint)[:8]})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}


def load_isc_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: object = "") -> None:
    """Strict load; missing/unexpected keys or wrong shapes raise a WeightsError naming a few of them."""
    expected = set(model.state_dict())
    given = set(state_dict)
    # BatchNorm fills an absent num_batches_tracked itself (as torch does for old checkpoints)
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise WeightsError(
            f"dedup-isc-ft-v107: {path} does not match ISCNet(tf_efficientnetv2_m): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]} "
            f"(expected the release layout 'module.backbone.*', 'module.fc.weight', 'module.bn.*')"
        )
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"dedup-isc-ft-v107: {path} does not fit ISCNet: {exc}") from exc


class IscFtV107:
    """The seed's `dedup-isc-ft-v107`: (B, 3, 512, 512) images (dedup-aug) -> ((B, 256) unit-norm float32,)."""

    name = "dedup-isc-ft-v107"
    raw_inputs = ["image"]
    preprocessors = ["dedup-aug"]
    dependencies: list[str] = []
    to_device = True
    output_fields = {"image": FEATURE_DIM}
    weights_files = MODEL_FILES["dedup-isc-ft-v107"]
    static_parts = {"model": StaticInput((3, INPUT_SIZE, INPUT_SIZE), torch.channels_last)}  # torch_compile, cuda_graphs

    def __init__(self, device: torch.device | int | str, *, dtype: torch.dtype = torch.float32, weights: ResolvedWeights) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights = weights
        if weights.is_random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = stable_random_init(build_isc_net())
        else:
            model = build_isc_net()
            checkpoint = _torch_load(weights.path, self.name)
            load_isc_state_dict(model, isc_state_dict(checkpoint, weights.path), weights.path)
            del checkpoint
        self.model = model.to(self.device, dtype).to(memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        x = image.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        z = self.model(x).float()
        return (F.normalize(z, dim=-1),)  # the seed normalises the (already unit) output once more


def load_reference_embeddings(path: PathLike[str] | str) -> np.ndarray:
    """DataComp's `eval_dedup_embeddings.pt` (torch.save of an (N, 256) tensor) as a float32 (N, 256) array."""
    data = _torch_load(path, "dedup reference embeddings")
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != FEATURE_DIM:
        what = f"tensor of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise WeightsError(f"dedup reference embeddings: {path} holds a {what}, expected an (N, {FEATURE_DIM}) tensor")
    return np.ascontiguousarray(data.detach().to("cpu", torch.float32).numpy())


def dedup_scores(features: np.ndarray, reference: np.ndarray, *, chunk_size: int = 8192, row_chunk: int = 4096) -> np.ndarray:
    """The seed's dedup score: (N, D) features z, (M, D) reference -> (N,) float32 max_j z_i . ref_j.

    Exactly what the seed computes (`scores = z @ ref.T; scores.max(axis=1)`), in float32: z are the model's
    unit-norm outputs as stored, and the reference rows are used as stored, NOT re-normalised, so with
    rows that are not unit norm the scores are not cosines (and may leave [-1, 1]); `reference_norms` says
    which case a reference set is. The reference is processed `chunk_size` rows at a time and the features
    `row_chunk` rows at a time, so memory stays bounded for M = 100k+.
    """
    feats = np.asarray(features)
    ref = np.asarray(reference)
    if feats.ndim != 2 or ref.ndim != 2 or feats.shape[1] != ref.shape[1]:
        raise ValueError(f"features {feats.shape} and reference {ref.shape} must be (N, D) and (M, D)")
    if ref.shape[0] == 0:
        raise ValueError("the dedup reference set is empty")
    if chunk_size < 1 or row_chunk < 1:
        raise ValueError("chunk sizes must be positive")
    out = np.empty(feats.shape[0], dtype=np.float32)
    if feats.shape[0] == 0:
        return out
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    feat_t = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    with torch.inference_mode():
        for r0 in range(0, feat_t.shape[0], row_chunk):
            block = feat_t[r0 : r0 + row_chunk]
            best = torch.full((block.shape[0],), -torch.inf)
            for c0 in range(0, ref_t.shape[0], chunk_size):
                torch.maximum(best, (block @ ref_t[c0 : c0 + chunk_size].T).amax(dim=1), out=best)
            out[r0 : r0 + block.shape[0]] = best.numpy()
    return out


def reference_norms(reference: np.ndarray) -> dict[str, float | bool]:
    """Whether the reference rows are unit norm (within 1e-3), with their min and max L2 norm."""
    norms = np.linalg.norm(np.asarray(reference, dtype=np.float64), axis=1)
    low, high = (float(norms.min()), float(norms.max())) if len(norms) else (0.0, 0.0)
    return {"unit_norm": bool(len(norms)) and abs(low - 1) <= UNIT_NORM_TOLERANCE and abs(high - 1) <= UNIT_NORM_TOLERANCE,
            "min_norm": round(low, 6), "max_norm": round(high, 6)}

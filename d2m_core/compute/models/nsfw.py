"""The seed's `nsfw-image-oai-clip-vit-l-14` head: an MLP on CLIP ViT-L/14 image features -> NSFW probability.

The seed builds nn.Sequential(norm=BatchNorm1d(768, eps=0.0), dense=Linear(768, 64), relu, dense1=Linear(64, 512),
relu1, dense2=Linear(512, 256), relu2, dense3=Linear(256, 1), sigmoid), loads `nsfw_torch.pt` (a plain state dict
with those module names) strictly, runs it in eval mode on the L/14 image features cast to float32 and squeezes.

eps=0.0: torch (2.14) still builds BatchNorm1d(eps=0.0) and runs it in eval mode, but `F.batch_norm` raises
"ValueError: batch_norm eps must be positive during training" in training mode, and its eval kernels fold the
statistics into one scale and shift (x * (w / sqrt(var + eps)) + (b - mean * w / sqrt(var + eps))), which is not
the textbook expression bit for bit. `ZeroEpsBatchNorm1d` keeps BatchNorm1d's parameters and buffers (so the
state dict loads unchanged, strictly) and in eval mode computes exactly
(x - running_mean) / sqrt(running_var + eps) * weight + bias, with eps = 0.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from d2m_core.compute.weights import ResolvedWeights, WeightsError
from d2m_core.compute.weights_files import MODEL_FILES

log = logging.getLogger(__name__)

FEATURE_DIM = 768


class ZeroEpsBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose eval forward is (x - running_mean) / sqrt(running_var + eps) * weight + bias, eps may be 0."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(input)  # torch refuses eps=0 here: batch statistics need eps > 0
        self._check_input_dim(input)
        y = (input - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def build_nsfw_head() -> nn.Sequential:
    """The seed's module layout and names (state-dict keys norm.*, dense.*, dense1.*, dense2.*, dense3.*)."""
    return nn.Sequential(
        OrderedDict(
            [
                ("norm", ZeroEpsBatchNorm1d(FEATURE_DIM, eps=0.0)),
                ("dense", nn.Linear(FEATURE_DIM, 64)),
                ("relu", nn.ReLU()),
                ("dense1", nn.Linear(64, 512)),
                ("relu1", nn.ReLU()),
                ("dense2", nn.Linear(512, 256)),
                ("relu2", nn.ReLU()),
                ("dense3", nn.Linear(256, 1)),
                ("sigmoid", nn.Sigmoid()),
            ]
        )
    )


class NsfwImageHead:
    """(B, 768) L/14 image features -> (B,) float32 NSFW probabilities; always computed in float32 like the seed."""

    name = "nsfw-image-oai-clip-vit-l-14"
    raw_inputs: list[str] = []
    preprocessors: list[str] = []
    dependencies = ["oai-clip-vit-l14"]
    to_device = True
    output_fields = {"score": 0}
    weights_files = MODEL_FILES["nsfw-image-oai-clip-vit-l-14"]

    def __init__(self, device: torch.device | int | str, *, dtype: torch.dtype = torch.float32, weights: ResolvedWeights) -> None:
        self.device = torch.device(device)
        if dtype != torch.float32:
            log.debug("%s: runs in float32 as the seed does (asked for %s)", self.name, dtype)
        self.dtype = torch.float32
        self.weights = weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_nsfw_head()  # random weights: this init, running mean 0 / var 1 (BatchNorm defaults)
        if not weights.is_random:
            try:
                state_dict = torch.load(weights.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is a weights problem
                raise WeightsError(f"{self.name}: cannot read {weights.path} as a torch state dict: {exc}") from exc
            if not isinstance(state_dict, dict):
                raise WeightsError(f"{self.name}: {weights.path} holds a {type(state_dict).__name__}, not a state dict")
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as exc:
                raise WeightsError(f"{self.name}: {weights.path} does not fit the NSFW head: {exc}") from exc
        self.model = model.to(self.device, torch.float32).eval()

    @torch.inference_mode()
    def __call__(self, l14_image_features: torch.Tensor) -> torch.Tensor:
        x = l14_image_features.to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != FEATURE_DIM:
            raise ValueError(f"{self.name}: expected (B, {FEATURE_DIM}) features, got {tuple(x.shape)}")
        return self.model(x).squeeze(-1)

    def score(self, features: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """NumPy convenience: (N, 768) features -> (N,) float32 probabilities on the CPU."""
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM:
            raise ValueError(f"{self.name}: expected (N, {FEATURE_DIM}) features, got {feats.shape}")
        out = np.empty(feats.shape[0], dtype=np.float32)
        for start in range(0, feats.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(feats[start : start + batch_size], dtype=np.float32))
            out[start : start + chunk.shape[0]] = self(chunk).cpu().numpy()
        return out

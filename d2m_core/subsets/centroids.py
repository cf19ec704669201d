"""Nearest pool centroid of CLIP L/14 image features, for DataComp's image-based baseline.

As baselines/apply_filter.py: the pool's k-means centroids (`{scale}_centroids_l14.pt`, a float32 array) and
the ImageNet-1k train-set L/14 image features (`in1k_clip_vit_l14_{0..4}.pt`, dicts with "image_features");
a sample's cluster is argmax of its feature's dot product with the centroids (float32, batched); it is kept
when some ImageNet-1k image falls in the same cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _load(path: Path) -> Any:
    # DataComp's files hold a numpy array / a dict of tensors; they are sha256-checked (or named by the user)
    return torch.load(path, map_location="cpu", weights_only=False)


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


class CentroidMatcher:
    """`near_target(features)`: whether each feature's nearest centroid is one an ImageNet-1k image is nearest to."""

    def __init__(self, centroids: Path, in1k_features: Sequence[Path], device: Any, batch_size: int = 1024) -> None:
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.batch_size = batch_size
        self.centroids = _as_tensor(_load(centroids)).float().to(self.device)
        target = torch.cat([_as_tensor(_load(p)["image_features"]) for p in in1k_features], dim=0)
        self.target_ids = torch.unique(self.assign(target))

    @torch.no_grad()
    def assign(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The index of each row's nearest centroid (largest dot product)."""
        features = _as_tensor(features)
        labels = torch.empty(features.shape[0], dtype=torch.long)
        for i in range(0, features.shape[0], self.batch_size):
            batch = features[i : i + self.batch_size].float().to(self.device)
            labels[i : i + self.batch_size] = (batch @ self.centroids.T).argmax(dim=1).cpu()
        return labels

    def near_target(self, features: np.ndarray) -> np.ndarray:
        return torch.isin(self.assign(features), self.target_ids).numpy()

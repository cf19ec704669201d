"""Scores computed from stored features: pure array functions, one per score asset."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def clip_similarity(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-wise dot product of unit-norm image and text features (the seed's CLIP score), float32."""
    if image.shape != text.shape:
        raise ValueError(f"image features {image.shape} and text features {text.shape} are not aligned")
    return np.einsum("bn,bn->b", image.astype(np.float32), text.astype(np.float32)).astype(np.float32)


def _clip_scores(parent: str) -> Callable[[dict[str, dict[str, np.ndarray]]], dict[str, np.ndarray]]:
    def compute(features: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {"score": clip_similarity(features[parent]["image"], features[parent]["text"])}

    return compute


SCORE_FUNCTIONS: dict[str, Callable[[dict[str, dict[str, np.ndarray]]], dict[str, np.ndarray]]] = {
    "clip_b32_scores": _clip_scores("clip_b32_features"),
}

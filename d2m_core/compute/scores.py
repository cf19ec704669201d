"""Scores computed from stored features: one scorer per score asset, built once per run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from d2m_core.outputs.records import WeightsRecord

Features = dict[str, dict[str, np.ndarray]]  # parent asset -> field -> rows


class Scorer(Protocol):
    weights: list[WeightsRecord]

    def __call__(self, features: Features) -> dict[str, np.ndarray]: ...


def clip_similarity(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-wise dot product of unit-norm image and text features (the seed's CLIP score), float32."""
    if image.shape != text.shape:
        raise ValueError(f"image features {image.shape} and text features {text.shape} are not aligned")
    return np.einsum("bn,bn->b", image.astype(np.float32, copy=False), text.astype(np.float32, copy=False)).astype(np.float32)


@dataclass
class ClipScorer:
    parent: str
    weights: list[WeightsRecord] = field(default_factory=list)

    def __call__(self, features: Features) -> dict[str, np.ndarray]:
        return {"score": clip_similarity(features[self.parent]["image"], features[self.parent]["text"])}


@dataclass
class FunctionScorer:
    """A scorer applying `fn` to one parent field (NSFW head on L/14 image features, dedup vs reference)."""

    parent: str
    field_name: str
    fn: Callable[[np.ndarray], np.ndarray]
    weights: list[WeightsRecord] = field(default_factory=list)

    def __call__(self, features: Features) -> dict[str, np.ndarray]:
        return {"score": np.asarray(self.fn(features[self.parent][self.field_name]), np.float32)}

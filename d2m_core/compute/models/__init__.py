"""Model registry in the seed's plugin shape: name -> class, plus the preprocessor lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from d2m_core.compute.models.clip import OaiClipVitB32, OaiClipVitL14
from d2m_core.compute.models.detoxify import DetoxifyMultilingual
from d2m_core.compute.models.faces import Scrfd10G
from d2m_core.compute.models.isc import IscFtV107
from d2m_core.compute.models.nsfw import NsfwImageHead
from d2m_core.compute.weights import ResolvedWeights, WeightsFile, plugin_weights, resolve_weights, weights_dir
from d2m_core.reading.transforms import IMAGE_TRANSFORMS, TEXT_PREPROCESSORS


class ModelClass(Protocol):
    """The seed's model contract, plus d2m's `output_fields` (name -> feature width, 0 for a scalar)."""

    name: str
    raw_inputs: list[str]
    preprocessors: list[str]
    dependencies: list[str]
    to_device: bool
    output_fields: dict[str, int]
    weights_files: list[WeightsFile]

    def __call__(self, *inputs: Any) -> Any: ...


BUILTIN_MODELS: tuple[type, ...] = (OaiClipVitB32, OaiClipVitL14, DetoxifyMultilingual, NsfwImageHead, Scrfd10G, IscFtV107)
MODEL_LOOKUP: dict[str, Any] = {cls.name: cls for cls in BUILTIN_MODELS}  # custom_pypath adds its models here


class UnknownModelError(ValueError):
    """A model name that is neither built in nor provided by custom_pypath."""


def list_models() -> list[str]:
    return sorted(MODEL_LOOKUP)


def model_class(name: str) -> type:
    try:
        return MODEL_LOOKUP[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def resolve_model_weights(name: str, configured_dir: str | None = None) -> ResolvedWeights:
    """Locate and verify a model's weights (or random weights when enabled), without loading them."""
    cls = model_class(name)
    if getattr(cls, "plugin_path", False):  # custom models load their own weights
        return plugin_weights(name, "custom_pypath")
    resolved = resolve_weights(name, list(cls.weights_files), weights_dir(configured_dir))
    if not resolved.is_random and hasattr(cls, "verify"):
        cls.verify(resolved)  # model-specific checks (detoxify: sha256 prefix, tokenizer folder)
    return resolved


def create_model(name: str, device: torch.device, dtype: torch.dtype, weights: ResolvedWeights) -> Any:
    """Build a model once, on `device` in `dtype`, from verified (or random) weights."""
    return model_class(name)(device, dtype=dtype, weights=weights)


def topo_order(names: list[str], dependencies: Callable[[str], list[str]] | None = None) -> list[str]:
    """Models ordered so each comes after its dependencies (which must also be selected), as the seed does."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"model dependency cycle at {name!r}")
        visiting.add(name)
        for dep in (dependencies or (lambda n: model_class(n).dependencies))(name):
            if dep not in names:
                raise ValueError(f"model {name!r} depends on {dep!r}, which is not in `models`")
            visit(dep)
        visiting.discard(name)
        ordered.append(name)

    for n in names:
        visit(n)
    return ordered


__all__ = [
    "IMAGE_TRANSFORMS",
    "MODEL_LOOKUP",
    "TEXT_PREPROCESSORS",
    "ModelClass",
    "UnknownModelError",
    "create_model",
    "list_models",
    "model_class",
    "resolve_model_weights",
    "topo_order",
]

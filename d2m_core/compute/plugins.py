"""custom_pypath plugins in the seed's format: four lookups merged into d2m's registries.

A plugin file defines `model_lookup`, `preprocessor_lookup`, `postprocess_parquet_lookup` and
`postprocess_feature_lookup`. Model classes have `name`, `raw_inputs`, `preprocessors`, `dependencies`,
`to_device` and are built as `cls(device)`; preprocessors take a PIL RGB image or a caption and return a
tensor; postprocessors take the dict of model outputs (model name -> its output) and return one value per
sample. Custom models run in the same one-pass engine, each as its own feature asset `custom_<name>`.
Loading a plugin runs its code: only point custom_pypath at files you trust.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from d2m_core import catalog
from d2m_core.compute.engine import RAGGED
from d2m_core.compute.postprocessors import seed_helpers_importable
from d2m_core.compute.weights import ResolvedWeights
from d2m_core.reading.transforms import IMAGE_TRANSFORMS, TEXT_PREPROCESSORS

LOOKUPS = ("model_lookup", "preprocessor_lookup", "postprocess_parquet_lookup", "postprocess_feature_lookup")
_INSTALLED: dict[str, "Plugin"] = {}


class PluginError(ValueError):
    """A custom_pypath file that is missing, does not load, or breaks the seed's plugin contract."""


@dataclass(frozen=True)
class Plugin:
    path: str
    models: dict[str, type]
    preprocessors: dict[str, Callable[[Any], Any]]
    columns: dict[str, Callable[[dict[str, Any]], Any]]
    features: dict[str, Callable[[dict[str, Any]], Any]]


def asset_name(model: str) -> str:
    return "custom_" + re.sub(r"\W", "_", model)


def load_plugin(path: str | Path) -> Plugin:
    """Import the file (it runs) and check its four lookups."""
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"custom_pypath {path} does not exist")
    seed_helpers_importable()  # `from dataset2metadata.postprocessors import select, ...`, as seed plugins begin
    spec = importlib.util.spec_from_file_location(f"d2m_plugin_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise PluginError(f"custom_pypath {path} failed to load: {type(err).__name__}: {err}") from err
    missing = [name for name in LOOKUPS if not isinstance(getattr(module, name, None), dict)]
    if missing:
        raise PluginError(f"custom_pypath {path} lacks the lookup(s) {', '.join(missing)}")
    for name, cls in module.model_lookup.items():
        for attr in ("raw_inputs", "preprocessors", "dependencies", "to_device"):
            if not hasattr(cls, attr):
                raise PluginError(f"custom model {name!r} in {path} has no `{attr}`")
        bad = [i for i in cls.raw_inputs if i not in ("image", "text")]
        if bad:
            raise PluginError(f"custom model {name!r}: raw_inputs {bad} not supported (only 'image' and 'text')")
    return Plugin(str(path), dict(module.model_lookup), dict(module.preprocessor_lookup),
                  dict(module.postprocess_parquet_lookup), dict(module.postprocess_feature_lookup))


class PluginModel:
    """Adapts a seed-style model class to d2m's model interface (outputs named "0", "1", ...)."""

    weights_files: list = []

    def __init__(self, cls: type, device: torch.device, dtype: torch.dtype, weights: ResolvedWeights) -> None:
        self.inner = cls(device)
        self.name = cls.name if hasattr(cls, "name") else ""
        self.raw_inputs = list(cls.raw_inputs)
        self.preprocessors = list(cls.preprocessors)
        self.dependencies = list(cls.dependencies)
        self.to_device = bool(cls.to_device)
        self.output_fields: dict[str, int] = dict(getattr(cls, "output_fields", {}) or {})
        self.weights = weights

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        out = self.inner(*inputs)
        # A tuple (or a list of tensors) is several outputs; any other list is one value per sample (captions).
        several = isinstance(out, tuple) or (isinstance(out, list) and out and all(isinstance(v, torch.Tensor) for v in out))
        values = tuple(out) if several else (out,)
        if not self.output_fields:  # learnt from the first batch: one field per output
            self.output_fields = {str(i): _field_width(v) for i, v in enumerate(values)}
        return values


def _field_width(value: Any) -> int:
    """Feature width of a tensor output, 0 for one number per sample, RAGGED for per-sample Python values."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.shape[1] if value.ndim > 1 else 0
    return RAGGED


def _plugin_factory(cls: type) -> Callable[..., PluginModel]:
    def build(device: torch.device, *, dtype: torch.dtype = torch.float32, weights: ResolvedWeights) -> PluginModel:
        return PluginModel(cls, device, dtype, weights)

    build.name = cls.name if hasattr(cls, "name") else ""  # type: ignore[attr-defined]
    build.dependencies = list(cls.dependencies)  # type: ignore[attr-defined]
    build.raw_inputs = list(cls.raw_inputs)  # type: ignore[attr-defined]  # what the engine reads before building
    build.preprocessors = list(cls.preprocessors)  # type: ignore[attr-defined]
    build.plugin_path = True  # type: ignore[attr-defined]
    build.weights_files = []  # type: ignore[attr-defined]
    return build


@dataclass(frozen=True)
class PluginImageTransform:
    """A plugin preprocessor on PIL images: run in the loader, stacked, moved to the device as is."""

    name: str
    fn: Callable[[Image.Image], torch.Tensor]

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, None]:
        out = self.fn(image)
        return (out[0] if out.ndim == 4 and out.shape[0] == 1 else out), None

    def finish(self, pixels: torch.Tensor, aux: None, dtype: torch.dtype) -> torch.Tensor:
        return pixels


def _text_factory(fn: Callable[[str], Any]) -> Callable[[], Callable[[list[str]], Any]]:
    def batch(texts: list[str]) -> Any:
        values = [fn(t) for t in texts]
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return torch.stack([v[0] if v.ndim > 1 and v.shape[0] == 1 else v for v in values])
        return values

    return lambda: batch


def install_plugin(path: str | Path) -> Plugin:
    """Merge a plugin into the registries ; idempotent.

    Unlike the seed, a plugin may not redefine a built-in name: d2m's assets would change meaning."""
    from d2m_core.compute import models

    key = str(Path(path).resolve())
    if key in _INSTALLED:
        return _INSTALLED[key]
    plugin = load_plugin(key)
    clashes = [n for n in plugin.models if n in models.MODEL_LOOKUP]
    clashes += [n for n in plugin.preprocessors if n in IMAGE_TRANSFORMS or n in TEXT_PREPROCESSORS]
    clashes += [n for n in (*plugin.columns, *plugin.features) if n in catalog.COLUMNS or n in catalog.FEATURES]
    if clashes:
        raise PluginError(f"custom_pypath {key} redefines built-in name(s) {', '.join(clashes)}: rename them")
    for name, cls in plugin.models.items():
        models.MODEL_LOOKUP[name] = _plugin_factory(cls)
        for raw, pre in zip(cls.raw_inputs, cls.preprocessors):
            if pre in plugin.preprocessors:
                if raw == "image":
                    IMAGE_TRANSFORMS[pre] = PluginImageTransform(pre, plugin.preprocessors[pre])
                else:
                    TEXT_PREPROCESSORS[pre] = _text_factory(plugin.preprocessors[pre])
        if name not in catalog.MODEL_ASSETS:
            asset = asset_name(name)
            catalog.FEATURE_ASSETS[asset] = catalog.FeatureAsset(asset, name, f"custom model {name} ({key})")
            catalog.MODEL_ASSETS[name] = asset
    for table, lookup in ((catalog.COLUMNS, plugin.columns), (catalog.FEATURES, plugin.features)):
        for name, fn in lookup.items():
            table[name] = catalog.OutputName(name, catalog.METADATA_ASSET, name, compute=fn)
    _INSTALLED[key] = plugin
    return plugin

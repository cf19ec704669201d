"""The seed's postprocessor helpers for custom_pypath plugins, which import them as
`from dataset2metadata.postprocessors import select, ...` (see `seed_helpers_importable`).

Each takes the dict of model outputs (model name -> its output for the whole shard: a tensor, a tuple of
them, or a list of per-sample values) and returns one value per sample. `to_cpu` moves a tensor result to
the CPU, as in the seed; a non-tensor result is returned as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import torch


def _cpu(value: Any, to_cpu: bool) -> Any:
    return value.cpu() if to_cpu and isinstance(value, torch.Tensor) else value


def batched_dot_product_index(cache: dict[str, Any], model: str, i: int, j: int, to_cpu: bool = True) -> Any:
    """Row-wise dot product of the model's outputs i and j (CLIP: image . text)."""
    return _cpu((cache[model][i] * cache[model][j]).sum(dim=1), to_cpu)


def batched_dot_product(cache: dict[str, Any], model: str, to_cpu: bool = True) -> Any:
    return batched_dot_product_index(cache, model, 0, 1, to_cpu=to_cpu)


def select(cache: dict[str, Any], model: str, index: int, to_cpu: bool = True) -> Any:
    """The model's output number `index`."""
    return _cpu(cache[model][index], to_cpu)


def identity(cache: dict[str, Any], model: str, to_cpu: bool = True) -> Any:
    """The model's output as it is."""
    return _cpu(cache[model], to_cpu)


def transpose_list(cache: dict[str, Any], model: str) -> list[list[Any]]:
    """Per-field lists to per-sample lists."""
    return [list(row) for row in zip(*cache[model])]


def seed_helpers_importable() -> None:
    """Let plugins written for the seed import `dataset2metadata.postprocessors` unchanged: when the real
    dataset2metadata package is not installed, that name is this module. When it is installed, nothing is
    touched and plugins get the real helpers (they take the same arguments)."""
    if "dataset2metadata" in sys.modules or importlib.util.find_spec("dataset2metadata") is not None:
        return
    package = types.ModuleType("dataset2metadata", "d2m's stand-in for the seed package: only its postprocessors")
    package.__path__ = []  # a package, so `import dataset2metadata.postprocessors` resolves from sys.modules
    package.postprocessors = sys.modules[__name__]  # type: ignore[attr-defined]
    sys.modules["dataset2metadata"] = package
    sys.modules["dataset2metadata.postprocessors"] = sys.modules[__name__]

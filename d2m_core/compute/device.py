"""Device and precision choice: explicit arguments everywhere, resolved once from the config."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: int | str) -> torch.device:
    """The seed's `device` (a CUDA index, or 'cpu'/'cuda[:N]'); without CUDA, the CPU with a warning."""
    if isinstance(spec, str) and spec.strip().lower() == "cpu":
        return torch.device("cpu")
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        spec = int(spec)
    if isinstance(spec, int) and spec < 0:
        return torch.device("cpu")
    wanted = torch.device("cuda", spec) if isinstance(spec, int) else torch.device(spec)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %r asked for, but CUDA is not available: running on the CPU", spec)
        return torch.device("cpu")
    return wanted


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA (the seed ran OpenAI CLIP in fp16) and fp32 on the CPU."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device` without waiting for the device: a host tensor bound for CUDA is pinned first, since
    torch copies from pageable memory synchronously (the stream's queued work done first, so the thread that
    issues the models would wait for the previous batch)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)

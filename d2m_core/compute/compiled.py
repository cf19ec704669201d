"""`torch_compile: true`: the heaviest image encoders run through torch.compile (inductor, weights frozen).

Measured on an H200 (bf16, a batch of 512, random weights; `bench/levers.py models --compile`): ISC's network
321.8 -> 196.8 ms (1.63x; 52 s to compile), CLIP L/14's image tower 205.0 -> 180.4 ms (1.14x; 24 s), cosine
to the float32 model unchanged (0.9998 and 0.99997 at least). A model names what to compile in
`compiled_parts` (attribute path -> the (C, H, W) of one input and its memory format).

Compiling costs tens of seconds per process (less with inductor's on-disk cache, which later processes on the
same machine reuse), once per input shape. So each compiled part is compiled for whole batches only, at
`build` (before the first shard is read): a shorter batch (a shard's last; a half after an out-of-memory
split) is padded up to the next of batch_size, batch_size/2, batch_size/4, ... and the padding's rows are
dropped from the output. A shard's short last batch thus reuses the full batch's graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

Part = tuple[tuple[int, int, int], torch.memory_format]  # one input's (C, H, W), its memory format


def bucket(rows: int, batch_size: int) -> int:
    """The padded size of a batch of `rows`: the smallest batch_size / 2**k (k >= 0) that holds them."""
    if rows > batch_size:
        return rows
    size = batch_size
    while size // 2 >= rows and size > 1:
        size //= 2
    return size


class StaticBatch(nn.Module):
    """`module` compiled for fixed batch sizes (see `bucket`): forward pads the batch, runs, and cuts back."""

    def __init__(self, module: nn.Module, batch_size: int, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)
        self.batch_size = batch_size
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The graph is always handed a batch made here, in inference mode: an input made outside it (as the
        engine's are) has another dispatch key set, and dynamo would recompile for it (measured: 17 s for
        B/32 on the CPU, minutes for ISC + L/14 + B/32 on an H200)."""
        rows = x.shape[0]
        size = bucket(rows, self.batch_size)
        with torch.inference_mode():
            batch = torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=self.memory_format)
            batch[:rows].copy_(x)
            if size > rows:
                batch[rows:].zero_()
            out = self.compiled(batch)
        return out if size == rows else out[:rows]


def _resolve(root: Any, path: str) -> tuple[Any, str]:
    *parents, leaf = path.split(".")
    for name in parents:
        root = getattr(root, name)
    return root, leaf


def compile_models(models: Mapping[str, Any], batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Replace each model's `compiled_parts` by a StaticBatch and compile it now, on a full batch of zeros.
    Returns the seconds each model took. Models that name no parts are left as they are."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the weights are constants: conv + batch-norm folding and the like
    seconds: dict[str, float] = {}
    for name, model in models.items():
        parts: dict[str, Part] = getattr(model, "compiled_parts", {})
        if not parts:
            continue
        start = time.perf_counter()
        for path, (shape, memory_format) in parts.items():
            owner, leaf = _resolve(model, path)
            wrapped = StaticBatch(getattr(owner, leaf), batch_size, memory_format)
            setattr(owner, leaf, wrapped)
            wrapped(torch.zeros((batch_size, *shape), dtype=dtype, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start
        log.info("%s: compiled %s in %.1f s", name, ", ".join(parts), seconds[name])
    return seconds

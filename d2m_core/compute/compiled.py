"""Fixed-size batches for the heaviest networks: `torch_compile: true` (torch.compile, inductor, weights frozen)
and `cuda_graphs: true` (each batch size captured once as a CUDA graph and replayed).

A model names its parts in `static_parts`: attribute path -> `StaticInput` (one row's shape, memory format and
dtype, and whether torch_compile compiles it). ISC's network and CLIP's image towers are compiled and captured;
CLIP's text tower (`encode_text`) is only captured.

torch.compile, measured on an H200 (bf16, a batch of 512, random weights; `bench/levers.py models --compile`):
ISC's network 321.8 -> 196.8 ms (1.63x; 52 s to compile), CLIP L/14's image tower 205.0 -> 180.4 ms (1.14x;
24 s), cosine to the float32 model unchanged (0.9998 and 0.99997 at least). Compiling costs tens of seconds per
process (less with inductor's on-disk cache, which later processes on the same machine reuse), once per input
shape.

CUDA graphs take the Python out of a forward pass: a replay issues the whole network's kernels at once, where
the eager network has its thread issue each of hundreds of operations, holding the GIL that the loader threads
also need. Capturing costs a forward pass per batch size, at the model build; the graphs share one memory pool
(only one replays at a time, and each replay's output is copied out before the next).

Either way a part runs for whole batches only: a shorter batch (a shard's last; a half after an out-of-memory
split; a batch with failed samples) is padded up to the next of batch_size, batch_size/2, batch_size/4, ...
and the padding's rows are dropped from the output, so the graphs made at the build serve every batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticInput:
    """One row of a part's input: its shape, memory format and dtype (None: the model's), and whether
    `torch_compile` compiles the part (`cuda_graphs` captures every part)."""

    shape: tuple[int, ...]
    memory_format: torch.memory_format = torch.contiguous_format
    dtype: torch.dtype | None = None
    compile: bool = True


def bucket(rows: int, batch_size: int) -> int:
    """The padded size of a batch of `rows`: the smallest batch_size / 2**k (k >= 0) that holds them."""
    if rows > batch_size:
        return rows
    size = batch_size
    while size // 2 >= rows and size > 1:
        size //= 2
    return size


def buckets(batch_size: int) -> list[int]:
    """Every size `bucket` pads to, largest first."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(bucket(sizes[-1] // 2, batch_size))
    return sizes


class StaticBatch(nn.Module):
    """`part` run for fixed batch sizes (see `bucket`), compiled with torch.compile if asked: forward pads the
    batch, runs it (replaying its CUDA graph once `capture` made them), and cuts the output back."""

    def __init__(self, part: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                 memory_format: torch.memory_format = torch.contiguous_format, *, compile: bool = True) -> None:
        super().__init__()
        self.run = torch.compile(part, dynamic=False) if compile else part
        self.batch_size = batch_size
        self.memory_format = memory_format
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The part is always handed a batch made here, in inference mode: an input made outside it (as the
        engine's are) has another dispatch key set, and dynamo would recompile for it (measured: 17 s for
        B/32 on the CPU, minutes for ISC + L/14 + B/32 on an H200)."""
        rows = x.shape[0]
        size = bucket(rows, self.batch_size)
        with torch.inference_mode():
            if size in self.graphs:
                graph, batch, out = self.graphs[size]
                self._fill(batch, x)
                graph.replay()
                return out[:rows].clone()  # the next replay overwrites `out`
            batch = torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=self.memory_format)
            self._fill(batch, x)
            out = self.run(batch)
        return out if size == rows else out[:rows]

    @staticmethod
    def _fill(batch: torch.Tensor, x: torch.Tensor) -> None:
        rows = x.shape[0]
        batch[:rows].copy_(x)
        if batch.shape[0] > rows:
            batch[rows:].zero_()

    def capture(self, row: tuple[int, ...], dtype: torch.dtype, device: torch.device, pool: Any) -> None:
        """A CUDA graph for each batch size, largest first, in memory pool `pool` (shared by all graphs)."""
        with torch.inference_mode():
            for size in buckets(self.batch_size):
                batch = torch.zeros((size, *row), dtype=dtype, device=device).contiguous(memory_format=self.memory_format)
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, cuBLAS workspaces
                    for _ in range(2):
                        self.run(batch)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.run(batch)
                self.graphs[size] = (graph, batch, out)


def _resolve(root: Any, path: str) -> tuple[Any, str]:
    *parents, leaf = path.split(".")
    for name in parents:
        root = getattr(root, name)
    return root, leaf


def _replace(owner: Any, leaf: str, wrapped: StaticBatch) -> None:
    """Put `wrapped` where `owner.leaf` was: a submodule's place, or (a method such as CLIP's `encode_text`)
    the instance's own attribute, which comes before the class's method."""
    if isinstance(owner, nn.Module) and leaf in owner._modules:
        setattr(owner, leaf, wrapped)
    else:
        object.__setattr__(owner, leaf, wrapped)


def static_models(models: Mapping[str, Any], batch_size: int, device: torch.device, dtype: torch.dtype, *,
                  compile: bool, graphs: bool) -> dict[str, float]:
    """Replace each model's `static_parts` by StaticBatches: with `compile`, the parts marked for it compiled
    now on a full batch of zeros; with `graphs` (CUDA only), every part captured for every batch size.
    Returns the seconds each model took; models that name no parts are left as they are."""
    if graphs and device.type != "cuda":
        log.warning("cuda_graphs: true needs a CUDA device; running the models without graphs on %s", device)
        graphs = False
    if not (compile or graphs):
        return {}
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # the weights are constants: conv + batch-norm folding and the like
    pool = torch.cuda.graph_pool_handle() if graphs else None
    seconds: dict[str, float] = {}
    for name, model in models.items():
        parts: dict[str, StaticInput] = {path: part for path, part in getattr(model, "static_parts", {}).items()
                                         if graphs or part.compile}
        if not parts:
            continue
        start = time.perf_counter()
        for path, part in parts.items():
            owner, leaf = _resolve(model, path)
            wrapped = StaticBatch(getattr(owner, leaf), batch_size, part.memory_format, compile=compile and part.compile)
            _replace(owner, leaf, wrapped)
            row_dtype = part.dtype or dtype
            if graphs:
                try:
                    wrapped.capture(part.shape, row_dtype, device, pool)
                except Exception as err:  # noqa: BLE001 - a part that cannot be captured runs as it is, said so
                    wrapped.graphs.clear()
                    log.warning("%s: %s could not be captured as a CUDA graph, so it runs without one: %s: %s",
                                name, path, type(err).__name__, " ".join(str(err).split())[:300])
            else:
                wrapped(torch.zeros((batch_size, *part.shape), dtype=row_dtype, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start
        log.info("%s: %s %s in %.1f s", name, " and ".join(w for w, on in (("compiled", compile), ("captured", graphs)) if on),
                 ", ".join(parts), seconds[name])
    return seconds

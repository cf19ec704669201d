"""GPU levers, measured side by side on one batch (random weights, flagged): JSON lines on stdout.

    python bench/levers.py resize --shards DIR        # batched resize: profile, and variants of its products
    python bench/levers.py models --shards DIR        # ISC and CLIP L/14: bf16 as now, BN folded, FP8 MLPs, compiled

Scratch for deciding which lever to pull; what is adopted moves into d2m_core with its tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from d2m_core.reading import batched_resize, fastpath


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _time(fn: Callable[[], Any], repeats: int = 5) -> tuple[float, Any]:
    out = fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best, 2), out


# ------------------------------------------------------------------------------------------------ resize

def _split_bf16(w: torch.Tensor, parts: int) -> list[torch.Tensor]:
    out, rest = [], w
    for _ in range(parts):
        head = rest.to(torch.bfloat16)
        out.append(head)
        rest = rest - head.to(torch.float32)
    return out


def resize_bmm(canvas: torch.Tensor, rows: Any, cols: Any, size: int, mode: str, parts: int = 0) -> torch.Tensor:
    """The same two passes as bmm on (N, 3H, W); parts > 0: the weights split in `parts` bf16 terms (pixels are
    integers <= 255, exact in bf16), one bf16 product with float32 output over the stacked terms."""
    n, c, h, w = canvas.shape
    across, across_pad = batched_resize.weights(cols, size, w, mode, canvas.device)  # (N, size, W)
    down, down_pad = batched_resize.weights(rows, size, h, mode, canvas.device)  # (N, size, H)
    a = canvas.reshape(n, c * h, w)
    if parts:
        stacked = torch.cat(_split_bf16(across.transpose(1, 2), parts), dim=2)  # (N, W, parts*size)
        x = torch.bmm(a.to(torch.bfloat16), stacked, out_dtype=torch.float32).view(n, c * h, parts, size).sum(2)
    else:
        x = torch.bmm(a, across.transpose(1, 2))  # (N, 3H, size)
    x = batched_resize._round(x.add_(255.0 * across_pad[:, None, :])).view(n, c, h, size)
    xt = x.transpose(2, 3).reshape(n, c * size, h)  # (N, 3*size(cols), H)
    if parts:
        stacked = torch.cat(_split_bf16(down.transpose(1, 2), parts), dim=2)  # (N, H, parts*size)
        y = torch.bmm(xt.to(torch.bfloat16), stacked, out_dtype=torch.float32).view(n, c * size, parts, size).sum(2)
    else:
        y = torch.bmm(xt, down.transpose(1, 2))  # (N, 3*size(cols), size(rows))
    y = y.view(n, c, size, size).transpose(2, 3)
    return batched_resize._round(y.add(255.0 * down_pad[:, None, :, None]))


def resize_main(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    data = fastpath.read_images(args.shards, args.images)
    decoded = fastpath.decode_batch(data, device)
    images = [i for i in decoded.images if i is not None and fastpath.aspect_failure(*i.shape[-2:]) is None]
    for names in (["clip-aug"], ["clip-aug", "faces-aug", "dedup-aug"]):
        ms, reference = _time(lambda: fastpath.prepare_tensors(images, names))
        row: dict[str, Any] = {"kind": "resize", "transforms": names, "images": len(images), "as_now_ms": ms}
        canvas_ms, _ = _time(lambda: [batched_resize.canvas_of([images[i] for i in c])
                                      for c in batched_resize.chunks([tuple(i.shape[-2:]) for i in images])])
        row["canvas_only_ms"] = canvas_ms
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            fastpath.prepare_tensors(images, names)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))
        row["top_device_us"] = {e.key[:60]: [round(getattr(e, "device_time_total", 0)), e.count] for e in events[:12]}
        row["device_us_total"] = round(sum(getattr(e, "self_device_time_total", 0) for e in events))
        saved = batched_resize.resize
        for label, parts in (("bmm", 0), ("bf16x3", 3), ("bf16x2", 2)):
            batched_resize.resize = lambda c, r, k, s, m, parts=parts: resize_bmm(c, r, k, s, m, parts)  # noqa: E731
            try:
                ms, out = _time(lambda: fastpath.prepare_tensors(images, names))
                diff = {n: (out[n][0].int() - reference[n][0].int()).abs() for n in names}
                row[f"{label}_ms"] = ms
                row[f"{label}_vs_now"] = {n: [int(d.max()), int((d > 0).sum())] for n, d in diff.items()}
            except Exception as err:  # noqa: BLE001
                row[f"{label}_error"] = f"{type(err).__name__}: {err}"[:300]
            finally:
                batched_resize.resize = saved
        row["pixels_per_transform"] = {n: int(reference[n][0].numel()) for n in names}
        _emit(**row)


# ------------------------------------------------------------------------------------------------ models

class Fp8Linear(torch.nn.Module):
    """nn.Linear with float8 e4m3 weights (per output row) and activations (per token row), torch._scaled_mm."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        self.weight8 = (w / scale).to(torch.float8_e4m3fn)
        self.scale_w = scale.t().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        q = (flat.float() / scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(q, self.weight8.t(), scale_a=scale, scale_b=self.scale_w, bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.view(*shape[:-1], self.out_features)


def fp8_mlps(visual: torch.nn.Module) -> int:
    count = 0
    for block in visual.transformer.resblocks:
        for attr in ("c_fc", "c_proj"):
            layer = getattr(block.mlp, attr)
            if isinstance(layer, torch.nn.Linear):
                setattr(block.mlp, attr, Fp8Linear(layer))
                count += 1
    return count


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold each timm BatchNormAct2d into the conv before it (eval): the BN becomes its activation only."""
    from timm.layers import BatchNormAct2d

    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, BatchNormAct2d) and conv.out_channels == bn.num_features:
                std = (bn.running_var + bn.eps).sqrt()
                gain = bn.weight / std
                conv.weight.data.mul_(gain.view(-1, 1, 1, 1))
                bias = bn.bias - bn.running_mean * gain
                conv.bias = torch.nn.Parameter(bias if conv.bias is None else conv.bias * gain + bias)
                setattr(parent, bn_name, torch.nn.Sequential(bn.drop, bn.act))
                folded += 1
    return folded


def _cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"min": round(float(c.min()), 5), "mean": round(float(c.mean()), 5)}


def _measure(model: str, label: str, make: Callable[[], torch.nn.Module], x: torch.Tensor, reference: torch.Tensor,
             compiled: bool = False) -> None:
    """Build one variant, compile it (timed) if asked, time it on `x`, emit a line; an error is a line too."""
    try:
        with torch.no_grad():
            network = make()
            fields: dict[str, Any] = {}
            if compiled:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True  # as d2m_core.compute.compiled
                t0 = time.perf_counter()
                network = torch.compile(network)
                network(x)
                torch.cuda.synchronize()
                fields["compile_s"] = round(time.perf_counter() - t0, 1)
            ms, out = _time(lambda: network(x), repeats=3)
        _emit(kind="model", model=model, variant=label, batch=x.shape[0], ms=ms, samples_per_s=round(1000 * x.shape[0] / ms),
              cosine_vs_fp32=_cosine(out, reference), **fields)
    except Exception as err:  # noqa: BLE001 - a lever that fails is a result
        _emit(kind="model", model=model, variant=label, error=f"{type(err).__name__}: {err}"[:400])
    torch.cuda.empty_cache()


def _reference(network: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The float32 network's outputs, `chunk` rows at a time."""
    with torch.no_grad():
        return torch.cat([network(x[k:k + chunk]) for k in range(0, x.shape[0], chunk)])


def models_main(args: argparse.Namespace) -> None:
    import copy

    from d2m_core.compute.models import isc as isc_mod
    from d2m_core.compute.models.clip import OaiClipVitL14, _load_open_clip
    from d2m_core.reading.transforms import CLIP_MEAN, CLIP_STD, HALF, normalize_uint8

    device = torch.device("cuda")
    data = fastpath.read_images(args.shards, args.batch)
    decoded = fastpath.decode_batch(data, device)
    images = [i for i in decoded.images if i is not None and fastpath.aspect_failure(*i.shape[-2:]) is None]
    pixels = fastpath.prepare_tensors(images, ["clip-aug", "dedup-aug"])
    only = set(args.only.split(",")) if args.only else {"isc", "l14"}

    if "isc" in only:
        x = normalize_uint8(pixels["dedup-aug"][0], HALF, HALF, torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = isc_mod.stable_random_init(isc_mod.build_isc_net()).eval()
        reference = _reference(copy.deepcopy(base).to(device).to(memory_format=torch.channels_last), x, 64)

        def bf16(fold: bool = False) -> torch.nn.Module:
            network = copy.deepcopy(base)
            if fold:
                _emit(kind="isc_fold", folded=fold_batchnorm(network))
            return network.to(device, torch.bfloat16).to(memory_format=torch.channels_last)

        x16 = x.to(torch.bfloat16)
        _measure("isc", "bf16", bf16, x16, reference)
        _measure("isc", "bf16_bn_folded", lambda: bf16(fold=True), x16, reference)
        if args.compile:
            _measure("isc", "bf16_compiled", bf16, x16, reference, compiled=True)

    if "l14" in only:
        x = normalize_uint8(pixels["clip-aug"][0], CLIP_MEAN, CLIP_STD, torch.float32)
        torch.manual_seed(0)
        base = _load_open_clip(OaiClipVitL14.arch, _random_weights(OaiClipVitL14)).visual.eval()
        reference = _reference(copy.deepcopy(base).to(device), x, 128)

        def bf16(fp8: bool = False) -> torch.nn.Module:
            network = copy.deepcopy(base).to(device, torch.bfloat16)
            if fp8:
                _emit(kind="l14_fp8", linears=fp8_mlps(network))
            return network

        x16 = x.to(torch.bfloat16)
        _measure("l14", "bf16", bf16, x16, reference)
        _measure("l14", "fp8_mlp", lambda: bf16(fp8=True), x16, reference)
        if args.compile:
            _measure("l14", "bf16_compiled", bf16, x16, reference, compiled=True)


def _random_weights(cls: Any) -> Any:
    from d2m_core.compute.weights import resolve_weights

    from pathlib import Path

    return resolve_weights(cls.name, cls.weights_files, Path("/nonexistent"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["resize", "models"])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="")
    args = parser.parse_args(argv)
    _emit(kind="levers", what=args.what, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    resize_main(args) if args.what == "resize" else models_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

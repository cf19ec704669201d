"""JPEG decoding with NVIDIA's nvImageCodec, when it is installed: the GPU path's decoder.

torchvision's CUDA `decode_jpeg` keeps one nvJPEG decoder per process behind a lock, so the loader's threads
decode one batch at a time: on an H200, 300-420 ms for 512 make-shards JPEGs (512 px, q95), which held the
loader to 2,300-2,900 samples/s whatever the thread count (`d2m bench --stage parts`). nvImageCodec gives each
loader thread its own decoder and uses the GPU's hardware JPEG engines (H100/H200/A100) where they take the
image, the CUDA decoder elsewhere. `:fancy_upsampling=1` asks for libjpeg's chroma upsampling (PIL's); the
IDCT still differs from libjpeg-turbo's, as nvJPEG's does. On the CPU its libjpeg-turbo backend is bit-identical
to PIL (tests/core/test_fastpath.py).

Install: `pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg` (CUDA 13 builds of torch). Without it the GPU path
decodes with torchvision as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
OPTIONS = ":fancy_upsampling=1"
_local = threading.local()
_failed: set[str] = set()


def available() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def _decoder(device: torch.device) -> Any | None:
    """This thread's decoder for `device` (made on first use), or None when nvImageCodec is missing or
    cannot make one there (said once per device)."""
    key = str(device)
    cache: dict[str, Any] = getattr(_local, "decoders", None) or {}
    _local.decoders = cache
    if key in cache:
        return cache[key]
    if key in _failed:
        return None
    try:
        from nvidia import nvimgcodec

        threads = max(1, (os.cpu_count() or 2) // 4)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cache[key] = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=threads, options=OPTIONS)
        else:
            cache[key] = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=threads,
                                            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)], options=OPTIONS)
    except Exception as err:  # noqa: BLE001 - ImportError, or no decoder on this device: torchvision decodes
        if not isinstance(err, ImportError):
            log.warning("nvImageCodec cannot decode on %s (%s): decoding with torchvision", device, err)
        _failed.add(key)
        return None
    log.info("JPEGs decode with nvImageCodec on %s", device)
    return cache[key]


def decode(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None] | None:
    """JPEGs as uint8 (3, H, W) RGB tensors on `device` (None for an image it cannot decode; no EXIF rotation,
    as PIL's path), or None when nvImageCodec is not usable here. On CUDA the decode is ordered on the current
    stream."""
    decoder = _decoder(device)
    if decoder is None:
        return None
    from nvidia import nvimgcodec

    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     sample_format=nvimgcodec.SampleFormat.P_RGB)
    try:
        streams = [nvimgcodec.CodeStream(bytes(item)) for item in data]
        if device.type == "cuda":
            images = decoder.decode(streams, params=params, cuda_stream=torch.cuda.current_stream(device).cuda_stream)
            return [None if image is None else torch.as_tensor(image, device=device) for image in images]
        images = decoder.decode(streams, params=params)
        return [None if image is None else torch.from_numpy(np.asarray(image.cpu())) for image in images]
    except Exception as err:  # noqa: BLE001 - a decoder that fails as a whole is not used again: torchvision decodes
        if "out of memory" in str(err).lower():
            raise
        log.warning("nvImageCodec failed on %s (%s: %s): decoding with torchvision from now on", device,
                    type(err).__name__, err)
        _failed.add(str(device))
        _local.decoders.pop(str(device), None)
        return None

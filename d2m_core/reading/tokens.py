"""Text preprocessing that reader processes may run (`READER_TEXT_PREPROCESSORS`): light to import (torch,
ftfy, regex; not torchvision or open_clip's model zoo), so a reader starts fast."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

CLIP_CONTEXT_LENGTH = 77


def open_clip_tokenizer_module() -> Any:
    """open_clip's `tokenizer.py` (its own file, needing only torch, ftfy and regex) loaded without open_clip's
    package, which imports every model family first: reader processes tokenize at a third of the start-up CPU."""
    name = "d2m_open_clip_tokenizer"
    if name not in sys.modules:
        package = importlib.util.find_spec("open_clip")
        if package is None or not package.submodule_search_locations:
            raise ImportError("open_clip is not installed")
        spec = importlib.util.spec_from_file_location(name, f"{package.submodule_search_locations[0]}/tokenizer.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class ClipTokenizer:
    """OpenAI CLIP tokens: 77 tokens, lower-cased and cleaned, truncated with EOT kept last (open_clip's
    SimpleTokenizer, which `open_clip.get_tokenizer("ViT-B-32-quickgelu")` returns; a test checks they agree)."""

    name = "clip-tokens"

    def __init__(self) -> None:
        self._tokenizer = open_clip_tokenizer_module().SimpleTokenizer(context_length=CLIP_CONTEXT_LENGTH)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts, context_length=CLIP_CONTEXT_LENGTH)


# Run in the reader processes when the engine asks (GPU runs): pure CPU work returning a (B, ...) tensor, costly
# enough (open_clip's tokenizer: 100-250 us a caption, holding the GIL) to keep off the device stage's process.
READER_TEXT_PREPROCESSORS: dict[str, type[ClipTokenizer]] = {"clip-tokens": ClipTokenizer}

"""torchvision and open_clip imported without what d2m never calls: seconds off every run's start.

A run's step imports torch, torchvision and open_clip before it builds a model. Most of that time went to
modules d2m does not use (`python -X importtime`, this 2-core machine, idle: 7 s in all, 2.2 s of it torch):

- torchvision's package imports `torchvision.ops.roi_align`, which imports `torch._dynamo` (the compiler
  front end, 2.3 s) for one helper it calls only when `roi_align` runs under `torch.compile`. While
  torchvision is imported, `torch._dynamo.utils` is a stand-in whose function imports the real module on
  its first call, so `roi_align` behaves as before, and `torch.compile` imports `torch._dynamo` itself.
- open_clip's package imports every model family it knows: `timm` (0.3 s, and `torch._dynamo` again) and
  `transformers` (2 s) for timm and Hugging Face towers. d2m's CLIP models are OpenAI's, which need
  neither. `open_clip_for_openai_models()` loads the installed open_clip as a private copy
  (`d2m_open_clip`) while those two are absent, so `import open_clip` elsewhere in the process (a
  custom_pypath plugin building a SigLIP, say) still gets the whole package. If `open_clip` is already
  imported, that module is used; `timm` or `transformers` already imported are used as they are.

The stand-ins are in `sys.modules` only while torchvision or the copy is being imported (a fraction of a
second, once per process): another thread importing `torch._dynamo`, `timm` or `transformers` in that
window would see them, which no d2m thread does.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

OPEN_CLIP_COPY = "d2m_open_clip"
_UNUSED_BY_OPENAI_CLIP = ("timm", "transformers")  # open_clip imports them inside try/except ImportError
_lock = threading.Lock()


def _is_compile_supported(device_type: Any) -> bool:
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


@contextmanager
def _absent(names: tuple[str, ...]) -> Iterator[None]:
    """Make `import name` raise ImportError for modules not imported yet, for the block."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def import_torchvision() -> types.ModuleType:
    """torchvision, imported without importing `torch._dynamo` (see the module docstring)."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    with _lock:
        if "torch._dynamo" in sys.modules:
            import torchvision
            return torchvision
        stand_in = types.ModuleType("torch._dynamo.utils")
        stand_in.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
        sys.modules["torch._dynamo.utils"] = stand_in
        try:
            import torchvision
        finally:
            if sys.modules.get("torch._dynamo.utils") is stand_in:
                del sys.modules["torch._dynamo.utils"]
        return torchvision


def open_clip_for_openai_models() -> types.ModuleType:
    """open_clip's package for OpenAI CLIP models: `create_model`, `load_openai_model`, `load_checkpoint` and
    the rest of its API, without the timm and Hugging Face model families (see the module docstring)."""
    for name in ("open_clip", OPEN_CLIP_COPY):
        if name in sys.modules:
            return sys.modules[name]
    import_torchvision()
    with _lock:
        if OPEN_CLIP_COPY in sys.modules:
            return sys.modules[OPEN_CLIP_COPY]
        package = importlib.util.find_spec("open_clip")
        if package is None or package.origin is None:
            raise ImportError("open_clip is not installed")
        spec = importlib.util.spec_from_file_location(OPEN_CLIP_COPY, package.origin,
                                                      submodule_search_locations=package.submodule_search_locations)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[OPEN_CLIP_COPY] = module
        try:
            with _absent(_UNUSED_BY_OPENAI_CLIP):
                spec.loader.exec_module(module)
        except BaseException:
            for name in [n for n in sys.modules if n == OPEN_CLIP_COPY or n.startswith(OPEN_CLIP_COPY + ".")]:
                del sys.modules[name]
            raise
        return module


def import_run_stack() -> None:
    """Import now what a run's compute imports as it goes, for a run worker started before its run: the engine
    (torch, torchvision and open_clip as above, the models), reading and writing, pandas (pyarrow imports it on
    a run's first table, about 1 s), PIL's image plugins (the first decoded image imports them) and the CLIP
    tokenizer's code (its vocabulary is read when the model is built)."""
    import d2m_core.compute.engine  # noqa: F401
    import d2m_core.outputs.writers  # noqa: F401
    import d2m_core.reading.loader  # noqa: F401
    import pandas  # noqa: F401
    from PIL import Image

    from d2m_core.reading.tokens import open_clip_tokenizer_module

    Image.init()
    open_clip_tokenizer_module()

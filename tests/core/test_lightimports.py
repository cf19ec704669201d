"""torchvision and open_clip as a run imports them: without torch._dynamo, timm and transformers, and the same
models as the real packages build."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_compute_stack_imports_without_dynamo_timm_or_transformers_and_leaves_them_importable() -> None:
    result = _run("""
        import json, sys
        import d2m_core.compute.pipeline  # what a run's step imports before building its models
        before = sorted(m for m in ("torch._dynamo", "timm", "transformers", "open_clip") if m in sys.modules)
        import importlib
        ra = importlib.import_module("torchvision.ops.roi_align")
        supported = ra.is_compile_supported("cpu")  # torchvision's helper, through the stand-in
        import torch._dynamo.utils
        import open_clip  # a plugin's own import: the whole package, with its timm and Hugging Face towers
        print(json.dumps({"before": before, "supported": supported,
                          "real": torch._dynamo.utils.is_compile_supported("cpu"),
                          "stand_in_gone": hasattr(torch._dynamo.utils, "counters"),
                          "plugin_timm": open_clip.timm_model.timm is not None,
                          "plugin_hf": open_clip.hf_model.transformers is not None,
                          "copy": sys.modules["d2m_core.compute.models.clip"].open_clip.__name__}))
    """)
    assert result["before"] == []
    assert result["supported"] == result["real"] is True
    assert result["stand_in_gone"]
    assert result["plugin_timm"] and result["plugin_hf"]
    assert result["copy"] == "d2m_open_clip"


def test_the_private_open_clip_builds_the_same_b32_as_open_clip() -> None:
    result = _run("""
        import json, torch
        from d2m_core.lightimports import open_clip_for_openai_models
        light = open_clip_for_openai_models()
        import open_clip
        assert light is not open_clip
        torch.manual_seed(0); a = light.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
        torch.manual_seed(0); b = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        image = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        tokens = open_clip.tokenize(["a cat", "a dog"])
        with torch.inference_mode():
            diff = max((a.encode_image(image) - b.encode_image(image)).abs().max().item(),
                       (a.encode_text(tokens) - b.encode_text(tokens)).abs().max().item())
        print(json.dumps({"keys": len(a.state_dict()), "same_keys": list(a.state_dict()) == list(b.state_dict()),
                          "same": same, "diff": diff}))
    """)
    assert result["keys"] > 100 and result["same_keys"] and result["same"]
    assert result["diff"] == 0.0


def test_open_clip_already_imported_is_the_one_used() -> None:
    result = _run("""
        import json, sys
        import open_clip
        from d2m_core.lightimports import open_clip_for_openai_models
        print(json.dumps({"same": open_clip_for_openai_models() is open_clip,
                          "copy": "d2m_open_clip" in sys.modules}))
    """)
    assert result == {"same": True, "copy": False}

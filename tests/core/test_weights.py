from pathlib import Path

import open_clip
import pytest
import torch

from d2m_core.compute.models import create_model, resolve_model_weights
from d2m_core.compute.models.clip import OaiClipVitB32
from d2m_core.compute.weights import WeightsError, WeightsFile, resolve_weights, sha256_of


@pytest.fixture
def real_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("D2M_RANDOM_WEIGHTS", raising=False)


def test_missing_weights_name_the_file_and_where_to_get_it(real_weights: None, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_model_weights("oai-clip-vit-b32", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "ViT-B-32.pt") in message
    assert "openaipublic.azureedge.net/clip/models/40d36571" in message and "D2M_RANDOM_WEIGHTS=1" in message


def test_weights_dir_from_environment(real_weights: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("D2M_WEIGHTS_DIR", str(tmp_path / "w"))
    with pytest.raises(WeightsError, match=str(tmp_path / "w" / "ViT-B-32.pt")):
        resolve_model_weights("oai-clip-vit-b32")


def test_corrupt_file_is_refused(real_weights: None, tmp_path: Path) -> None:
    (tmp_path / "ViT-B-32.pt").write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="expected 40d36571"):
        resolve_model_weights("oai-clip-vit-b32", str(tmp_path))


def test_random_weights_are_flagged() -> None:
    resolved = resolve_model_weights("oai-clip-vit-b32", "/nonexistent")
    assert resolved.is_random and resolved.record.as_dict() == {"model": "oai-clip-vit-b32", "kind": "random"}


def test_sidecar_sha256_pins_unpinned_formats(real_weights: None, tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"abc")
    spec = WeightsFile("m.bin", "open_clip", None, "somewhere")
    assert resolve_weights("m", [spec], tmp_path).record.sha256 == sha256_of(path)
    (tmp_path / "m.bin.sha256").write_text("0" * 64 + "  m.bin\n")
    with pytest.raises(WeightsError, match="says 0000"):
        resolve_weights("m", [spec], tmp_path)


def test_openai_and_open_clip_formats_load_the_same_model(real_weights: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    source = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    source.half().float()  # OpenAI's archives hold fp16 weights, and loading them goes through fp16
    torch.save(source.state_dict(), tmp_path / "ViT-B-32.pt")  # OpenAI layout (state dict, as their archive holds)
    torch.save(source.state_dict(), tmp_path / "ViT-B-32-quickgelu.openai.bin")
    files = list(OaiClipVitB32.weights_files)
    files[0] = WeightsFile("ViT-B-32.pt", "openai-jit", sha256_of(tmp_path / "ViT-B-32.pt"), files[0].source)
    monkeypatch.setattr(OaiClipVitB32, "weights_files", files)
    image = torch.rand(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")(["a dog", "a cat"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source.encode_image(image), dim=-1)
    openai = create_model("oai-clip-vit-b32", torch.device("cpu"), torch.float32,
                          resolve_model_weights("oai-clip-vit-b32", str(tmp_path)))
    assert openai.weights.record.kind == "official" and openai.weights.file.format == "openai-jit"
    assert torch.allclose(openai(image, tokens)[0], expected, atol=1e-5)
    (tmp_path / "ViT-B-32.pt").unlink()
    resolved = resolve_model_weights("oai-clip-vit-b32", str(tmp_path))
    assert resolved.file.format == "open_clip"
    other = create_model("oai-clip-vit-b32", torch.device("cpu"), torch.float32, resolved)
    assert torch.allclose(other(image, tokens)[0], expected, atol=1e-5)


def test_sha256_is_recomputed_only_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    first = sha256_of(path)
    assert sha256_of(path) == first
    path.write_bytes(b"two!")  # another size (and mtime): hashed again
    assert sha256_of(path) != first


def test_weight_records_say_what_is_known(real_weights: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned, user = tmp_path / "pinned.pt", tmp_path / "user.bin"
    pinned.write_bytes(b"the release's bytes")
    user.write_bytes(b"somebody's file")
    official_spec = WeightsFile("pinned.pt", "torch", sha256_of(pinned), "https://example.org/release/pinned.pt")
    user_spec = WeightsFile("user.bin", "open_clip", None, "https://example.org/hub/user.bin")
    assert resolve_weights("m", [official_spec], tmp_path).record.as_dict() == {
        "model": "m", "kind": "official", "path": str(pinned), "sha256": sha256_of(pinned),
        "source": "https://example.org/release/pinned.pt"}
    # unpinned: its sha256, and no source (nothing says it came from there)
    assert resolve_weights("m", [user_spec], tmp_path).record.as_dict() == {
        "model": "m", "kind": "user", "path": str(user), "sha256": sha256_of(user)}
    (tmp_path / "user.bin.sha256").write_text(sha256_of(user) + "\n")
    assert resolve_weights("m", [user_spec], tmp_path).record.kind == "user"  # a sidecar checks integrity only
    prefix_spec = WeightsFile("user.bin", "ckpt", None, "https://example.org/x", sha256_prefix=sha256_of(user)[:8])
    assert resolve_weights("m", [prefix_spec], tmp_path).record.kind == "official"
    with pytest.raises(WeightsError, match="expected 00000000..."):
        resolve_weights("m", [WeightsFile("user.bin", "ckpt", None, "https://example.org/x", sha256_prefix="0" * 8)],
                        tmp_path)
    monkeypatch.setenv("D2M_RANDOM_WEIGHTS", "1")
    assert resolve_weights("m", [official_spec], tmp_path).record.as_dict() == {"model": "m", "kind": "random"}


def test_builtin_weights_check_matches_the_models_and_finds_the_dedup_reference(real_weights: None, tmp_path: Path) -> None:
    """The torch-free check `d2m run` makes first: the same files the model classes load, each gap named."""
    from d2m_core.compute.models import BUILTIN_MODELS
    from d2m_core.compute.weights_files import MODEL_FILES, check_builtin_weights
    from d2m_core.config import parse_config

    assert {cls.name: cls.weights_files for cls in BUILTIN_MODELS} == MODEL_FILES
    base = {"nworkers": 1, "batch_size": 1, "device": "cpu", "input_tars": "x.tar", "weights_dir": str(tmp_path),
            "output_metadata_dir": str(tmp_path / "out")}
    dedup = parse_config(base | {"models": ["dedup-isc-ft-v107"], "postprocess_columns": ["dedup-isc-ft-v107-score"]})
    with pytest.raises(WeightsError, match=str(tmp_path / "isc_ft_v107.pth.tar")):
        check_builtin_weights(dedup)
    (tmp_path / "isc_ft_v107.pth.tar").write_bytes(b"no pin upstream: any file is the user's")
    with pytest.raises(WeightsError, match=str(tmp_path / "eval_dedup_embeddings.pt")):
        check_builtin_weights(dedup)
    check_builtin_weights(parse_config(base | {"models": ["dedup-isc-ft-v107"]}))  # no dedup score: no reference
    (tmp_path / "ViT-B-32.pt").write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="expected 40d36571"):
        check_builtin_weights(parse_config(base | {"models": ["oai-clip-vit-b32"]}))

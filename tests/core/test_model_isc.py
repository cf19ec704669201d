import argparse
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from d2m_core.compute.models.isc import (
    IscFtV107,
    dedup_scores,
    reference_norms,
    load_reference_embeddings,
    stable_random_init,
)
from d2m_core.compute.weights import WeightsError, WeightsFile, resolve_weights, sha256_of
from d2m_core.compute.weights_files import DEDUP_REFERENCE_FILES

NAME = IscFtV107.name


class SourceISCNet(nn.Module):
    """ISC21's ISCNet as isc_feature_extractor/model.py writes it (eval path, p = eval_p = 1.0)."""

    def __init__(self, backbone: nn.Module, fc_dim: int = 256, p: float = 1.0, eval_p: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(self.backbone.feature_info.info[-1]["num_chs"], fc_dim, bias=False)
        self.bn = nn.BatchNorm1d(fc_dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.constant_(self.bn.weight, 1)
        nn.init.constant_(self.bn.bias, 0)
        self.p, self.eval_p = p, eval_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        x = self.backbone(x)[-1]
        p = self.p if self.training else self.eval_p
        x = F.avg_pool2d(x.clamp(min=1e-6).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p).view(batch_size, -1)
        return F.normalize(self.bn(self.fc(x)))


@pytest.fixture(scope="module")
def source_model() -> SourceISCNet:
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm maps the 2021 name to tf_efficientnetv2_m.in21k_ft_in1k
        backbone = timm.create_model("tf_efficientnetv2_m_in21ft1k", pretrained=False, features_only=True)
    model = SourceISCNet(backbone)
    stable_random_init(model)  # eval-mode-stable weights, so that a comparison is meaningful at all
    with torch.no_grad():  # trained-looking head statistics
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.normal_(1, 0.1)
        model.bn.bias.normal_(0, 0.1)
    return model.eval()


def save_release_checkpoint(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """exp/v107.py's save_checkpoint dict: DDP-prefixed state dict, SGD state, argparse args."""
    args = argparse.Namespace(arch="tf_efficientnetv2_m_in21ft1k", input_size=512, gem_p=1.0, gem_eval_p=1.0,
                              weight=None, seed=None, distributed=True, lr=0.5)
    torch.save(
        {
            "epoch": 10,
            "arch": args.arch,
            "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "weight_decay": 0.0, "params": [0, 1]}]},
            "args": args,
        },
        path,
    )


@pytest.fixture
def real_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("D2M_RANDOM_WEIGHTS", raising=False)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # dedup-aug range


def test_random_weights_give_unit_norm_256d_features_at_512() -> None:
    weights = resolve_weights(NAME, IscFtV107.weights_files, Path("/nonexistent"))
    assert weights.is_random
    model = IscFtV107("cpu", weights=weights)
    assert not model.model.training
    batch = images(2, 512)
    (two,) = model(batch)
    (one,) = model(batch[:1])
    for z, b in ((two, 2), (one, 1)):
        assert z.shape == (b, 256) and z.dtype == torch.float32
        torch.testing.assert_close(z.norm(dim=1), torch.ones(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=1e-5)  # eval-mode BN: rows are independent
    assert not torch.allclose(two[0], two[1])


def test_release_checkpoint_loads_strictly_and_reproduces_the_source_model(
    real_weights: None, tmp_path: Path, source_model: SourceISCNet
) -> None:
    save_release_checkpoint(tmp_path / "isc_ft_v107.pth.tar", source_model.state_dict())
    weights = resolve_weights(NAME, IscFtV107.weights_files, tmp_path)
    assert not weights.is_random and weights.path == tmp_path / "isc_ft_v107.pth.tar"
    model = IscFtV107("cpu", weights=weights)
    loaded = model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source_model.state_dict().items())
    batch = images(2, 128, seed=1)  # fully convolutional: a small input checks the same computation
    with torch.no_grad():
        expected = source_model(batch)
    (got,) = model(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_checkpoint_with_wrong_keys_is_a_weights_error(real_weights: None, tmp_path: Path, source_model: SourceISCNet) -> None:
    state = dict(source_model.state_dict())
    state["head.weight"] = state.pop("fc.weight")
    save_release_checkpoint(tmp_path / "isc_ft_v107.pth.tar", state)
    weights = resolve_weights(NAME, IscFtV107.weights_files, tmp_path)
    with pytest.raises(WeightsError, match=r"1 missing keys \['fc.weight'\], 1 unexpected keys \['head.weight'\]"):
        IscFtV107("cpu", weights=weights)


def test_reference_embeddings_load_as_float32(real_weights: None, tmp_path: Path) -> None:
    ref = torch.randn(10, 256, dtype=torch.float16)
    torch.save(ref, tmp_path / "eval_dedup_embeddings.pt")
    assert DEDUP_REFERENCE_FILES[0].filename == "eval_dedup_embeddings.pt"
    loaded = load_reference_embeddings(tmp_path / "eval_dedup_embeddings.pt")
    assert loaded.dtype == np.float32 and loaded.shape == (10, 256)
    np.testing.assert_array_equal(loaded, ref.float().numpy())
    torch.save(torch.randn(10, 128), tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"\(N, 256\)"):
        load_reference_embeddings(tmp_path / "bad.pt")


def seed_scores(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The seed's arithmetic (IscFtV107Wrapper.forward): scores = z @ ref.T, max over the reference rows."""
    return (torch.from_numpy(features) @ torch.from_numpy(reference).T).max(dim=1).values.numpy()


def test_dedup_scores_are_z_at_ref_for_mixed_norm_reference_rows() -> None:
    rng = np.random.default_rng(0)
    norms = rng.uniform(0.5, 1.5, size=(53, 1)).astype(np.float32)
    reference = rng.normal(size=(53, 256)).astype(np.float32)
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True) * norms
    features = rng.normal(size=(11, 256)).astype(np.float32)
    features[3] = reference[40] * 7  # a (scaled) duplicate of a row in a later chunk
    features /= np.linalg.norm(features, axis=1, keepdims=True)  # the model's unit-norm outputs
    expected = seed_scores(features, reference)
    cosine = (features @ (reference / norms).T).max(axis=1)
    for chunk_size, row_chunk in ((8, 3), (53, 11), (1000, 4096), (1, 1)):
        got = dedup_scores(features, reference, chunk_size=chunk_size, row_chunk=row_chunk)
        assert got.dtype == np.float32 and got.shape == (11,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    got = dedup_scores(features, reference)
    assert got[3] == pytest.approx(float(norms[40, 0]), abs=1e-5)  # z . ref of the duplicate = |ref|, not 1
    assert float(np.abs(got - cosine).max()) > 0.05  # re-normalising the rows would change the scores
    assert reference_norms(reference) == {"unit_norm": False, "min_norm": pytest.approx(float(norms.min()), abs=1e-6),
                                          "max_norm": pytest.approx(float(norms.max()), abs=1e-6)}
    assert reference_norms(reference / norms)["unit_norm"] is True


def test_dedup_scores_edge_cases() -> None:
    ref = np.ones((1, 256), np.float32) / 16  # unit norm
    feats = np.stack([np.ones(256) / 16, -np.ones(256) / 16, np.zeros(256)]).astype(np.float32)
    np.testing.assert_allclose(dedup_scores(feats, ref), [1.0, -1.0, 0.0], atol=1e-6)
    assert dedup_scores(np.zeros((0, 256), np.float32), ref).shape == (0,)
    with pytest.raises(ValueError):
        dedup_scores(feats, np.zeros((0, 256), np.float32))
    with pytest.raises(ValueError):
        dedup_scores(feats, np.ones((4, 128), np.float32))


def test_dedup_reference_records_whether_rows_are_unit_norm(real_weights: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from d2m_core.compute import pipeline
    from d2m_core.config import D2MConfig
    from d2m_core.outputs.reference import reference_info

    rng = np.random.default_rng(2)
    ref = torch.from_numpy(rng.normal(size=(20, 256)).astype(np.float32))
    ref = torch.nn.functional.normalize(ref) * torch.linspace(0.5, 1.5, 20)[:, None]
    path = tmp_path / "eval_dedup_embeddings.pt"
    torch.save(ref, path)
    spec = DEDUP_REFERENCE_FILES[0]
    monkeypatch.setattr(pipeline, "DEDUP_REFERENCE_FILES",
                        [WeightsFile(spec.filename, spec.format, sha256_of(path), spec.source)])
    config = D2MConfig(models=["dedup-isc-ft-v107"], nworkers=0, batch_size=1, device="cpu", input_tars="x.tar",
                       output_metadata_dir=str(tmp_path / "out"), weights_dir=str(tmp_path))
    outcome = pipeline.store_reference(config)
    assert outcome.weights[0].kind == "official"
    assert outcome.metadata == {"unit_norm": False, "min_norm": pytest.approx(0.5, abs=1e-5),
                                "max_norm": pytest.approx(1.5, abs=1e-5)}
    info = reference_info(config)
    assert info["rows"] == 20 and info["max_norm"] == outcome.metadata["max_norm"] and info["unit_norm"] is False

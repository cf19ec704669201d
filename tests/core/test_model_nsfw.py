from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2m_core.compute.models.nsfw import NsfwImageHead, ZeroEpsBatchNorm1d, build_nsfw_head
from d2m_core.compute.weights import ResolvedWeights, WeightsError, WeightsFile, resolve_weights, sha256_of

NAME = NsfwImageHead.name


def release_layout_state_dict() -> OrderedDict[str, torch.Tensor]:
    """A state dict in nsfw_torch.pt's layout (the seed's module names), with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(3)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["norm.weight"] = torch.randn(768, generator=g)
    sd["norm.bias"] = torch.randn(768, generator=g)
    sd["norm.running_mean"] = torch.randn(768, generator=g) * 0.05
    sd["norm.running_var"] = torch.rand(768, generator=g) * 1e-3 + 1e-5  # small variances: eps would matter
    sd["norm.num_batches_tracked"] = torch.tensor(0)
    for name, (n_in, n_out) in {"dense": (768, 64), "dense1": (64, 512), "dense2": (512, 256), "dense3": (256, 1)}.items():
        sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        sd[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return sd


def by_hand(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = (x - sd["norm.running_mean"]) / torch.sqrt(sd["norm.running_var"] + 0.0) * sd["norm.weight"] + sd["norm.bias"]
    h = torch.relu(F.linear(h, sd["dense.weight"], sd["dense.bias"]))
    h = torch.relu(F.linear(h, sd["dense1.weight"], sd["dense1.bias"]))
    h = torch.relu(F.linear(h, sd["dense2.weight"], sd["dense2.bias"]))
    return torch.sigmoid(F.linear(h, sd["dense3.weight"], sd["dense3.bias"])).squeeze(-1)


def unit_features(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, 768, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def real_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("D2M_RANDOM_WEIGHTS", raising=False)


def saved_head(tmp_path: Path, sd: dict[str, torch.Tensor]) -> ResolvedWeights:
    path = tmp_path / "nsfw_torch.pt"
    torch.save(sd, path)
    spec = WeightsFile("nsfw_torch.pt", "torch-state-dict", sha256_of(path), NsfwImageHead.weights_files[0].source)
    return resolve_weights(NAME, [spec], tmp_path)


def test_release_state_dict_loads_and_matches_the_formula_exactly(real_weights: None, tmp_path: Path) -> None:
    sd = release_layout_state_dict()
    weights = saved_head(tmp_path, sd)
    assert not weights.is_random
    head = NsfwImageHead("cpu", weights=weights)
    assert head.model.norm.eps == 0.0 and not head.model.training
    x = unit_features(5)
    got = head(x)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, by_hand(sd, x))
    np.testing.assert_array_equal(head.score(x.numpy()), by_hand(sd, x).numpy())
    # chunked: BLAS may take another path for other batch sizes, so equal only to float32 rounding
    np.testing.assert_allclose(head.score(x.numpy(), batch_size=2), got.numpy(), rtol=0, atol=1e-6)


def test_batch_of_one_keeps_its_batch_dimension_and_probabilities_are_in_range() -> None:
    head = NsfwImageHead("cpu", weights=resolve_weights(NAME, NsfwImageHead.weights_files, Path("/nonexistent")))
    assert head.weights.is_random
    one = head(unit_features(1))
    assert one.shape == (1,) and one.dtype == torch.float32
    probs = head.score(unit_features(64, seed=1).numpy() * 10)
    assert probs.shape == (64,) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    assert head.score(np.zeros((0, 768), np.float32)).shape == (0,)


def test_random_weights_are_seeded_and_sane() -> None:
    random = resolve_weights(NAME, NsfwImageHead.weights_files, Path("/nonexistent"))
    assert random.is_random
    a, b = NsfwImageHead("cpu", weights=random), NsfwImageHead("cpu", weights=random)
    assert torch.equal(a.model.dense.weight, b.model.dense.weight)
    assert torch.equal(a.model.norm.running_mean, torch.zeros(768))
    assert torch.equal(a.model.norm.running_var, torch.ones(768))
    x = unit_features(3)
    assert torch.equal(a(x), b(x)) and torch.isfinite(a(x)).all()


def test_eps_zero_is_refused_by_torch_only_in_training() -> None:
    native = nn.BatchNorm1d(768, eps=0.0)  # construction is fine
    with pytest.raises(ValueError, match="eps must be positive during training"):
        native(torch.randn(4, 768))
    native.eval()(torch.randn(4, 768))  # eval mode runs (but folds the statistics: not bit-exact)
    ours = ZeroEpsBatchNorm1d(768, eps=0.0)
    assert list(ours.state_dict()) == list(native.state_dict())
    assert list(build_nsfw_head().state_dict()) == list(release_layout_state_dict())


def test_wrong_state_dict_is_a_weights_error(real_weights: None, tmp_path: Path) -> None:
    sd = release_layout_state_dict()
    sd["fc.weight"] = sd.pop("dense.weight")
    with pytest.raises(WeightsError, match="does not fit the NSFW head"):
        NsfwImageHead("cpu", weights=saved_head(tmp_path, sd))


def test_bad_input_shape_is_refused() -> None:
    head = NsfwImageHead("cpu", weights=resolve_weights(NAME, NsfwImageHead.weights_files, Path("/nonexistent")))
    with pytest.raises(ValueError, match="768"):
        head(torch.zeros(2, 512))

"""custom_pypath plugins in the seed's format, run through `d2m run` (a subprocess: plugins install globally)."""

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli, tar_samples
from d2m_core.plugins import PluginError, load_plugin

PLUGIN = textwrap.dedent('''
    import numpy as np
    import torch

    class MeanColour:
        name = "mean-colour"
        raw_inputs = ["image", "text"]
        preprocessors = ["tiny-aug", "caption-length"]
        dependencies = []
        to_device = True

        def __init__(self, device):
            self.device = device

        def __call__(self, image, length):
            return image.mean(dim=(2, 3)), length.float()

    class Brightness:
        name = "brightness"
        raw_inputs = []
        preprocessors = []
        dependencies = ["mean-colour"]
        to_device = True

        def __init__(self, device):
            pass

        def __call__(self, mean_colour):
            return mean_colour[0].mean(dim=1)

    def tiny_aug(image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    model_lookup = {"mean-colour": MeanColour, "brightness": Brightness}
    preprocessor_lookup = {"tiny-aug": tiny_aug, "caption-length": lambda text: torch.tensor(len(text))}
    postprocess_parquet_lookup = {
        "mean-red": lambda outputs: outputs["mean-colour"][0][:, 0],
        "caption-length": lambda outputs: outputs["mean-colour"][1],
        "brightness-score": lambda outputs: outputs["brightness"],
    }
    postprocess_feature_lookup = {"mean-rgb": lambda outputs: outputs["mean-colour"][0]}
''')


def test_plugin_contract_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("model_lookup = {}\npreprocessor_lookup = {}\n")
    with pytest.raises(PluginError, match="postprocess_parquet_lookup, postprocess_feature_lookup"):
        load_plugin(bad)
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin(tmp_path / "missing.py")


def test_custom_models_run_in_the_one_pass_engine(shard_dir: Path, write_config, tmp_path: Path) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    config = write_config(shard_dir, models=["mean-colour", "brightness"], custom_pypath=str(plugin),
                          postprocess_columns=["mean-red", "caption-length", "brightness-score"],
                          postprocess_features=["mean-rgb"], additional_fields=["uid", "caption"])
    result = run_cli(["d2m", "run", "--yml", str(config)], {"DAGSTER_HOME": str(tmp_path / "home")}, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "metadata" / "00001.parquet")
    rgb = np.load(tmp_path / "metadata" / "00001.npz")["mean-rgb"]
    assert list(df.columns) == ["mean-red", "caption-length", "brightness-score", "uid", "caption"]
    assert rgb.shape == (9, 3) and np.allclose(df["mean-red"], rgb[:, 0], atol=1e-6)
    assert np.allclose(df["brightness-score"], rgb.mean(1), atol=1e-6)
    captions = [s["json"]["caption"] for s in tar_samples(shard_dir / "00001.tar")]
    assert df["caption"].tolist() == captions and df["caption-length"].tolist() == [len(c) for c in captions]
    assert (tmp_path / "metadata" / ".d2m" / "custom_mean_colour" / "00001.npz").is_file()

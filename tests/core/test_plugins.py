"""custom_pypath plugins in the seed's format, run through `d2m run` (a subprocess: plugins install globally)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli, tar_samples
from d2m_core.compute.plugins import PluginError, load_plugin

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


SEED_PLUGIN = textwrap.dedent('''
    # As the seed's examples begin: its helpers, imported from the seed's package name.
    from functools import partial

    import numpy as np
    import torch
    from dataset2metadata.postprocessors import batched_dot_product_index, identity, select

    class Describe:
        name = "describe"
        raw_inputs = ["image"]
        preprocessors = ["tiny-aug"]
        dependencies = []
        to_device = True

        def __init__(self, device):
            pass

        def __call__(self, image):
            mean = image.mean(dim=(2, 3))
            red = mean[:, 0].tolist()
            return (mean, mean, [f"red {r:.2f}" for r in red], [int(r * 100) for r in red], [r > 0.5 for r in red],
                    [[round(r, 2), 1.0] for r in red])

    class Captioner:  # like the seed's BLIP-2 example: a list of strings
        name = "captioner"
        raw_inputs = ["image"]
        preprocessors = ["tiny-aug"]
        dependencies = []
        to_device = True

        def __init__(self, device):
            pass

        def __call__(self, image):
            return ["a photo" if float(x.mean()) > 0.4 else "a dark photo" for x in image]

    def tiny_aug(image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    model_lookup = {"describe": Describe, "captioner": Captioner}
    preprocessor_lookup = {"tiny-aug": tiny_aug}
    postprocess_parquet_lookup = {
        "self-sim": partial(batched_dot_product_index, model="describe", i=0, j=1),
        "red-text": partial(select, model="describe", index=2, to_cpu=False),
        "red-percent": partial(select, model="describe", index=3, to_cpu=False),
        "is-red": partial(select, model="describe", index=4, to_cpu=False),
        "red-pair": partial(select, model="describe", index=5, to_cpu=False),
        "caption-guess": partial(identity, model="captioner", to_cpu=False),
    }
    postprocess_feature_lookup = {"mean-rgb": partial(select, model="describe", index=0)}
''')


def test_seed_plugin_unchanged_with_string_int_bool_list_outputs(shard_dir: Path, write_config, tmp_path: Path) -> None:
    """`from dataset2metadata.postprocessors import ...` loads; non-float outputs reach the parquet with their types."""
    plugin = tmp_path / "seed_plugin.py"
    plugin.write_text(SEED_PLUGIN)
    columns = ["self-sim", "red-text", "red-percent", "is-red", "red-pair", "caption-guess"]
    config = write_config(shard_dir, models=["describe", "captioner"], custom_pypath=str(plugin),
                          postprocess_columns=columns, postprocess_features=["mean-rgb"], additional_fields=["uid"])
    result = run_cli(["d2m", "run", "--yml", str(config)], {"DAGSTER_HOME": str(tmp_path / "home")}, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "metadata" / "00001.parquet")
    rgb = np.load(tmp_path / "metadata" / "00001.npz")["mean-rgb"]
    assert list(df.columns) == [*columns, "uid"] and len(df) == 9 and rgb.shape == (9, 3)
    red = rgb[:, 0]
    assert df["red-text"].tolist() == [f"red {r:.2f}" for r in red]
    assert df["red-percent"].dtype == np.int64 and df["red-percent"].tolist() == [int(r * 100) for r in red]
    assert df["is-red"].dtype == bool and df["is-red"].tolist() == [bool(r > 0.5) for r in red]
    assert [list(v) for v in df["red-pair"]] == [[round(float(r), 2), 1.0] for r in red]
    assert set(df["caption-guess"]) <= {"a photo", "a dark photo"}
    assert np.allclose(df["self-sim"], (rgb * rgb).sum(1), atol=1e-5)


def test_real_dataset2metadata_package_is_left_alone(tmp_path: Path) -> None:
    """Where the seed itself is installed, its module is the one plugins import."""
    code = ("from d2m_core.compute.postprocessors import seed_helpers_importable\n"
            "seed_helpers_importable()\nimport dataset2metadata.postprocessors as q\nprint(q.__name__, q.MARK)\n")
    real = tmp_path / "site" / "dataset2metadata"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("")
    (real / "postprocessors.py").write_text("MARK = 'the real seed'\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "dataset2metadata.postprocessors the real seed", done.stderr
    shim = subprocess.run([sys.executable, "-c", "from d2m_core.compute.postprocessors import seed_helpers_importable as s\n"
                           "s()\nfrom dataset2metadata.postprocessors import select\nprint(select.__module__)"],
                          capture_output=True, text=True, timeout=300)
    assert shim.returncode == 0 and shim.stdout.strip() == "d2m_core.compute.postprocessors", shim.stderr

"""Shared fixtures: shards made by d2m itself, random weights, configs written into tmp folders.

`make test` runs the suite on 2 pytest-xdist workers (`-n 2 --dist worksteal`): a worker that runs out of tests
takes half of the other's queue, so the long daemon tests near the end (test_platform, test_slurm, test_state)
do not wait behind one another on one worker while the other idles. Every fixture that starts a service (PostgreSQL,
Slurm, moto, dagster-daemon, dagster-webserver) takes free ports and its own temp folder, so two workers never
share one; a module-scoped fixture is built once per worker that runs a test of its module. (Not
`--dist loadgroup`: pytest-xdist 3.8.0 groups by rewriting `item._nodeid`, which pytest 9 no longer reads, so
`xdist_group` marks are silently ignored.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2m_core.testdata.synth import make_shards

os.environ["D2M_RANDOM_WEIGHTS"] = "1"  # tests always use random weights of the real architectures
os.environ.setdefault("D2M_AUTOMATION", "off")  # sensors start stopped unless a test turns them on
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 9 samples: 00000 holds one undecodable image (key 000000004)."""
    root = tmp_path_factory.mktemp("shards")
    make_shards(root, shards=2, samples=9, max_side=256)
    replace_member(root / "00000.tar", "000000004.jpg", b"<html>not an image</html>")
    return root


def replace_member(tar_path: Path, name: str, data: bytes) -> None:
    """Rewrite a tar with one member's bytes replaced (keeps member order); adds it if the name is new."""
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    names = [m.name for m, _ in members]
    with tarfile.open(tar_path, "w") as dst:
        for member, content in members:
            if member.name == name:
                content = data
                member.size = len(data)
            dst.addfile(member, io.BytesIO(content) if content is not None else None)
        if name not in names:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def tar_samples(tar_path: Path) -> list[dict[str, Any]]:
    """The samples of a tar in order, as {key, json} (json parsed), read with plain tarfile."""
    out: dict[str, dict[str, Any]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            entry = out.setdefault(key, {"key": key})
            if ext == "json":
                entry["json"] = json.loads(tf.extractfile(m).read())
    return list(out.values())


BASIC = {
    "models": ["oai-clip-vit-b32"],
    "postprocess_columns": ["oai-clip-vit-b32-score"],
    "postprocess_features": ["oai-clip-vit-b32-image", "oai-clip-vit-b32-text"],
    "additional_fields": ["uid", "url", "caption", "original_width", "original_height", "sha256"],
    "nworkers": 2,
    "batch_size": 4,
    "device": "cpu",
    "reprocess": False,
    "max_failure_rate": 0.2,  # shard 00000 has 1 undecodable sample of 9
}


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a basic config (with overrides) into tmp_path and return its path."""

    def write(shards: Path, **overrides: Any) -> Path:
        data = BASIC | {"input_tars": str(shards / "*.tar"), "output_metadata_dir": str(tmp_path / "metadata")} | overrides
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def dataset_of(config: Path):
    """The dataset (asset keys, partitions) of a yml, as the definitions and `d2m run` name it."""
    from d2m_assets.datasets import Dataset

    return Dataset.from_yml(config)


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a console script of the venv (d2m, dagster) with a clean, explicit environment."""
    full_env = os.environ | {"PYTHONWARNINGS": "ignore"} | env
    return subprocess.run([str(VENV_BIN / args[0]), *args[1:]], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 API server (moto) on loopback, with the AWS variables pointing at it and a bucket `pool`."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would still point at an earlier server
    reset = f"http://{host}:{port}/moto-api/reset"  # moto's state is per process, shared by its servers
    urllib.request.urlopen(urllib.request.Request(reset, method="POST")).read()
    client = boto3.client("s3")
    client.create_bucket(Bucket="pool")
    try:
        yield client
    finally:
        urllib.request.urlopen(urllib.request.Request(reset, method="POST")).read()
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


_HOLD_PLUGIN = """
import os, time
import torch

STARTED, HOLD = {started!r}, {hold!r}


class Hold:
    \"\"\"Each batch: writes STARTED, then waits while HOLD exists (files as signals between test and run: no timing).\"\"\"
    name = "hold"
    raw_inputs = ["image"]
    preprocessors = ["tiny"]
    dependencies = []
    to_device = True

    def __init__(self, device):
        pass

    def __call__(self, image):
        open(STARTED, "w").close()
        deadline = time.monotonic() + 900
        while os.path.exists(HOLD) and time.monotonic() < deadline:
            time.sleep(0.05)
        return image.mean(dim=(2, 3))


model_lookup = {{"hold": Hold}}
preprocessor_lookup = {{"tiny": lambda image: torch.zeros(3, 4, 4)}}
postprocess_parquet_lookup = {{"hold-red": lambda outputs: outputs["hold"][:, 0]}}
postprocess_feature_lookup = {{}}
"""


@dataclass(frozen=True)
class HoldPlugin:
    """A custom_pypath plugin (model `hold`, parquet column `hold-red`, asset custom_hold) that holds a run in its
    batches while the `hold` file exists; `started` appears once a batch has reached the model."""

    path: Path
    started: Path
    hold: Path


def hold_plugin(folder: Path) -> HoldPlugin:
    plugin = HoldPlugin(folder / "hold.py", folder / "hold-started", folder / "hold")
    plugin.path.write_text(_HOLD_PLUGIN.format(started=str(plugin.started), hold=str(plugin.hold)))
    return plugin


def gone(pids: list[int], within_s: float = 10.0) -> bool:
    """Whether none of these processes runs (or is a zombie) within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _process_state(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"

"""The CPU path end to end against the seed (dataset2metadata): one `d2m run` and one seed run on the same
shards and the same weights, timed as a user times them (each command's wall time, start-up included), and
how far their outputs agree. Run on purpose; prints one JSON line.

    .venv/bin/python bench/seed_compare.py --seed-python SEED_VENV/bin/python --shards DIR --out DIR

SEED_VENV is an interpreter with the seed installed as its README says (dataset2metadata, OpenAI's `clip`,
`isc_feature_extractor`, detoxify, wandb, fire, pysimdjson). No model hub is reachable here, so both run
B/32 with d2m's random weights (seeded): saved as an OpenAI-format state dict, which the seed's `clip.load`
is handed instead of downloading. Both read the seed's basic.yml fields with `device: cpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

SEED_DRIVER = """
import clip.clip as oai_clip, torch
oai_clip._download = lambda url, root=None: {weights!r}  # no hub here: d2m's random B/32, as a local file
def not_jit(*args, **kwargs):  # clip.load tries the file as a JIT archive first, then reads the same handle
    raise RuntimeError("a state dict")  # again from where that try left it; a state dict is read once
torch.jit.load = not_jit
from dataset2metadata.process import process
process({yml!r})
"""


def _yml(shards: list[Path], out: Path, batch_size: int, nworkers: int) -> dict:
    return {
        "models": ["oai-clip-vit-b32"],
        "postprocess_columns": ["oai-clip-vit-b32-score"],
        "postprocess_features": ["oai-clip-vit-b32-image", "oai-clip-vit-b32-text"],
        "additional_fields": ["uid", "url", "caption", "original_width", "original_height", "sha256"],
        "nworkers": nworkers, "batch_size": batch_size, "device": "cpu",
        "input_tars": [str(p) for p in shards], "output_metadata_dir": str(out), "reprocess": True,
    }


def _save_random_b32(path: Path) -> None:
    from d2m_core.compute.models.clip import OaiClipVitB32
    from d2m_core.compute.weights import ResolvedWeights
    from d2m_core.outputs.records import WeightsRecord

    model = OaiClipVitB32("cpu", weights=ResolvedWeights(WeightsRecord(model=OaiClipVitB32.name, kind="random")))
    import torch

    torch.save(model.model.state_dict(), path)


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def _table(folder: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    frames = [pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]
    arrays: dict[str, list[np.ndarray]] = {}
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as npz:
            for k in npz.files:
                arrays.setdefault(k, []).append(npz[k])
    return pd.concat(frames, ignore_index=True), {k: np.concatenate(v) for k, v in arrays.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-python", required=True, help="interpreter with dataset2metadata installed")
    ap.add_argument("--shards", required=True, type=Path, help="folder of webdataset tars (d2m make-shards)")
    ap.add_argument("--out", required=True, type=Path, help="work folder (created)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--nworkers", type=int, default=2)
    args = ap.parse_args()

    shards = sorted(args.shards.glob("*.tar"))
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "ViT-B-32-random.pt"
    _save_random_b32(weights)
    rows = {}
    for name in ("seed", "d2m"):
        yml = args.out / f"{name}.yml"
        yml.write_text(yaml.safe_dump(_yml(shards, args.out / f"{name}-metadata", args.batch_size, args.nworkers)))
        env = {**os.environ, "D2M_RANDOM_WEIGHTS": "1", "DAGSTER_HOME": tempfile.mkdtemp(prefix="d2m-seed-cmp-")}
        if name == "seed":
            cmd = [args.seed_python, "-c", SEED_DRIVER.format(weights=str(weights), yml=str(yml))]
        else:
            cmd = [str(Path(sys.executable).with_name("d2m")), "run", "--yml", str(yml)]
        rows[name] = {"wall_s": round(_timed(cmd, env, args.out / f"{name}.log"), 2), "load_1m": os.getloadavg()[0]}

    if not list((args.out / "seed-metadata").glob("*.parquet")):  # the seed exits 0 when its loader fails
        sys.exit(f"the seed wrote nothing: see {args.out / 'seed.log'} (webdataset 1.x breaks it: use 0.2.86)")
    seed_table, seed_arrays = _table(args.out / "seed-metadata")
    d2m_table, d2m_arrays = _table(args.out / "d2m-metadata")
    samples = len(d2m_table)
    same_uids = seed_table["uid"].tolist() == d2m_table["uid"].tolist()
    score = "oai-clip-vit-b32-score"  # the seed's column name (use_datacomp_keys is off in both ymls)
    print(json.dumps({
        "stage": "seed-compare", "config": "basic (B/32, random weights, device cpu)", "shards": len(shards),
        "samples": samples, "seed": rows["seed"], "d2m": rows["d2m"],
        "d2m_wall_vs_seed": round(rows["d2m"]["wall_s"] / rows["seed"]["wall_s"], 3),
        "d2m_samples_per_s": round(samples / rows["d2m"]["wall_s"], 2),
        "seed_samples_per_s": round(len(seed_table) / rows["seed"]["wall_s"], 2),
        "same_uids_in_order": same_uids,
        "score_max_abs_diff": float(np.abs(seed_table[score] - d2m_table[score]).max()) if same_uids else None,
        "features_max_abs_diff": {k: float(np.abs(seed_arrays[k].astype(np.float32)
                                                  - d2m_arrays[k].astype(np.float32)).max())
                                  for k in sorted(seed_arrays) if same_uids and k in d2m_arrays},
        "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()

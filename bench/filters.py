"""Seconds and peak memory of each filter on synthetic DataComp-format metadata: prints JSON lines.

    .venv/bin/python bench/filters.py --shards 1000 --rows 10000 --dir .bench/filters

Makes the metadata once (uid, text, original_width/height, B/32 and L/14 float32 scores; `l14_img` only for
the first --image-shards shards, which the image-based baseline reads), then runs each baseline in its own
process (peak RSS of that process, VmHWM). `clip_score_fraction_load_all` is the baseline's way of
DataComp (every score of the pool in memory, one sort) on the same files, for comparison.
fastText, WordNet and the centroid files are small stand-ins made here (DataComp's files cannot be fetched).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EN = "a dog runs on the green grass near the old bridge over the river with a small cat".split()
FR = "le chien court dans le jardin près de la maison avec un petit chat sur la plage".split()


def make_pool(root: Path, shards: int, rows: int, image_shards: int) -> None:
    meta = root / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vocab = np.array(EN + FR, dtype=object)
    for s in range(shards):
        if (meta / f"{s:08d}.json").exists():
            if s < image_shards and not (meta / f"{s:08d}.npz").exists():  # a pool made with fewer image shards
                write_features(meta / f"{s:08d}.npz", np.random.default_rng((1, s)), rows)
            continue
        raw = rng.integers(0, 256, (rows, 16), dtype=np.uint8)
        uid = [bytes(r).hex() for r in raw]
        lang = rng.random(rows) < 0.7
        words = np.where(lang[:, None], rng.integers(0, len(EN), (rows, 7)), len(EN) + rng.integers(0, len(FR), (rows, 7)))
        lengths = rng.integers(1, 8, rows)
        text = [" ".join(vocab[w[:n]]) for w, n in zip(words, lengths)]
        table = pa.table({
            "uid": uid, "text": text,
            "original_width": rng.integers(50, 2000, rows), "original_height": rng.integers(50, 2000, rows),
            "clip_b32_similarity_score": rng.normal(0.3, 0.04, rows).astype(np.float32),
            "clip_l14_similarity_score": rng.normal(0.25, 0.05, rows).astype(np.float32),
        })
        pq.write_table(table, meta / f"{s:08d}.parquet")
        if s < image_shards:
            write_features(meta / f"{s:08d}.npz", rng, rows)
        (meta / f"{s:08d}.json").write_text(json.dumps({"failures": []}))


def write_features(path: Path, rng: np.random.Generator, rows: int) -> None:
    """`l14_img`: unit float32 rows, as d2m writes them (30.7 MB per 10,000 rows)."""
    feats = rng.normal(0, 1, (rows, 768)).astype(np.float32)
    np.savez(path, l14_img=feats / np.linalg.norm(feats, axis=1, keepdims=True))


def make_files(root: Path) -> dict[str, str]:
    import fasttext
    import torch

    files = root / "files"
    files.mkdir(exist_ok=True)
    corpus = files / "lid.txt"
    corpus.write_text("".join(f"__label__en {' '.join(EN[i:i + 5])}\n__label__fr {' '.join(FR[i:i + 5])}\n"
                              for i in range(len(EN) - 5)) * 20)
    model = fasttext.train_supervised(str(corpus), epoch=20, lr=0.5, minCount=1, seed=1, thread=1)
    model.save_model(str(files / "lid.bin"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "core"))
    from test_filters import make_wordnet

    if not (files / "wordnet").exists():
        make_wordnet(files)
    (files / "in21k.txt").write_text("n00001000\nn00003000\n")
    rng = np.random.default_rng(1)
    centroids = rng.normal(0, 1, (1000, 768)).astype(np.float32)
    torch.save(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), files / "centroids.pt")
    torch.save({"image_features": torch.from_numpy(rng.normal(0, 1, (5000, 768)).astype(np.float32))}, files / "in1k.pt")
    return {"fasttext": str(files / "lid.bin"), "wordnet": str(files / "wordnet"),
            "imagenet21k_wordnet_ids": str(files / "in21k.txt"), "small_centroids": str(files / "centroids.pt"),
            "in1k_clip_vit_l14": [str(files / "in1k.pt")]}


CASES = {
    "no_filter": {"name": "no_filter"},
    "clip_score_b32_threshold_0.3": {"name": "clip_score", "arch": "b32", "threshold": 0.3},
    "clip_score_l14_fraction_0.3": {"name": "clip_score", "arch": "l14", "fraction": 0.3},
    "laion2b": {"name": "laion2b"},
    "basic_filter": {"name": "basic_filter"},
    "text_based": {"name": "text_based"},
    "image_based": {"name": "image_based", "image_based_scale": "small"},
}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, so not inherited across exec as
    ru_maxrss is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(root: Path, case: str, files: dict, image_shards: int) -> dict:
    """In this (child) process: one baseline over the pool."""
    from d2m_core.config import FilterSpec
    from d2m_core.subsets import pool
    from d2m_core.subsets.filters import run_filter

    shards = pool.list_pool(str(root / "metadata"))
    imported = peak_rss_mb()
    start = time.perf_counter()
    if case == "clip_score_fraction_load_all":  # DataComp's get_threshold: every score in memory, one sort
        import pandas as pd

        df = pd.concat([pd.read_parquet(s.parquet, columns=["clip_l14_similarity_score"]) for s in shards])
        scores = df["clip_l14_similarity_score"].values
        value = -np.sort(-scores)[int(len(df) * 0.3)]
        out = {"rows": len(df), "threshold": float(value)}
    else:
        if case == "image_based":
            shards = shards[:image_shards]
        spec = FilterSpec(**CASES[case], data_files={k: v for k, v in files.items()
                                                    if k in ("fasttext", "wordnet", "imagenet21k_wordnet_ids",
                                                             "small_centroids", "in1k_clip_vit_l14")})
        result = run_filter(spec, shards)
        out = {"rows": result.pool_size, "kept": result.kept, "threshold": result.threshold,
               "threshold_passes": result.threshold_passes or None}
    seconds = time.perf_counter() - start
    return {"filter": case, "shards": len(shards), **out, "seconds": round(seconds, 2), "load_1m": round(os.getloadavg()[0], 1),
            "rows_per_s": round(out["rows"] / seconds), "rss_after_imports_mb": round(imported),
            "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--image-shards", type=int, default=20)
    parser.add_argument("--dir", default=".bench/filters")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.child:
        files = json.loads((root / "files.json").read_text())
        print(json.dumps(run_case(root, args.child, files, args.image_shards)), flush=True)
        return
    start = time.perf_counter()
    make_pool(root, args.shards, args.rows, args.image_shards)
    (root / "files.json").write_text(json.dumps(make_files(root)))
    print(json.dumps({"made": f"{args.shards} shards x {args.rows} rows", "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for case in args.only or ["clip_score_fraction_load_all", *CASES]:
        done = subprocess.run([sys.executable, __file__, "--dir", str(root), "--image-shards", str(args.image_shards),
                               "--child", case], capture_output=True, text=True)
        print(done.stdout.strip() or json.dumps({"filter": case, "error": done.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()

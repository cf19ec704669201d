"""d2m's filters and reshard side by side with DataComp's own code, on the same d2m metadata folders.

    .venv/bin/python bench/datacomp_side_by_side.py --datacomp DATACOMP_CHECKOUT --python DC_PYTHON \
        --work /tmp/sbs --shards 3 --samples 40 [--demo .demo/metadata --demo-yml configs/demo.yml] \
        --out bench/results/cpu-datacomp-side-by-side.json

Run on purpose (not in the tests). DATACOMP_CHECKOUT is a checkout of github.com/mlfoundations/datacomp;
DC_PYTHON a Python that imports what its baselines/ and resharder.py import (fasttext, gcld3, nltk, pandas,
torch, simdjson, webdataset 0.2.x, cloudpathlib, img2dataset with albumentations 1.x; pandas < 3: its
image-based caption filter does `list & Series`, which pandas 3 refuses); d2m's requirements are not touched.

1. The pool: `d2m make-shards` (--shards x --samples; 3 x 40 for the recorded results: L/14 and face boxes
   on 2 shared CPU cores ran ~0.1 sample/s), captions and original sizes rewritten so that each filter keeps
   some samples and drops some, then `d2m run` (B/32, L/14 with `l14_img`, face boxes; random weights, CPU;
   DataComp's column names). laion2b runs on a copy with B/32 scores + 0.28 (random weights score near 0).
2. Stand-in data files (DataComp's cannot be fetched here): the tiny fastText model and WordNet of the tests,
   ImageNet-21k ids, and centroids / ImageNet-1k features drawn from the pool's own `l14_img` (so clusters
   split the pool). Both sides read the same files.
3. Each baseline by d2m's `filter_pool` (what the filter asset and `d2m filter` run) and by DataComp's `apply_filter()` (baselines.py's routing, without its
   CUDA check), on the same folder: DataComp runs from a scratch copy of its baselines/ with two documented
   edits only: `download()` returns the stand-in file for a name, and the nearest-centroid matmul runs on
   "cpu" instead of f"cuda:{device}". The .npy files are compared byte for byte and as arrays.
4. DataComp's resharder.py (unchanged) and `d2m reshard` on one subset, with --apply-blur and
   --inject-blur-metadata where the metadata has face boxes: the same samples (`<uid>-<j>`) with the same
   members (bytes; json parsed; blurred images decoded and compared pixel for pixel).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
D2M = str(REPO / ".venv" / "bin" / "d2m")
CAPTIONS = [  # fastText stand-in: en/fr; WordNet stand-in entities: dog, bridge (cat's first synset is not one)
    "a dog runs on the green grass", "le chien court dans le jardin", "a small cat", "dog cat",
    "the red car parked near the house", "two people walk along the beach at sunset", "the old bridge over the river",
    "", "un oiseau sur la branche", "IMG_2041.JPG", None]  # None: make-shards' own caption
SIZES = [(640, 480), (199, 400), (1000, 300), (900, 300), (200, 600), (150, 150), (800, 800), (300, 1000)]


def sh(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-3000:]}{done.stdout[-2000:]}")
    return done


def rewrite_tar(path: Path, start: int) -> None:
    """Chosen captions (txt and json) and original sizes (json), by sample number."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    order = sorted({m.name.split(".")[0] for m, _ in members})
    number = {key: start + i for i, key in enumerate(order)}
    with tarfile.open(path, "w") as dst:
        for member, data in members:
            key, ext = member.name.split(".", 1)
            i = number[key]
            caption = CAPTIONS[i % len(CAPTIONS)]
            if ext == "json":
                meta = json.loads(data)
                if caption is not None:
                    meta["caption"] = caption
                meta["original_width"], meta["original_height"] = SIZES[(i * 3) % len(SIZES)]
                data = json.dumps(meta).encode()
            elif ext == "txt" and caption is not None:
                data = caption.encode()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


def prepare_pool(work: Path, shards: int, samples: int) -> Path:
    """Shards, then `d2m run` over them; returns the yml (re-used when its metadata is complete)."""
    yml = work / "sbs.yml"
    meta = work / "metadata"
    if yml.exists() and len(list(meta.glob("*.json"))) == shards:
        return yml
    sh([D2M, "make-shards", str(work / "shards"), "--shards", str(shards), "--samples", str(samples),
        "--max-side", "320", "--workers", "2"])
    for i, tar in enumerate(sorted((work / "shards").glob("*.tar"))):
        rewrite_tar(tar, i * samples)
        (work / "shards" / f"{tar.stem}.parquet").unlink(missing_ok=True)  # img2dataset's input list: stale now
    config = {"dataset": "sbs", "models": ["oai-clip-vit-b32", "oai-clip-vit-l14", "faces-scrfd10g"],
              "postprocess_columns": ["oai-clip-vit-b32-score", "oai-clip-vit-l14-score", "face-boxes"],
              "postprocess_features": ["oai-clip-vit-l14-image"],
              "additional_fields": ["uid", "url", "caption", "original_width", "original_height", "sha256"],
              "nworkers": 2, "batch_size": 32, "device": "cpu", "use_datacomp_keys": True,
              "input_tars": str(work / "shards" / "*.tar"), "output_metadata_dir": str(meta)}
    yml.write_text(yaml.safe_dump(config))
    sh([D2M, "run", "--yml", str(yml)], env={"DAGSTER_HOME": str(work / "home"), "D2M_RANDOM_WEIGHTS": "1"})
    return yml


def make_data_files(work: Path, meta: Path) -> dict[str, object]:
    """Stand-ins: returns {"d2m": data_files for the yml, "datacomp": download name -> path}."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "core"))
    from test_filters import make_wordnet, train_fasttext

    files = work / "files"
    if files.exists():
        shutil.rmtree(files)
    files.mkdir()
    lid = train_fasttext(files / "lid.bin")
    wordnet = make_wordnet(files)
    (files / "in21k.txt").write_text("n00001000\nn00003000\n")
    feats = np.concatenate([np.load(p)["l14_img"] for p in sorted(meta.glob("*.npz"))]).astype(np.float32)
    rng = np.random.default_rng(0)
    centroids = feats[rng.choice(len(feats), 16, replace=False)] + rng.normal(0, 0.01, (16, feats.shape[1])).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    torch.save(centroids.astype(np.float32), files / "centroids.pt")  # DataComp's file: a numpy array
    in1k = []
    for i in range(5):  # ImageNet-1k features near centroids 0..5 only: those clusters are kept
        near = centroids[[i, (i + 1) % 6]] + rng.normal(0, 0.001, (2, feats.shape[1])).astype(np.float32)
        torch.save({"image_features": torch.from_numpy(near.astype(np.float32))}, files / f"in1k_{i}.pt")
        in1k.append(str(files / f"in1k_{i}.pt"))
    nltk_root = work / "nltk_data" / "corpora"
    nltk_root.mkdir(parents=True, exist_ok=True)
    if (nltk_root / "wordnet").exists():
        shutil.rmtree(nltk_root / "wordnet")
    shutil.copytree(wordnet, nltk_root / "wordnet")  # NLTK refuses a corpus that resolves outside its data path
    d2m_files = {"fasttext": str(lid), "wordnet": str(wordnet), "imagenet21k_wordnet_ids": str(files / "in21k.txt"),
                 "small_centroids": str(files / "centroids.pt"), "in1k_clip_vit_l14": in1k}
    dc_files = {"fasttext": str(lid), "imagenet21k_wordnet_ids": str(files / "in21k.txt"),
                "small_centroids": str(files / "centroids.pt"), **{f"in1k_clip_vit_l14_{i}": p for i, p in enumerate(in1k)}}
    return {"d2m": d2m_files, "datacomp": dc_files}


SHIM = '''import argparse, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nltk
nltk.download = lambda *a, **k: True  # WordNet comes from $NLTK_DATA (the stand-in); nothing is fetched
from baselines.apply_filter import apply_filter

if __name__ == "__main__":
    apply_filter(argparse.Namespace(**json.loads(sys.argv[1])))
'''


def datacomp_copy(datacomp: Path, work: Path) -> Path:
    """A scratch copy of DataComp's baselines/ with the two edits the module docstring names."""
    root = work / "datacomp_baselines"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(datacomp / "baselines", root / "baselines")
    utils = root / "baselines" / "utils.py"
    src = utils.read_text()
    head = "def download(name: str, root: str = None) -> str:\n"
    assert head in src, "DataComp's download() changed"
    utils.write_text(src.replace(head, head + "    if os.environ.get('D2M_SBS_FILES'):  # side by side: stand-in data files\n"
                                 "        import json\n        return json.load(open(os.environ['D2M_SBS_FILES']))[name]\n", 1))
    apply = root / "baselines" / "apply_filter.py"
    src = apply.read_text()
    assert 'device_string = f"cuda:{device}"' in src, "DataComp's get_centroid_ids_gpu changed"
    apply.write_text(src.replace('device_string = f"cuda:{device}"', 'device_string = "cpu"', 1))
    (root / "run_apply_filter.py").write_text(SHIM)
    return root


def run_datacomp(python: str, root: Path, work: Path, metadata: Path, case: dict, save: Path) -> dict:
    args = {"name": case["name"], "metadata_dir": str(metadata), "save_path": str(save),
            "threshold": case.get("threshold"), "fraction": case.get("fraction"), "arch": case.get("arch"),
            "num_workers": 1, "num_gpus": 1, "batch_size": 1024, "image_based_scale": case.get("image_based_scale")}
    start = time.perf_counter()
    done = subprocess.run([python, str(root / "run_apply_filter.py"), json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "D2M_SBS_FILES": str(work / "dc_files.json"),
                               "NLTK_DATA": str(work / "nltk_data"), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    out = {"seconds": round(time.perf_counter() - start, 1)}
    if done.returncode or not save.exists():
        lines = (done.stderr + done.stdout).strip().splitlines()
        errors = [line for line in lines if re.search(r"(Error|Exception|Invalid)\b.*:", line)]
        return out | {"error": (errors or lines or [f"exit {done.returncode}"])[-1][:300]}
    return out


def run_d2m(yml: Path, case_name: str, case: dict, save: Path) -> dict:
    """d2m's side in this process: `filter_pool`, what the filter asset (and `d2m filter`) runs; the yml's
    entry for the case gives the data files."""
    from d2m_core.config import FilterSpec, load_config
    from d2m_core.subsets.filters import filter_pool

    config = load_config(yml)
    known = next((f for f in config.filters if f.asset_name == case_name), None)
    spec = FilterSpec(**case, asset=case_name, save_path=str(save),
                      data_files=known.data_files if known is not None else {})
    start = time.perf_counter()
    try:
        result, _ = filter_pool(config, spec)
    except Exception as err:  # noqa: BLE001 - recorded in the results
        return {"seconds": round(time.perf_counter() - start, 1), "error": f"{type(err).__name__}: {err}"}
    return {"seconds": round(time.perf_counter() - start, 1), "kept": result.kept, "threshold": result.threshold}


def compare_uid_files(ours: Path, theirs: Path) -> dict:
    if not ours.exists() or not theirs.exists():
        return {"identical": False}
    a, b = np.load(ours), np.load(theirs)
    return {"d2m_kept": int(len(a)), "datacomp_kept": int(len(b)), "dtype": [str(a.dtype), str(b.dtype)],
            "arrays_equal": bool(a.dtype == b.dtype and a.shape == b.shape and (a == b).all()),
            "bytes_identical": ours.read_bytes() == theirs.read_bytes(),
            "identical": bool(a.dtype == b.dtype and a.shape == b.shape and (a == b).all())}


def cases_for(meta: Path) -> dict[str, dict]:
    """The baselines and parameters compared; thresholds at quantiles of this pool's (random-weight) scores."""
    scores = {k: np.concatenate([pq.read_table(p, columns=[k])[k].to_numpy() for p in sorted(meta.glob("*.parquet"))])
              for k in ("clip_b32_similarity_score", "clip_l14_similarity_score")}
    b32 = float(np.round(np.quantile(scores["clip_b32_similarity_score"], 0.4), 4))
    l14 = float(np.round(np.quantile(scores["clip_l14_similarity_score"], 0.6), 4))
    return {
        "no_filter": {"name": "no_filter"},
        "clip_score_b32_threshold": {"name": "clip_score", "arch": "b32", "threshold": b32},
        "clip_score_b32_fraction_0_3": {"name": "clip_score", "arch": "b32", "fraction": 0.3},
        "clip_score_l14_threshold": {"name": "clip_score", "arch": "l14", "threshold": l14},
        "clip_score_l14_fraction_0_5": {"name": "clip_score", "arch": "l14", "fraction": 0.5},
        "basic_filter": {"name": "basic_filter"},
        "laion2b": {"name": "laion2b"},
        "text_based": {"name": "text_based"},
        "image_based": {"name": "image_based", "image_based_scale": "small"},
        "image_based_intersect_clip_score": {"name": "image_based_intersect_clip_score", "image_based_scale": "small",
                                             "arch": "l14", "fraction": 0.5},
    }


def with_filters(yml: Path, cases: dict[str, dict], data_files: dict) -> None:
    """The yml's `filters`: one entry per case (its asset name), with the stand-in data files it reads."""
    from d2m_core.subsets.filter_files import files_for

    config = yaml.safe_load(yml.read_text())
    config["filters"] = []
    for name, case in cases.items():
        needed = files_for(case["name"], case.get("image_based_scale"))
        config["filters"].append(case | {"asset": name, "data_files": {k: data_files[k] for k in needed}})
    yml.write_text(yaml.safe_dump(config))


def shifted_copy(meta: Path, dest: Path, shift: float) -> Path:
    """The folder with B/32 scores + shift (random weights score near 0: laion2b's fixed 0.28 would keep none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for path in sorted(meta.iterdir()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            i = table.schema.get_field_index("clip_b32_similarity_score")
            column = pc.add(table.column(i), pa.scalar(shift, table.schema.field(i).type))
            pq.write_table(table.set_column(i, "clip_b32_similarity_score", column), dest / path.name)
        elif path.is_file():
            shutil.copy(path, dest / path.name)
    return dest


def tar_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    assert ext not in out.setdefault(key, {}), f"{tar}: {m.name} twice"
                    out[key][ext] = tf.extractfile(m).read()
    return out


def compare_reshards(ours: Path, theirs: Path, shards: Path) -> dict:
    import cv2

    a, b = tar_samples(ours), tar_samples(theirs)
    report = {"d2m_samples": len(a), "datacomp_samples": len(b), "same_keys": set(a) == set(b),
              "d2m_shards": len(list(ours.glob("*.tar"))), "datacomp_shards": len(list(theirs.glob("*.tar")))}
    differ, blurred, pixel_diff, webp_bytes_equal = [], 0, 0, 0
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if set(x) != set(y):
            differ.append(f"{key}: members {sorted(x)} vs {sorted(y)}")
            continue
        for ext in x:
            if ext == "json":
                if json.loads(x[ext]) != json.loads(y[ext]):
                    differ.append(f"{key}.json")
            elif ext == "webp":
                blurred += 1
                webp_bytes_equal += x[ext] == y[ext]
                px = [cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED) for v in (x[ext], y[ext])]
                diff = int(np.abs(px[0].astype(int) - px[1].astype(int)).max()) if px[0].shape == px[1].shape else 999
                pixel_diff = max(pixel_diff, diff)
                if diff:
                    differ.append(f"{key}.webp: max pixel difference {diff}")
            elif x[ext] != y[ext]:
                differ.append(f"{key}.{ext}")
    image_ext = {}  # uid -> the input sample's image member (DataComp's blur reads only "jpg")
    for key, members in tar_samples(shards).items():
        uid = json.loads(members["json"])["uid"]
        image_ext[uid] = next((e for e in ("jpg", "png", "jpeg", "webp") if e in members), None)
    report["only_d2m"] = [{"key": k, "input_image": image_ext.get(k.rsplit("-", 1)[0])} for k in sorted(set(a) - set(b))]
    report["only_datacomp"] = sorted(set(b) - set(a))
    return report | {"blurred": blurred, "webp_bytes_equal": webp_bytes_equal, "max_pixel_difference": pixel_diff,
                     "differences": differ[:20], "n_differences": len(differ),
                     "identical": report["same_keys"] and not differ}


def reshard_side_by_side(python: str, datacomp: Path, work: Path, yml: Path, subset: Path, meta: Path,
                         shards: Path, shard_size: int, blur: bool) -> dict:
    if blur:  # only where the metadata has face boxes
        blur = any(len(b or []) for p in sorted(meta.glob("*.parquet"))
                   for b in pq.read_table(p, columns=["face_bboxes"])["face_bboxes"].to_pylist())
    blur = ["--apply-blur", "--inject-blur-metadata"] if blur else []
    label = "blur" if blur else "plain"
    ours, theirs = work / f"resharded_{label}_d2m", work / f"resharded_{label}_datacomp"
    for folder in (ours, theirs):
        if folder.exists():
            shutil.rmtree(folder)
    start = time.perf_counter()
    sh([D2M, "reshard", "--yml", str(yml), "--subset-file", str(subset), "--output-dir", str(ours),
        "--shard-size", str(shard_size), *blur], env={"DAGSTER_HOME": str(work / "home")})
    d2m_s = time.perf_counter() - start
    tars = sorted(shards.glob("*.tar"))
    blur_map = work / "blur_map.json"
    blur_map.write_text(json.dumps({t.stem: {"parquet": str(meta / f"{t.stem}.parquet"), "shards": [str(t)]} for t in tars}))
    theirs.mkdir()
    start = time.perf_counter()
    done = sh([python, str(datacomp / "resharder.py"), "-i", str(shards), "-o", str(theirs), "-s", str(subset),
        "-n", str(len(tars)), "--first-shard", str(int(tars[0].stem)), "--shard-format", "{:05d}.tar",
        "--shard-stats-format", "{:05d}_stats.json", "--shard-size", str(shard_size), "-j", "2"]
       + (["--blur-metadata-map", str(blur_map), *blur] if blur else []))
    dc_s = time.perf_counter() - start
    return {"subset": str(subset), "subset_size": int(len(np.load(subset))), "shard_size": shard_size,
            "blur": bool(blur), "d2m_seconds": round(d2m_s, 1), "datacomp_seconds": round(dc_s, 1),
            "datacomp_errors": sorted({re.sub(r"^.*?(\w+Error)", r"\1", line).strip()[:120]
                                       for line in (done.stdout + done.stderr).splitlines()
                                       if re.search(r"^\w+Error\b", line)}),
            **compare_reshards(ours, theirs, shards)}


def side_by_side(python: str, root: Path, work: Path, yml: Path, meta: Path, cases: dict[str, dict], label: str) -> list[dict]:
    rows = []
    for name, case in cases.items():
        d2m_npy, dc_npy = work / label / "d2m" / f"{name}.npy", work / label / "datacomp" / f"{name}.npy"
        for p in (d2m_npy, dc_npy):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.unlink(missing_ok=True)
        ours = run_d2m(yml, name, case, d2m_npy)
        theirs = run_datacomp(python, root, work, meta, case, dc_npy)
        rows.append({"folder": label, "case": name, "params": {k: v for k, v in case.items() if k != "name"},
                     "filter": case["name"], "rows": sum(pq.ParquetFile(p).metadata.num_rows for p in meta.glob("*.parquet")),
                     "d2m": ours, "datacomp": theirs, **compare_uid_files(d2m_npy, dc_npy)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datacomp", required=True, help="a checkout of github.com/mlfoundations/datacomp")
    parser.add_argument("--python", required=True, help="the Python that runs DataComp's code")
    parser.add_argument("--work", default="/tmp/sbs")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--demo", default=None, help="also the demo's metadata folder (make demo)")
    parser.add_argument("--demo-yml", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--datacomp-commit", default=None, help="the checkout's commit, if it is not a git work tree")
    args = parser.parse_args()
    work, datacomp = Path(args.work).resolve(), Path(args.datacomp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    yml = prepare_pool(work, args.shards, args.samples)
    meta = work / "metadata"
    files = make_data_files(work, meta)
    (work / "dc_files.json").write_text(json.dumps(files["datacomp"]))
    cases = cases_for(meta)
    with_filters(yml, cases, files["d2m"])
    root = datacomp_copy(datacomp, work)
    rows = side_by_side(args.python, root, work, yml, meta, {k: v for k, v in cases.items() if k != "laion2b"}, "pool")
    shifted = shifted_copy(meta, work / "metadata_b32_plus_0.28", 0.28)
    shifted_yml = work / "sbs_shifted.yml"
    shifted_yml.write_text(yaml.safe_dump(yaml.safe_load(yml.read_text()) | {"output_metadata_dir": str(shifted)}))
    rows += side_by_side(args.python, root, work, shifted_yml, shifted, {"laion2b": cases["laion2b"]}, "pool_b32_plus_0.28")
    if args.demo:
        demo_cases = {"no_filter": {"name": "no_filter"},
                      "clip_score_b32_fraction_0_5": {"name": "clip_score", "arch": "b32", "fraction": 0.5}}
        rows += side_by_side(args.python, root, work, Path(args.demo_yml).resolve(), Path(args.demo).resolve(),
                             demo_cases, "demo")
    subset = work / "pool" / "d2m" / "clip_score_l14_fraction_0_5.npy"
    reshard = [reshard_side_by_side(args.python, datacomp, work, yml, subset, meta, work / "shards", 40, blur)
               for blur in (False, True)]
    print(json.dumps({"reshard": reshard}), flush=True)
    load = os.getloadavg()
    result = {"datacomp_commit": sh(["git", "-C", str(datacomp), "rev-parse", "HEAD"]).stdout.strip()
              if (datacomp / ".git").exists() else args.datacomp_commit,
              "pool": f"{args.shards} shards x {args.samples} samples, d2m run with random weights (CPU)",
              "filters": rows, "reshard": reshard, "load_1m": round(load[0], 2), "seconds": round(time.time() - started)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

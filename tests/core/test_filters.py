"""DataComp's baselines on a metadata folder the test writes: expected uid sets worked out here, with a tiny
fastText model, a tiny WordNet and tiny centroid files made by the test (no download)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from d2m_core.compute.weights import WeightsError
from d2m_core.config import FilterSpec
from d2m_core.subsets import pool
from d2m_core.subsets.filters import run_filter

EN = ["a dog runs on the green grass", "the red car parked near the house", "a small cat sleeps on the sofa",
      "two people walk along the beach", "the old bridge over the river", "a bird sits on the tree branch"]
FR = ["le chien court dans le jardin", "une voiture rouge près de la maison", "un petit chat dort sur le canapé",
      "deux personnes marchent sur la plage", "le vieux pont sur la rivière", "un oiseau sur la branche"]


def train_fasttext(path: Path) -> Path:
    """A two-language fastText model (en/fr), trained in well under a second."""
    import fasttext

    corpus = path.with_suffix(".txt")
    lines = [f"__label__en {t}" for t in EN] * 20 + [f"__label__fr {t}" for t in FR] * 20
    corpus.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(corpus), epoch=30, lr=0.1, dim=16, minCount=1, seed=1, thread=1)
    model.save_model(str(path))
    return path


ROWS = [  # uid-suffix, caption, width, height, b32, l14, cluster
    ("01", "a dog runs on the green grass", 640, 480, 0.31, 0.20, 0),
    ("02", "le chien court dans le jardin", 640, 480, 0.35, 0.40, 0),
    ("03", "a small cat", 300, 300, 0.20, 0.10, 1),  # 3 words, > 5 chars
    ("04", "dog cat", 800, 600, 0.29, 0.33, 1),  # 2 words: basic drops it
    ("05", "the red car parked near the house", 199, 400, 0.27, 0.26, 2),  # short side < 200
    ("06", "two people walk along the beach", 1000, 300, 0.30, 0.26, 3),  # aspect 3.33
    ("07", "the old bridge over the river", 900, 300, 0.28, 0.28, 2),  # aspect 3.0 exactly: kept
    ("08", "", 640, 480, 0.40, 0.45, 0),
    ("09", "a bird sits on the tree branch", 200, 600, 0.28, 0.10, 3),  # aspect 3.0, side 200
    ("10", "un oiseau sur la branche", 500, 500, 0.50, 0.5, 1),
]


def uid_of(suffix: str, shard: int) -> str:
    return f"{shard:016x}{int(suffix):016x}"


@pytest.fixture
def metadata(tmp_path: Path) -> Path:
    """Two shards in DataComp's format (float32 scores, text, l14_img rows aligned)."""
    out = tmp_path / "metadata"
    out.mkdir()
    for shard, rows in ((0, ROWS[:6]), (1, ROWS[6:])):
        table = pa.table({
            "clip_b32_similarity_score": pa.array([r[4] for r in rows], pa.float32()),
            "clip_l14_similarity_score": pa.array([r[5] for r in rows], pa.float32()),
            "uid": [uid_of(r[0], shard) for r in rows],
            "text": [r[1] for r in rows],
            "original_width": pa.array([r[2] for r in rows], pa.int64()),
            "original_height": pa.array([r[3] for r in rows], pa.int64()),
        })
        pq.write_table(table, out / f"{shard:05d}.parquet")
        features = np.stack([np.eye(8, dtype=np.float32)[r[6]] * 0.9 + 0.01 for r in rows])
        np.savez(out / f"{shard:05d}.npz", l14_img=features)
        (out / f"{shard:05d}.json").write_text(json.dumps({"failures": []}))
    (out / "00002.parquet.1234abcd.tmp").write_bytes(b"partial")  # an interrupted write: never read
    return out


def frame(metadata: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(metadata.glob("*.parquet"))], ignore_index=True)


def keys(values) -> set[tuple[int, int]]:
    return {(int(u[:16], 16), int(u[16:32], 16)) for u in values}


def result_set(result) -> set[tuple[int, int]]:
    assert result.keys.dtype == np.dtype("u8,u8")
    assert result.keys.tolist() == sorted(result.keys.tolist())
    return {tuple(map(int, k)) for k in result.keys}


def test_no_filter_and_clip_score(metadata: Path) -> None:
    shards = pool.list_pool(str(metadata))
    df = frame(metadata)
    assert result_set(run_filter(FilterSpec(name="no_filter"), shards)) == keys(df.uid)
    res = run_filter(FilterSpec(name="clip_score", arch="b32", threshold=0.3), shards)
    assert result_set(res) == keys(df.uid[df.clip_b32_similarity_score >= np.float32(0.3)])
    assert res.pool_size == 10 and res.kept == 5 and res.histogram.sum() == 10  # 0.30 (float32) is kept
    for fraction in (0.0, 0.25, 0.3, 0.5, 0.9):
        res = run_filter(FilterSpec(name="clip_score", arch="l14", fraction=fraction), shards)
        scores = df.clip_l14_similarity_score.values
        threshold = -np.sort(-scores)[int(len(df) * fraction)]  # DataComp's get_threshold
        assert res.threshold == threshold
        assert result_set(res) == keys(df.uid[df.clip_l14_similarity_score >= threshold])


def test_basic_filter_with_a_fasttext_model_the_test_trains(metadata: Path, tmp_path: Path) -> None:
    model = train_fasttext(tmp_path / "lid.bin")
    res = run_filter(FilterSpec(name="basic_filter", data_files={"fasttext": str(model)}), pool.list_pool(str(metadata)))
    # English, > 2 words, > 5 chars, short side >= 200, aspect <= 3: rows 01, 03, 07, 09
    assert result_set(res) == keys([uid_of("01", 0), uid_of("03", 0), uid_of("07", 1), uid_of("09", 1)])
    assert res.files[0].pinned is False


def test_laion2b_uses_gcld3_and_b32_at_least_028(metadata: Path) -> None:
    res = run_filter(FilterSpec(name="laion2b"), pool.list_pool(str(metadata)))
    # B/32 >= 0.28: 01, 02 (fr), 04 ("dog cat"), 06, 07, 08 (""), 09, 10 (fr); gcld3 (checked here) calls
    # 06, 07 and 09 English (01, a short caption, Luxembourgish; "dog cat" Latin; "" Japanese)
    import gcld3

    ident = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    df = frame(metadata)
    english = df.text.apply(lambda t: ident.FindLanguage(text=t).language == "en")
    expected = df.uid[english & (df.clip_b32_similarity_score >= 0.28)]
    assert keys(expected) == keys([uid_of("06", 0), uid_of("07", 1), uid_of("09", 1)])
    assert result_set(res) == keys(expected)


def test_missing_data_file_is_a_clear_error(metadata: Path, tmp_path: Path) -> None:
    spec = FilterSpec(name="basic_filter")
    from d2m_core.config import parse_config

    config = parse_config({"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 1, "device": "cpu",
                           "input_tars": "x.tar", "output_metadata_dir": str(metadata),
                           "weights_dir": str(tmp_path / "empty")})
    with pytest.raises(WeightsError, match=r"lid\.176\.bin not found.*fbaipublicfiles"):
        run_filter(spec, pool.list_pool(str(metadata)), config=config)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lid.176.bin").write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="sha256"):
        run_filter(spec, pool.list_pool(str(metadata)), config=config.model_copy(update={"weights_dir": str(bad)}))


def test_image_based_keeps_clusters_near_imagenet(metadata: Path, tmp_path: Path) -> None:
    centroids = tmp_path / "centroids.pt"
    torch.save(np.eye(8, dtype=np.float32)[:4], centroids)
    in1k = tmp_path / "in1k.pt"
    torch.save({"image_features": torch.eye(8)[[0, 0, 2]] + 0.05}, in1k)  # nearest centroids: 0 and 2
    files = {"fasttext": str(train_fasttext(tmp_path / "lid.bin")), "small_centroids": str(centroids),
             "in1k_clip_vit_l14": [str(in1k)]}
    shards = pool.list_pool(str(metadata))
    res = run_filter(FilterSpec(name="image_based", image_based_scale="small", data_files=files), shards)
    # English, > 1 fastText token, > 5 chars, cluster 0 or 2: 01 (c0), 05 (c2), 07 (c2); 04 is c1, 08 empty
    assert result_set(res) == keys([uid_of("01", 0), uid_of("05", 0), uid_of("07", 1)])
    res = run_filter(FilterSpec(name="image_based_intersect_clip_score", image_based_scale="small", arch="l14",
                                threshold=0.25, data_files=files), shards)
    assert result_set(res) == keys([uid_of("05", 0), uid_of("07", 1)])  # 01 has L/14 0.20


def make_wordnet(root: Path) -> Path:
    """A WordNet database in NLTK's format, a few synsets only: offsets are byte positions in data.*."""
    folder = root / "wordnet"
    folder.mkdir()
    (folder / "lexnames").write_text("00\tadj.all\t3\n01\tadv.all\t4\n02\tnoun.animal\t1\n03\tverb.motion\t2\n")
    synsets = {"noun": [(1000, 2, "n", "dog"), (2000, 2, "n", "car"), (3000, 2, "n", "bridge"), (4000, 2, "n", "cat")],
               "verb": [(1000, 3, "v", "run")], "adj": [], "adv": []}
    index = {"noun": ["dog n 1 0 1 0 00001000", "car n 1 0 1 0 00002000", "bridge n 1 0 1 0 00003000",
                      "cat n 2 0 2 0 00004000 00001000"],  # cat's FIRST synset is not an entity
             "verb": ["run v 1 0 1 0 00001000"], "adj": [], "adv": []}
    for pos, rows in synsets.items():
        data = "  WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
        for offset, lex, tag, word in rows:
            data += "  " + " " * (offset - len(data) - 3) + "\n"
            data += f"{offset:08d} {lex:02d} {tag} 01 {word} 0 000 | a {word}\n"
        (folder / f"data.{pos}").write_text(data)
        (folder / f"index.{pos}").write_text("".join(line + "\n" for line in index[pos]))
        (folder / f"{pos}.exc").write_text("")
    (folder / "index.sense").write_text("")
    return folder


def test_text_based_with_a_wordnet_and_ids_the_test_makes(metadata: Path, tmp_path: Path) -> None:
    ids = tmp_path / "in21k.txt"
    ids.write_text("n00001000\nn00003000\n")
    files = {"fasttext": str(train_fasttext(tmp_path / "lid.bin")), "wordnet": str(make_wordnet(tmp_path)),
             "imagenet21k_wordnet_ids": str(ids)}
    res = run_filter(FilterSpec(name="text_based", data_files=files), pool.list_pool(str(metadata)))
    # English with a word whose first synset is 1000 or 3000: 01 ("dog"), 04 ("dog cat"), 07 ("bridge");
    # 03 "a small cat": cat's first synset is 4000
    assert result_set(res) == keys([uid_of("01", 0), uid_of("04", 0), uid_of("07", 1)])

"""Resharding to a uid subset: exactly the subset (repeats included, failures never), blurred where boxes are,
valid d2m input, resumable shard by shard."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from d2m_core.reading.reading import iter_samples
from d2m_core.reading.shards import expand_shards
from d2m_core.subsets import reshard, uids
from d2m_core.testdata.synth import make_shards

BOX = [0.25, 0.25, 0.5, 0.5]


@pytest.fixture
def pool_dir(tmp_path: Path) -> dict:
    """Two shards of 6 samples (jpg and png) and their metadata: sample 2 of shard 0 is a recorded failure;
    every sample at index 1 has one face box."""
    tars = make_shards(tmp_path / "shards", shards=2, samples=6, max_side=128)
    meta = tmp_path / "metadata"
    meta.mkdir()
    info = {}
    for tar in tars:
        samples = list(iter_samples(expand_shards(str(tar))[0]))
        failed = [s for i, s in enumerate(samples) if tar.stem == "00000" and i == 2]
        rows = [s for s in samples if s not in failed]
        boxes = [[BOX] if s.key.endswith("1") else [] for s in rows]
        pq.write_table(pa.table({"uid": [s.uid for s in rows],
                                 "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64())))}),
                       meta / f"{tar.stem}.parquet")
        (meta / f"{tar.stem}.json").write_text(json.dumps(
            {"failures": [{"key": s.key, "uid": s.uid, "reason": "cannot decode image"} for s in failed]}))
        info[tar.stem] = {"all": [s.uid for s in samples], "rows": [s.uid for s in rows], "failed": [s.uid for s in failed],
                          "images": {s.uid: s.image for s in samples}}
    return {"tars": str(tmp_path / "shards" / "*.tar"), "meta": str(meta), "info": info, "root": tmp_path}


def read_output(folder: Path) -> list[tuple[str, dict, dict]]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members: dict[str, dict] = {}
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        out += [(key, json.loads(m["json"]), m) for key, m in members.items()]
    return out


def test_exactly_the_subset_with_repeats_blur_and_stats(pool_dir: dict) -> None:
    info = pool_dir["info"]
    kept = [info["00000"]["rows"][0], info["00000"]["rows"][1], info["00001"]["all"][1], info["00001"]["all"][4]]
    subset = kept + [info["00001"]["all"][4], info["00000"]["failed"][0], "f" * 32]  # a repeat, a failure, unknown
    subset_file = pool_dir["root"] / "subset.npy"
    uids.save_uid_file(str(subset_file), uids.uid_keys(subset))
    out = pool_dir["root"] / "out"
    plan, written = reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), str(out), shard_size=2,
                                    apply_blur=True, inject_blur_metadata=True)
    assert plan.total == 5 and plan.num_shards == 3 and plan.not_found == 2 and plan.pool_size == 11
    assert [w.samples for w in written] == [2, 2, 1]
    samples = read_output(out)
    got = sorted(j["uid"] + "-" + key.rsplit("-", 1)[1] for key, j, _ in samples)
    assert got == sorted([u + "-0" for u in kept] + [info["00001"]["all"][4] + "-1"])
    assert all(key.startswith(j["uid"] + "-") for key, j, _ in samples)
    for key, meta, members in samples:
        boxed = meta["uid"] in (info["00000"]["rows"][1], info["00001"]["all"][1])
        assert ("face_bboxes" in meta) == boxed
        if boxed:
            assert meta["face_bboxes"] == [BOX] and "webp" in members and not ({"jpg", "png"} & set(members))
            original = np.asarray(Image.open(io.BytesIO(info["00000" if meta["uid"] in info["00000"]["all"] else "00001"]
                                                        ["images"][meta["uid"]])).convert("RGB"), np.float32)
            blurred = np.asarray(Image.open(io.BytesIO(members["webp"])).convert("RGB"), np.float32)
            h, w = original.shape[:2]
            inside = (slice(int(0.3 * h), int(0.45 * h)), slice(int(0.3 * w), int(0.45 * w)))
            outside = (slice(int(0.8 * h), h), slice(int(0.8 * w), w))
            assert np.abs(np.diff(blurred[inside], axis=1)).mean() < np.abs(np.diff(original[inside], axis=1)).mean()
            assert np.abs(blurred[outside] - original[outside]).mean() < 3  # WebP at quality 100
        else:  # untouched: the original image bytes
            images = {**info["00000"]["images"], **info["00001"]["images"]}
            assert next(members[e] for e in ("jpg", "png") if e in members) == images[meta["uid"]]
    for i, w in enumerate(written):
        stats = json.loads((out / f"{i:08d}_stats.json").read_text())
        assert stats["successes"] == stats["count"] == w.samples
    assert (np.load(out / "sample_ids.npy") == uids.sort_keys(uids.uid_keys(subset))).all()
    refs = expand_shards(str(out))  # valid d2m input
    assert [r.stem for r in refs] == ["00000000", "00000001", "00000002"]
    assert all(s.problem is None for r in refs for s in iter_samples(r))


def test_resumes_at_the_shards_not_written(pool_dir: dict) -> None:
    info = pool_dir["info"]
    subset_file = pool_dir["root"] / "subset.npy"
    uids.save_uid_file(str(subset_file), uids.uid_keys(info["00000"]["rows"] + info["00001"]["rows"]))
    out = pool_dir["root"] / "out"
    plan, first = reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), str(out), shard_size=4, shards=[1])
    assert [w.name for w in first] == ["00000001"] and plan.num_shards == 3
    before = (out / "00000001.tar").read_bytes()
    (out / "00000000.tar.0123abcd.tmp").write_bytes(b"left by a killed writer")
    _, rest = reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), str(out), shard_size=4)
    assert [w.name for w in rest] == ["00000000", "00000002"]
    assert (out / "00000001.tar").read_bytes() == before
    assert not list(out.glob("*.tmp"))
    assert sorted(j["uid"] for _, j, _ in read_output(out)) == sorted(info["00000"]["rows"] + info["00001"]["rows"])
    with pytest.raises(reshard.ReshardError, match="another reshard"):
        reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), str(out), shard_size=5)


def test_reshard_to_s3(pool_dir: dict, s3_server) -> None:
    info = pool_dir["info"]
    subset_file = pool_dir["root"] / "subset.npy"
    uids.save_uid_file(str(subset_file), uids.uid_keys(info["00001"]["rows"]))
    plan, written = reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), "s3://pool/resharded", shard_size=4)
    listed = sorted(o["Key"] for o in s3_server.list_objects_v2(Bucket="pool", Prefix="resharded/")["Contents"])
    assert listed == ["resharded/00000000.tar", "resharded/00000000_stats.json", "resharded/00000001.tar",
                      "resharded/00000001_stats.json", "resharded/reshard_plan.json", "resharded/sample_ids.npy"]
    body = s3_server.get_object(Bucket="pool", Key="resharded/00000001.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        assert len([m for m in tf.getmembers() if m.name.endswith(".json")]) == 2
    _, again = reshard.reshard(pool_dir["meta"], pool_dir["tars"], str(subset_file), "s3://pool/resharded", shard_size=4)
    assert again == []  # resumed: both shards already written

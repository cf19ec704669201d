"""Filters and resharding as assets of a dataset, on shards made by `d2m make-shards` and processed by d2m:
`d2m filter` materializes the filter asset and writes DataComp's uid file; the reshard assets write exactly
the subset, one partition per output shard."""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dagster import AssetRecordsFilter, DagsterInstance, materialize

from conftest import dataset_of, replace_member, tar_samples
from d2m_assets import build_definitions
from d2m_assets.cli import main
from d2m_assets.commands.runner import run_config_file
from d2m_core.testdata.synth import make_shards

CAPTIONS = ["a dog runs on the green grass", "le chien court", "two people walk along the beach at sunset"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two shards of 5 samples with chosen captions, processed by `d2m run` (B/32, random weights)."""
    import yaml

    root = tmp_path_factory.mktemp("subsets")
    tars = make_shards(root / "shards", shards=2, samples=5, max_side=128)
    for tar in tars:
        for i, sample in enumerate(tar_samples(tar)):
            meta = sample["json"] | {"caption": CAPTIONS[i % 3]}
            replace_member(tar, f"{sample['key']}.json", json.dumps(meta).encode())
            replace_member(tar, f"{sample['key']}.txt", CAPTIONS[i % 3].encode())
    config = {
        "models": ["oai-clip-vit-b32"], "postprocess_columns": ["oai-clip-vit-b32-score"],
        "additional_fields": ["uid", "caption", "original_width", "original_height"], "use_datacomp_keys": True,
        "nworkers": 1, "batch_size": 8, "device": "cpu", "dataset": "subsets",
        "input_tars": str(root / "shards" / "*.tar"), "output_metadata_dir": str(root / "metadata"),
        "filters": [{"name": "no_filter"}, {"name": "clip_score", "arch": "b32", "fraction": 0.5, "asset": "clip_half"}],
        "reshard": {"subset": "clip_half", "output_dir": str(root / "resharded"), "shard_size": 3,
                    "apply_blur": False, "inject_blur_metadata": False},
    }
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(root / "home"))
        assert run_config_file(path, echo=lambda _: None).ok
        frame = pd.concat([pd.read_parquet(p) for p in sorted((root / "metadata").glob("*.parquet"))], ignore_index=True)
        assert frame["text"].tolist() == [CAPTIONS[i % 3] for i in range(5)] * 2
        yield {"root": root, "config": path, "frame": frame}


def keys_of(uids) -> np.ndarray:
    keys = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    keys.sort()
    return keys


def test_filter_and_reshard_assets_are_in_the_dataset_graph(processed: dict) -> None:
    defs = build_definitions(processed["config"])
    ds = dataset_of(processed["config"])
    graph = defs.resolve_asset_graph()
    for name in ("no_filter", "clip_half"):
        assert {k.path[-1] for k in graph.get(ds.key(name)).parent_keys} == {"shard_metadata"}
        assert graph.get(ds.key(name)).automation_condition is not None
    assert {k.path[-1] for k in graph.get(ds.key("reshard_plan")).parent_keys} == {"clip_half"}
    assert graph.get(ds.key("resharded_shards")).partitions_def.name == "subsets__reshard"


def test_d2m_filter_materializes_the_asset_and_writes_datacomps_uid_file(processed: dict, capsys) -> None:
    save = processed["root"] / "out" / "clip.npy"
    assert main(["filter", "--yml", str(processed["config"]), "--name", "clip_score", "--arch", "b32",
                 "--fraction", "0.3", "--save_path", str(save), "--num_workers", "4"]) == 0
    frame = processed["frame"]
    scores = frame["clip_b32_similarity_score"].values
    threshold = -np.sort(-scores)[int(len(frame) * 0.3)]  # DataComp's get_threshold
    expected = keys_of(frame["uid"][frame["clip_b32_similarity_score"] >= threshold])
    saved = np.load(save)
    assert saved.dtype == np.dtype("u8,u8") and (saved == expected).all()
    assert f"saving {save} with {len(expected)} entries" in capsys.readouterr().out
    instance = DagsterInstance.get()
    event = instance.get_latest_materialization_event(dataset_of(processed["config"]).key("clip_score"))
    meta = event.asset_materialization.metadata
    assert meta["kept"].value == len(expected) and meta["pool_size"].value == 10
    assert meta["threshold"].value == pytest.approx(float(threshold))
    assert "score_histogram" in meta
    with pytest.raises(SystemExit):
        main(["filter", "--yml", str(processed["config"]), "--name", "clip_score", "--save_path", str(save), "--arch", "b99"])
    assert main(["filter", "--yml", str(processed["config"]), "--name", "clip_score", "--save_path", str(save)]) == 2
    assert "fraction or threshold" in capsys.readouterr().err


def test_reshard_assets_write_exactly_the_subset_per_output_shard(processed: dict) -> None:
    defs = build_definitions(processed["config"])
    ds = dataset_of(processed["config"])
    instance = DagsterInstance.get()
    assets = list(defs.assets)
    assert materialize(assets, instance=instance, selection=[ds.key("clip_half"), ds.key("reshard_plan")]).success
    names = instance.get_dynamic_partitions("subsets__reshard")
    subset = np.load(processed["root"] / "metadata" / ".d2m" / "filters" / "clip_half.npy")
    assert len(subset) == 6 and names == ["00000000", "00000001"]  # int(10 * 0.5) = 5: the top 6 (>=)
    for name in names:
        assert materialize(assets, instance=instance, selection=[ds.key("resharded_shards")], partition_key=name).success
    out = processed["root"] / "resharded"
    got = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            got += [json.loads(tf.extractfile(m).read())["uid"] for m in tf.getmembers() if m.name.endswith(".json")]
    assert (keys_of(got) == subset).all()
    assert instance.get_materialized_partitions(ds.key("resharded_shards")) == set(names)
    assert json.loads((out / "00000001_stats.json").read_text())["successes"] == 3


def test_d2m_filter_with_dagster_home_unset_finds_the_recorded_folder(processed: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """As `make demo` then the README's `d2m filter` do it: DAGSTER_HOME unset, relative paths, the repo root."""
    import logging

    from d2m_assets.yml_paths import record_base_dir

    root = processed["root"]
    relative = tmp_path / "relative.yml"
    raw = yaml.safe_load(processed["config"].read_text())
    relative.write_text(yaml.safe_dump(raw | {"output_metadata_dir": os.path.relpath(root / "metadata", root)}))
    monkeypatch.chdir(root)
    monkeypatch.setenv("DAGSTER_HOME", str(root / ".dagster_home"))
    record_base_dir(relative)  # what `d2m run` from the repo root recorded
    monkeypatch.delenv("DAGSTER_HOME")
    with caplog.at_level(logging.WARNING, logger="d2m_assets.yml_paths"):
        assert main(["filter", "--yml", str(relative), "--name", "no_filter", "--save_path", str(tmp_path / "all.npy")]) == 0
    assert not [r for r in caplog.records if r.name == "d2m_assets.yml_paths"]
    assert len(np.load(tmp_path / "all.npy")) == 10


def test_d2m_reshard_materializes_the_reshard_assets_and_skips_what_is_written(processed: dict, tmp_path: Path,
                                                                                capsys) -> None:
    """`d2m reshard` (resharder.py's flags) runs the dataset's reshard assets: the UI shows the plan and one
    partition per output shard; run again, it writes only the missing shards; another plan is refused."""
    raw = yaml.safe_load(processed["config"].read_text())
    cli_yml = tmp_path / "cli.yml"
    cli_yml.write_text(yaml.safe_dump(raw | {"dataset": "subsets_cli"}))  # its own partitions, whatever else ran
    ds = dataset_of(cli_yml)
    frame = processed["frame"]
    chosen = [frame["uid"][i] for i in (0, 2, 2, 3, 7, 9)]  # uid 2 twice: resharded twice, as DataComp does
    subset_file = tmp_path / "subset.npy"
    np.save(subset_file, keys_of(chosen))
    out = tmp_path / "resharded"
    args = ["reshard", "--yml", str(cli_yml), "--subset-file", str(subset_file), "--output-dir", str(out),
            "--shard-size", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    names = ["00000000", "00000001", "00000002"]
    for name in names:
        assert f"wrote {out}/{name}.tar: 2 samples" in printed
    assert f"selected 6 samples of the subset's 6 (0 not in the metadata) from 2 input shard(s) into 3 shard(s) in {out}" in printed

    instance = DagsterInstance.get()
    assert instance.get_dynamic_partitions("subsets_cli__reshard") == names
    assert instance.get_materialized_partitions(ds.key("resharded_shards")) == set(names)
    plan_meta = instance.get_latest_materialization_event(ds.key("reshard_plan")).asset_materialization.metadata
    assert plan_meta["samples"].value == 6 and plan_meta["output_shards"].value == 3 and plan_meta["pool_size"].value == 10
    got = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            got += [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
    uid2 = frame["uid"][2]
    assert sorted(got) == sorted([f"{u}-0" for u in chosen if u != uid2] + [f"{uid2}-0", f"{uid2}-1"])

    (out / "00000001_stats.json").unlink()  # as a reshard killed while writing shard 1 leaves it
    (out / "00000001.tar").unlink()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/00000001.tar: 2 samples" in printed and "00000000.tar" not in printed
    assert printed.rstrip().endswith("; 2 were already written")
    counts = {n: len(instance.fetch_materializations(
        AssetRecordsFilter(ds.key("resharded_shards"), asset_partitions=[n]), limit=10).records) for n in names}
    assert counts == {"00000000": 1, "00000001": 2, "00000002": 1}

    assert main(args[:-1] + ["3"]) == 2
    assert "holds another reshard" in capsys.readouterr().err
    assert main(args[:6] + [str(tmp_path / "blurred"), "--apply-blur"]) == 2  # no face boxes in this metadata
    assert "has no column 'face_bboxes'" in capsys.readouterr().err and not (tmp_path / "blurred").exists()


def test_d2m_run_over_the_resharded_folder_gives_exactly_the_subset(processed: dict, tmp_path: Path) -> None:
    """The resharded tars are d2m input: `d2m run` over them writes one row per resharded sample, uids = the
    subset, captions carried over."""
    frame = processed["frame"]
    chosen = [frame["uid"][i] for i in (1, 4, 8)]
    subset_file = tmp_path / "subset.npy"
    np.save(subset_file, keys_of(chosen))
    out = tmp_path / "resharded"
    assert main(["reshard", "--yml", str(processed["config"]), "--subset-file", str(subset_file), "--output-dir",
                 str(out), "--shard-size", "2"]) == 0
    config = {"models": ["oai-clip-vit-b32"], "postprocess_columns": ["oai-clip-vit-b32-score"],
              "additional_fields": ["uid", "caption"], "use_datacomp_keys": True, "nworkers": 1,
              "batch_size": 8, "device": "cpu", "dataset": "resharded_input", "input_tars": str(out),
              "output_metadata_dir": str(tmp_path / "metadata")}
    yml = tmp_path / "resharded.yml"
    yml.write_text(yaml.safe_dump(config))
    assert run_config_file(yml, echo=lambda _: None).ok
    parquets = sorted((tmp_path / "metadata").glob("*.parquet"))
    assert [p.stem for p in parquets] == ["00000000", "00000001"]
    rows = pd.concat([pd.read_parquet(p) for p in parquets], ignore_index=True)
    assert sorted(rows["uid"]) == sorted(chosen) and len(rows) == 3
    captions = dict(zip(frame["uid"], frame["text"]))
    assert rows["text"].tolist() == [captions[u] for u in rows["uid"]]
    assert rows["clip_b32_similarity_score"].between(-1, 1).all()


def test_d2m_reshard_killed_after_writing_a_shard_rewrites_it_and_a_new_plan_owns_the_partitions(
        processed: dict, tmp_path: Path, capsys) -> None:
    """kill -9 lands (held at a pause point) after output shard 1's files are written, before Dagster records it.
    The rerun marks the dead run failed, writes shard 1 again (its files alone do not count) and shard 2; every
    record carries the plan's data version. A reshard to another folder then owns the partitions: the older
    plan's records are wiped, and a materialization from the UI's definitions writes to the recorded folder."""
    import signal
    import subprocess
    import sys
    import time

    from dagster import DagsterRunStatus

    from d2m_core.testdata.pausepoints import PAUSE_DIR_ENV, PAUSE_ENV

    raw = yaml.safe_load(processed["config"].read_text())
    yml = tmp_path / "kill.yml"
    yml.write_text(yaml.safe_dump(raw | {"dataset": "subsets_kill"}))
    ds = dataset_of(yml)
    frame = processed["frame"]
    subset_file = tmp_path / "subset.npy"
    np.save(subset_file, keys_of([frame["uid"][i] for i in (0, 1, 3, 5, 6, 8)]))
    out = tmp_path / "resharded"
    args = ["reshard", "--yml", str(yml), "--subset-file", str(subset_file), "--output-dir", str(out), "--shard-size", "2"]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "d2m"), *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ | {
                                PAUSE_ENV: "reshard-shard-written:00000001", PAUSE_DIR_ENV: str(tmp_path)})
    held = tmp_path / "reshard-shard-written-00000001"
    deadline = time.monotonic() + 300
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    instance = DagsterInstance.get()
    names = ["00000000", "00000001", "00000002"]
    assert (out / "00000001_stats.json").exists() and not (out / "00000002.tar").exists()
    assert instance.get_materialized_partitions(ds.key("resharded_shards")) == {"00000000"}
    (killed,) = [r for r in instance.get_runs() if r.status == DagsterRunStatus.STARTED]

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"run {killed.run_id} was left unfinished by a process that is gone: marked failed" in printed
    assert f"wrote {out}/00000001.tar: 2 samples" in printed and f"wrote {out}/00000002.tar: 2 samples" in printed
    assert "00000000.tar" not in printed and printed.rstrip().endswith("; 1 was already written")
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
    version = instance.get_latest_materialization_event(ds.key("reshard_plan")).asset_materialization.tags[
        "dagster/data_version"]
    records = {r.partition_key: r.asset_materialization for r in instance.fetch_materializations(
        ds.key("resharded_shards"), limit=20).records[::-1]}
    assert sorted(records) == names and {m.tags["dagster/data_version"] for m in records.values()} == {version}

    other = tmp_path / "other"
    assert main([*args[:6], str(other), "--shard-size", "3"]) == 0
    assert f"wrote {other}/00000001.tar: 3 samples" in capsys.readouterr().out
    assert instance.get_dynamic_partitions("subsets_kill__reshard") == names[:2]
    latest = {r.partition_key: r.asset_materialization for r in instance.fetch_materializations(
        ds.key("resharded_shards"), limit=20).records[::-1]}
    assert {p: str(m.metadata["tar"].value) for p, m in latest.items()} == {
        n: f"{other}/{n}.tar" for n in names[:2]}  # shard 00000002 of the older plan: wiped
    before = (other / "00000001.tar").stat().st_mtime_ns
    assert materialize(list(build_definitions(yml).assets), instance=instance, selection=[ds.key("resharded_shards")],
                       partition_key="00000001").success  # the yml's `reshard` section names another folder
    assert (other / "00000001.tar").stat().st_mtime_ns > before and not (processed["root"] / "resharded_kill").exists()

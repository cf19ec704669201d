"""Dagster state a user can trust: datasets never collide, a skip means the same work, each shard is recorded
as soon as its files are complete, no reader sees an incomplete output, and bad inputs fail before any state."""

from __future__ import annotations

import os
import shutil
import signal

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from dagster import DagsterInstance

from conftest import BASIC, REPO, dataset_of, run_cli
from d2m_core.outputs.validation import CHECKS
from d2m_core.testdata.pausepoints import PAUSE_DIR_ENV, PAUSE_ENV
from d2m_core.testdata.synth import make_shards


def _yml(path: Path, tars: str | list[str], out: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump(BASIC | {"input_tars": tars, "output_metadata_dir": str(out)} | extra))
    return path


def _run(config: Path, home: Path, monkeypatch: pytest.MonkeyPatch):
    from d2m_assets.commands.runner import run_config_file

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    lines: list[str] = []
    summary = run_config_file(config, echo=lines.append)
    return summary, "\n".join(lines)


def test_two_datasets_with_the_same_tar_names_share_no_state(shard_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    make_shards(other, shards=2, samples=5, max_side=128, seed=7)  # also 00000.tar, 00001.tar
    home = tmp_path / "home"
    first = _yml(tmp_path / "a.yml", str(shard_dir / "*.tar"), tmp_path / "a", tars_per_wds=2)
    second = _yml(tmp_path / "b.yml", str(other / "*.tar"), tmp_path / "b", tars_per_wds=2)
    for config in (first, second):
        summary, out = _run(config, home, monkeypatch)
        assert summary.ok and summary.processed == ["00000", "00001"] and not summary.skipped, out
    assert pq.read_table(tmp_path / "b" / "00000.parquet").num_rows == 5  # the second dataset's own shards
    assert pq.read_table(tmp_path / "a" / "00000.parquet").num_rows == 8
    instance = DagsterInstance.get()
    a, b = dataset_of(first), dataset_of(second)
    assert a.name != b.name
    for ds in (a, b):
        assert instance.get_dynamic_partitions(ds.partitions_name) == ["00000", "00001"]
        assert instance.get_materialized_partitions(ds.key("shard_metadata")) == {"00000", "00001"}
    for config in (first, second):
        summary, out = _run(config, home, monkeypatch)
        assert summary.ok and summary.skipped == ["00000", "00001"] and not summary.processed, out


def test_a_changed_tar_output_folder_or_weights_forces_a_recompute(shard_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from d2m_assets.commands.runner import reasons_to_run
    from d2m_core import load_config
    from d2m_core.outputs.identity import weights_by_model
    from d2m_core.preflight import preflight

    tars = tmp_path / "tars"
    shutil.copytree(shard_dir, tars)
    home = tmp_path / "home"
    config = _yml(tmp_path / "c.yml", str(tars / "*.tar"), tmp_path / "out", tars_per_wds=2, dataset="pool")
    assert _run(config, home, monkeypatch)[0].processed == ["00000", "00001"]

    # The same tar rewritten (new mtime and size): only that shard is recomputed, and the run says why.
    data = (tars / "00001.tar").read_bytes()
    (tars / "00001.tar").write_bytes(data + b"\0" * 1024)
    summary, out = _run(config, home, monkeypatch)
    assert summary.skipped == ["00000"] and summary.processed == ["00001"], out
    assert "1 shard(s) to compute (its tar changed): 00001" in out

    # Another output folder for the same dataset: every shard is recomputed, into the new folder.
    moved = _yml(tmp_path / "c.yml", str(tars / "*.tar"), tmp_path / "out2", tars_per_wds=2, dataset="pool")
    summary, out = _run(moved, home, monkeypatch)
    assert summary.processed == ["00000", "00001"] and "(the output location changed)" in out, out
    assert (tmp_path / "out2" / "00000.parquet").is_file()

    # Other weights (another sha256 than the one recorded): every shard must run again.
    cfg = load_config(moved)
    checked = preflight(cfg)
    instance = DagsterInstance.get()
    same = reasons_to_run(instance, dataset_of(moved), cfg, ["00000", "00001"], ["clip_b32_features", "clip_b32_scores",
                          "shard_metadata"], checked.tars, weights_by_model(checked.weights))
    assert same == {"00000": [], "00001": []}
    other = weights_by_model(checked.weights) | {"oai-clip-vit-b32": "0" * 64}
    changed = reasons_to_run(instance, dataset_of(moved), cfg, ["00000", "00001"], ["clip_b32_features",
                             "clip_b32_scores", "shard_metadata"], checked.tars, other)
    assert changed == {"00000": ["the weights changed"], "00001": ["the weights changed"]}


def test_preflight_failures_are_one_line_exit_2_and_register_nothing(shard_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = _yml(tmp_path / "missing.yml", str(shard_dir / "{00000..00002}.tar"), tmp_path / "out")
    result = run_cli(["d2m", "run", "--yml", str(missing)], {"DAGSTER_HOME": str(home)}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert lines == [f"d2m: error: input tar not found: {shard_dir / '00002.tar'}; download it or fix input_tars "
                     f"('{shard_dir / '{00000..00002}.tar'}')"]
    assert not home.exists() and not (tmp_path / "out").exists()  # no instance, no partition, no output

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unwritable = _yml(tmp_path / "unwritable.yml", str(shard_dir / "*.tar"), blocker / "metadata")
    result = run_cli(["d2m", "run", "--yml", str(unwritable)], {"DAGSTER_HOME": str(home)}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith(f"d2m: error: output folder {blocker / 'metadata'} is not writable (")
    assert lines[0].endswith("fix its permissions or set output_metadata_dir to a writable folder")
    assert not home.exists()


PLUGIN = """
import numpy as np
import torch

class MeanColour:
    name = "mean-colour"
    raw_inputs = ["image"]
    preprocessors = ["tiny"]
    dependencies = []
    to_device = True

    def __init__(self, device):
        pass

    def __call__(self, image):
        return image.mean(dim=(2, 3))

def tiny(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

model_lookup = {"mean-colour": MeanColour}
preprocessor_lookup = {"tiny": tiny}
postprocess_parquet_lookup = {"mean-red": lambda outputs: outputs["mean-colour"][:, 0]}
postprocess_feature_lookup = {"mean-rgb": lambda outputs: outputs["mean-colour"]}
"""


# --- kill -9 at several points of a multi-shard run --------------------------------------------------------------


class Reader(threading.Thread):
    """A DataComp-style reader: lists the output folder (and .d2m/) over and over and reads every file whose
    name contains .parquet or .npz; any it cannot read completely is recorded."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.bad, self.reads, self.stop = root, [], 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in list(self.root.rglob("*")) if self.root.exists() else []:
                if ".parquet" not in path.name and ".npz" not in path.name:
                    continue
                try:
                    if ".parquet" in path.name:
                        pq.read_table(path)
                    else:
                        with np.load(path) as data:
                            [data[k] for k in data.files]
                    self.reads += 1
                except FileNotFoundError:
                    continue  # renamed away between the listing and the read
                except Exception as err:  # noqa: BLE001 - what a reader would trip on
                    self.bad.append(f"{path.name}: {err}")
            time.sleep(0.005)


_FORKS: list = []


def _forks():
    """A forkserver that has imported d2m, Dagster and torch once: each `d2m run` below is a fork of it, a
    process of its own (killed with SIGKILL) that starts in a fraction of a second instead of re-importing."""
    if not _FORKS:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["d2m_assets.commands.runner"])
        _FORKS.append(context)
    return _FORKS[0]


def _run_in_child(config: Path, home: Path, log: Path, pause: str | None) -> None:
    """The body of `d2m run --yml config`, in a forked process, its lines written to `log` as they come."""
    os.environ.pop(PAUSE_ENV, None)
    os.environ |= {"DAGSTER_HOME": str(home), "D2M_RANDOM_WEIGHTS": "1", "D2M_AUTOMATION": "off"}
    if pause:
        os.environ |= {PAUSE_ENV: pause, PAUSE_DIR_ENV: str(log.parent)}
    from d2m_assets.commands.runner import run_config_file

    with log.open("w") as sink:
        def echo(line: str) -> None:
            sink.write(line + "\n")
            sink.flush()

        summary = run_config_file(config, echo=echo)
    os._exit(0 if summary.ok else 1)


def _start(config: Path, home: Path, log: Path, pause: str | None = None):
    """`d2m run` in its own process; `pause` ("<point>:<stem>", d2m_core.testdata.pausepoints) holds it at that point."""
    log.touch()
    proc = _forks().Process(target=_run_in_child, args=(config, home, log, pause))
    proc.start()
    return proc


def _wait_for(condition, what: str, proc, log: Path, timeout: float = 600) -> None:
    """Wait (no timing assumption: a generous deadline) until `condition()`, the process still alive."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = not proc.is_alive()
        assert not ended or condition(), f"d2m run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _files(root: Path) -> dict[str, bytes]:
    import json

    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(".tmp"):
            data = path.read_bytes()
            if path.suffix == ".json":  # wall-clock timings differ from run to run
                record = json.loads(data)
                data = repr({k: v for k, v in record.items() if k not in ("sample time (s)", "loader time (s)", "timings")})
            out[str(path.relative_to(root))] = data
    return out


def test_kill_9_at_three_points_loses_only_the_shard_in_flight(tmp_path: Path) -> None:
    """SIGKILL lands provably at each point: the process is held there (d2m_core.testdata.pausepoints) until killed."""
    shards = tmp_path / "shards"
    make_shards(shards, shards=4, samples=8, max_side=64)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)  # a tiny custom model: the run's time goes to what is tested, not to a ViT
    settings = {"tars_per_wds": 4, "reader_processes": 1,  # one Dagster run for all four shards, read in order
                "models": ["mean-colour"], "custom_pypath": str(plugin), "postprocess_columns": ["mean-red"],
                "postprocess_features": ["mean-rgb"], "additional_fields": ["uid", "caption"]}
    reference = _yml(tmp_path / "reference.yml", str(shards / "*.tar"), tmp_path / "reference", **settings)
    log = tmp_path / "reference.log"
    proc = _start(reference, tmp_path / "reference_home", log)  # plugins install globally: in its own process
    proc.join(600)
    assert proc.exitcode == 0, log.read_text()[-3000:]

    out, home = tmp_path / "metadata", tmp_path / "home"
    config = _yml(tmp_path / "config.yml", str(shards / "*.tar"), out, **settings)
    key = dataset_of(config).key("shard_metadata")
    reader = Reader(out)
    reader.start()

    instances: list[DagsterInstance] = []

    def recorded() -> set[str]:
        if not instances:  # the first `d2m run` creates the instance
            instances.append(DagsterInstance.from_ref(_instance_ref(home)))
        return instances[0].get_materialized_partitions(key)

    # (point, shard, shards recorded when killed); each rerun is the next kill's run
    kills = [("shard-complete", "00001", {"00000"}),  # 00001's files all written, not recorded
             ("between-writes", "00002", {"00000", "00001"}),  # 00002.parquet written, its .json not
             ("shard-computing", "00003", {"00000", "00001", "00002"})]  # 00003's first batch computed
    try:
        before: set[str] = set()
        for i, (point, stem, expected) in enumerate([*kills, (None, None, None)]):
            log = tmp_path / f"run-{i}.log"
            proc = _start(config, home, log, f"{point}:{stem}" if point else None)
            _wait_for(lambda: "to compute" in log.read_text(), "its plan", proc, log)
            text = log.read_text()
            if before:  # the rerun skips exactly the recorded shards, and computes the others
                assert f"{len(before)} shard(s) already materialized, skipped (same tar, output location and " \
                       f"weights): {', '.join(sorted(before))}" in text, text
            todo = sorted({"00000", "00001", "00002", "00003"} - before)
            assert f"{len(todo)} shard(s) to compute (not materialized): {', '.join(todo)}" in text, text
            if point is None:
                proc.join(600)
                assert proc.exitcode == 0, log.read_text()[-3000:]
                break
            _wait_for((tmp_path / f"{point}-{stem}").exists, f"the {point} point of {stem}", proc, log)
            _wait_for(lambda: recorded() == expected, f"{sorted(expected)} recorded", proc, log)
            proc.kill()  # SIGKILL
            proc.join(60)
            assert proc.exitcode == -signal.SIGKILL
            before = recorded()
            complete = {p.stem for p in out.glob("*.json")}
            assert before == expected, (point, before)
            assert complete - before == ({stem} if point == "shard-complete" else set()), (point, complete)
            if point == "between-writes":  # one of its files written, the next not
                assert (out / f"{stem}.parquet").is_file() and not (out / f"{stem}.json").exists()
            if point == "shard-computing":  # nothing of it written
                assert not list(out.glob(f"{stem}.*"))
        deadline = time.monotonic() + 600
        while reader.reads == 0 and time.monotonic() < deadline:  # it has read the folder at least once
            time.sleep(0.05)
    finally:
        reader.stop.set()
        reader.join(60)
    assert reader.reads > 0 and reader.bad == []
    assert _files(out) == _files(tmp_path / "reference")  # byte-identical (json without wall-clock timings)
    assert recorded() == {"00000", "00001", "00002", "00003"}
    assert not [p.name for p in out.rglob("*") if (".parquet" in p.name or ".npz" in p.name)
                and not p.name.endswith((".parquet", ".npz"))]


def _instance_ref(home: Path):
    from dagster._core.instance.ref import InstanceRef

    return InstanceRef.from_dir(str(home))


CHECK_STATUSES = """
query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  assetChecksOrError { ... on AssetChecks { checks { name partitionStatuses {
    ... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions inProgressPartitions
                                                skippedPartitions executionFailedPartitions } } } } } } } }
"""


def _check_statuses(instance: DagsterInstance, config: Path, key) -> dict[str, dict[str, list[str]]]:
    """Each check's per-partition statuses as the UI's Checks tab reads them: the webserver's GraphQL schema,
    over a workspace that loads workspace.yaml in a code server process, as `dagster-webserver` does."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    assert os.environ["D2M_CONFIG"] == str(config)  # what the code server process loads
    with define_out_of_process_context(str(REPO / "workspace.yaml"), None, instance) as context:
        with context:  # as the webserver enters each request's context (it sets the partition loading context)
            result = execute_dagster_graphql(context, CHECK_STATUSES, {"key": {"path": key.path}})
    assert not result.errors, result.errors
    checks = result.data["assetNodeOrError"]["assetChecksOrError"]["checks"]
    return {c["name"]: {k: sorted(v) for k, v in c["partitionStatuses"].items() if v} for c in checks}


# --- automation: exactly the shards whose identity no longer matches --------------------------------------------


def test_automation_requests_exactly_the_shards_whose_identity_changed(shard_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset's automation conditions and new_shards_sensor, evaluated with Dagster's own APIs on a real
    instance: a shard recorded with other weights, a tar changed after registration, another output folder.
    After the run, the UI's GraphQL shows each blocking check passed for each partition's materialization."""
    from dagster import AssetMaterialization, build_sensor_context, evaluate_automation_conditions

    from d2m_assets import build_definitions

    tars = tmp_path / "tars"
    shutil.copytree(shard_dir, tars)
    home = tmp_path / "home"
    config = _yml(tmp_path / "c.yml", str(tars), tmp_path / "out", tars_per_wds=2, dataset="pool")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("D2M_CONFIG", str(config))
    from d2m_assets.commands.runner import ensure_instance

    instance = ensure_instance()
    defs, ds = build_definitions(config), dataset_of(config)
    sensor = defs.get_sensor_def(ds.named("new_shards_sensor"))
    assets = ["clip_b32_features", "clip_b32_scores", "shard_metadata"]
    state = {"sensor": None, "automation": None}

    def tick() -> list[AssetMaterialization]:
        """One new_shards_sensor tick (it stores its events and partitions itself): the raw_shards events it stored."""
        seen = {r.storage_id for r in instance.fetch_materializations(ds.key("raw_shards"), limit=1000).records}
        result = sensor(build_sensor_context(instance=instance, cursor=state["sensor"], resources=defs.resources,
                                             definitions=defs))
        state["sensor"] = result.cursor
        assert not result.asset_events and not result.dynamic_partitions_requests
        records = instance.fetch_materializations(ds.key("raw_shards"), limit=1000, ascending=True).records
        return [r.asset_materialization for r in records if r.storage_id not in seen]

    def requested() -> dict[str, list[str]]:
        """One automation tick: the partitions it requests, per shard asset."""
        result = evaluate_automation_conditions(defs, instance, cursor=state["automation"])
        state["automation"] = result.cursor
        found = {a: sorted(result.get_requested_partitions(ds.key(a))) for a in assets}
        return {a: keys for a, keys in found.items() if keys}

    assert [e.partition for e in tick()] == ["00000", "00001"]  # registered, raw_shards reported
    assert _run(config, home, monkeypatch)[0].processed == ["00000", "00001"]
    assert _check_statuses(instance, config, ds.key("shard_metadata")) == {
        name: {"succeededPartitions": ["00000", "00001"]} for name in CHECKS}
    assert requested() == {}  # every shard materialized with the identity the config gives

    # `missing` read from a snapshot older than a run that recorded the shards and has ended since (so they are
    # not in progress either): the shards recorded by then are still not requested again
    from dagster._core.definitions.declarative_automation.operands.operands import MissingAutomationCondition

    features_key, missing = ds.key("clip_b32_features"), MissingAutomationCondition.compute_subset

    async def snapshot_before_the_run(self, context):  # noqa: ANN001, ANN202
        return context.candidate_subset if context.key == features_key else await missing(self, context)

    with monkeypatch.context() as patch:
        patch.setattr(MissingAutomationCondition, "compute_subset", snapshot_before_the_run)
        assert requested() == {}

    # shard_metadata of 00001 recorded with other weights than the config's: that shard only, that asset only
    key = ds.key("shard_metadata")
    latest = instance.fetch_materializations(key, limit=10).records
    original = next(r for r in latest if r.partition_key == "00001").asset_materialization.tags
    instance.report_runless_asset_event(AssetMaterialization(key, partition="00001", tags=original | {
        "d2m/weights": "0" * 16, "dagster/data_version": "1" * 16}))
    assert requested() == {"shard_metadata": ["00001"]}
    instance.report_runless_asset_event(AssetMaterialization(key, partition="00001", tags=original))
    assert requested() == {}  # recorded again with the config's identity (read incrementally)

    # features of 00001 materialized again with the same identity: same bytes, so its children are not requested
    features = ds.key("clip_b32_features")
    same = next(r for r in instance.fetch_materializations(features, limit=10).records if r.partition_key == "00001")
    instance.report_runless_asset_event(AssetMaterialization(features, partition="00001",
                                                             tags=same.asset_materialization.tags))
    assert requested() == {}

    # 00000.tar rewritten after registration: the sensor reports it again, and that shard is requested
    (tars / "00000.tar").write_bytes((tars / "00000.tar").read_bytes() + b"\0" * 1024)
    changed = tick()
    assert [(e.asset_key, e.partition) for e in changed] == [(ds.key("raw_shards"), "00000")]
    assert changed[0].metadata["tar"].value["size"] == (tars / "00000.tar").stat().st_size
    assert tick() == []  # reported once
    assert requested() == {a: ["00000"] for a in assets}

    # another output folder for the dataset (the yml read afresh, as the code server does): every shard
    _yml(tmp_path / "c.yml", str(tars), tmp_path / "out2", tars_per_wds=2, dataset="pool")
    assert requested() == {a: ["00000", "00001"] for a in assets}

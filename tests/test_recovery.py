"""Faults: a run killed mid-shard, a full disk, S3 credentials kept out of every trace, a GPU out of memory.

No reader ever sees a half-written file, Dagster shows what failed, and a rerun finishes the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from conftest import BASIC, VENV_BIN, dataset_of, run_cli
from services import tmpfs
from d2m_assets.partitions import GPU_POOL
from d2m_assets.commands.recovery import HOST_TAG, PID_TAG, mark_abandoned_runs, owner_tags
from d2m_core.compute.engine import RAGGED, DeviceOutOfMemoryError, Engine
from d2m_core.reading.shards import ShardRef
from d2m_core.testdata.synth import make_shards

TIMING_KEYS = {"sample time (s)", "loader time (s)", "timings"}


def _config(path: Path, shards: Path, out: Path | str, **overrides) -> Path:
    data = BASIC | {"input_tars": str(shards), "output_metadata_dir": str(out)} | overrides
    path.write_text(yaml.safe_dump(data))
    return path


def _instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> DagsterInstance:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return DagsterInstance.get()


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _partial_files(root: Path) -> list[str]:
    """Files under a final name that are empty or do not parse (what a reader could trip on)."""
    bad = []
    for name, path in _files(root).items():
        if name.endswith(".tmp"):
            continue
        try:
            if path.stat().st_size == 0:
                raise ValueError("empty")
            if name.endswith(".parquet"):
                pq.read_table(path)
            elif name.endswith(".npz"):
                with np.load(path) as data:
                    [data[k] for k in data.files]
            elif name.endswith(".json"):
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read is what we look for
            bad.append(f"{name}: {err}")
    return bad


def _event_log(instance: DagsterInstance, run_id: str) -> str:
    """Everything Dagster recorded for a run (messages, metadata, errors with their causes), as text."""
    return "\n".join(repr(entry) for entry in instance.all_logs(run_id))


def _comparable(path: Path) -> bytes | dict:
    """A file's bytes, or for json its content without the wall-clock timings."""
    if path.suffix == ".json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
    return path.read_bytes()


# --- kill -9 in the middle of a shard --------------------------------------------------------------------------


def _d2m_run(config: Path, home: Path, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(VENV_BIN / "d2m"), "run", "--yml", str(config)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _d2m_start(config: Path, home: Path, log: Path) -> subprocess.Popen:
    env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        return subprocess.Popen([str(VENV_BIN / "d2m"), "run", "--yml", str(config)], env=env, cwd=log.parent,
                                stdout=sink, stderr=subprocess.STDOUT)


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"d2m run ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any still running at its end (a failed test) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_kill_9_mid_shard_leaves_no_partial_file_fails_the_run_and_the_rerun_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, children: list[subprocess.Popen]
) -> None:
    shards = tmp_path / "shards"
    for start, samples in ((0, 8), (1, 40), (2, 8)):  # the kill lands in 00001, which takes seconds on a CPU
        make_shards(shards, shards=1, samples=samples, start=start, max_side=64)
    settings = {"tars_per_wds": 1, "batch_size": 2}  # one run per shard
    reference_out, out, home = tmp_path / "reference", tmp_path / "metadata", tmp_path / "home"

    # The uninterrupted run, for comparison (its own instance and folder), alongside the one we kill.
    reference_log = tmp_path / "reference.log"
    reference = _d2m_start(_config(tmp_path / "reference.yml", shards, reference_out, **settings),
                           tmp_path / "reference_home", reference_log)
    config = _config(tmp_path / "config.yml", shards, out, **settings)
    log = tmp_path / "killed.log"
    proc = _d2m_start(config, home, log)
    children += [reference, proc]
    _wait_for(lambda: "[run 1/3]" in log.read_text(), "the first shard's run to finish", proc, log)
    instance = _instance(home, monkeypatch)

    def second_run_computing() -> str | None:
        for record in instance.get_run_records():
            events = instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_START)
            if record.dagster_run.status == DagsterRunStatus.STARTED and events:
                return record.dagster_run.run_id
        return None

    killed_run = _wait_for(second_run_computing, "the second shard's run to start its step", proc, log)
    assert mark_abandoned_runs(instance) == []  # its process is alive: left alone
    time.sleep(1.0)  # models loading or loaded, batches of shard 00001 going through
    assert not (out / "00001.npz").exists(), "shard 00001 finished before the kill"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL

    # No file a reader could trip on; 00000 complete; nothing of 00001 where DataComp's readers look.
    assert _partial_files(out) == []
    finals = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    assert finals == ["00000.json", "00000.npz", "00000.parquet"]
    leftovers = [n for n in _files(out) if n.endswith(".tmp")]  # only if the kill hit a write; swept below

    # The killed run is left STARTED, holding the gpu pool's slot (later runs would wait for it for ever).
    # mark_abandoned_runs reports it failed and frees the slot; its partition is not materialized.
    assert instance.get_run_by_id(killed_run).status == DagsterRunStatus.STARTED
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids == {killed_run}
    assert mark_abandoned_runs(instance) == [killed_run]
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0
    failed = instance.get_run_by_id(killed_run)
    assert failed.status == DagsterRunStatus.FAILURE
    (failure,) = instance.all_logs(killed_run, of_type=DagsterEventType.RUN_FAILURE)
    assert "is gone" in failure.message and str(proc.pid) in failure.message
    planned = {e.dagster_event.partition for e in instance.all_logs(killed_run, of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED)}
    assert "00001" in planned  # planned in a failed run and never materialized: the UI shows it failed
    features = dataset_of(config).key("clip_b32_features")
    assert instance.get_materialized_partitions(features) == {"00000"}
    assert mark_abandoned_runs(instance) == []

    # The rerun (reprocess: false) skips 00000, finishes the rest, sweeps leftovers; outputs match the reference.
    rerun = _d2m_run(config, home, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 shard(s) already materialized, skipped" in rerun.stdout
    assert instance.get_materialized_partitions(features) == {"00000", "00001", "00002"}
    assert reference.wait(240) == 0, reference_log.read_text()[-3000:]
    files, expected = _files(out), _files(reference_out)
    assert sorted(files) == sorted(expected), leftovers
    assert _partial_files(out) == []
    for name, path in files.items():
        assert _comparable(path) == _comparable(expected[name]), name


def test_only_runs_whose_process_is_gone_on_this_host_are_marked() -> None:
    from dagster import DagsterRun

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    instance = DagsterInstance.ephemeral()  # not SQLite files: untagged runs may come from any machine
    runs = {}
    for name, tags in {"dead here": owner_tags() | {PID_TAG: str(gone.pid)},
                       "dead elsewhere": {PID_TAG: str(gone.pid), HOST_TAG: "another-machine"},
                       "alive here": owner_tags(),
                       "unknown owner": {}}.items():
        run = DagsterRun(job_name="shards", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED, tags=tags)
        instance.add_run(run)
        runs[name] = run.run_id
    assert mark_abandoned_runs(instance) == [runs["dead here"]]
    status = {name: instance.get_run_by_id(run_id).status for name, run_id in runs.items()}
    assert status == {"dead here": DagsterRunStatus.FAILURE, "dead elsewhere": DagsterRunStatus.STARTED,
                      "alive here": DagsterRunStatus.STARTED, "unknown owner": DagsterRunStatus.STARTED}


# --- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as output_metadata_dir (needs root or CAP_SYS_ADMIN); skipped where mounting is refused."""
    with tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def test_disk_full_fails_the_shard_naming_the_file_and_keeps_earlier_outputs(
    shard_dir: Path, small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2m_assets.commands.runner import run_config_file

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    out = small_disk / "metadata"
    first = run_config_file(_config(tmp_path / "one.yml", shard_dir / "00000.tar", out), echo=lambda _: None)
    assert first.ok
    instance = DagsterInstance.get()
    before = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in _files(out).items()}

    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"  # leave 8 KiB: less than any shard's features file
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8 * 1024))
    both = _config(tmp_path / "both.yml", shard_dir, out)
    full = run_config_file(both, echo=lambda _: None)
    assert not full.ok
    assert f"cannot write {out}/00001.npz: No space left on device" in _event_log(instance, full.failed_runs[0])
    assert {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in _files(out).items()} == before
    assert instance.get_materialized_partitions(dataset_of(both).key("clip_b32_features")) == {"00000"}

    filler.unlink()  # space again: the rerun finishes the shard
    assert run_config_file(both, echo=lambda _: None).ok
    assert (out / "00001.parquet").is_file() and _partial_files(out) == []
    assert not [n for n in _files(out) if n.endswith(".tmp")]


# --- credentials never leak, even when S3 fails ----------------------------------------------------------------

SECRET = "d2mSecretKey/DoNotLog+7f3c9a1e5b"
ACCESS = "D2MACCESSKEYTEST7Q"


def _leaks(root: Path) -> list[str]:
    return [name for name, p in _files(root).items() if SECRET.encode() in p.read_bytes()]


def test_s3_credentials_never_appear_in_logs_errors_metadata_or_outputs(
    shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "DAGSTER_HOME": str(tmp_path / "home")}
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3")
        client.create_bucket(Bucket="meta")
        config = _config(tmp_path / "s3.yml", shard_dir / "00001.tar", "s3://meta/out")

        done = run_cli(["d2m", "run", "--yml", str(config)], aws, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="meta")["Contents"])
        assert {"out/00001.parquet", "out/00001.npz", "out/00001.json"} <= set(keys)
        objects = b"".join(client.get_object(Bucket="meta", Key=k)["Body"].read() for k in keys)

        server.stop()  # S3 goes away: the next run fails, and its errors must not carry the secret either
        monkeypatch.setenv("D2M_IO_ATTEMPTS", "2")
        monkeypatch.setenv("D2M_IO_BACKOFF_S", "0.1")
        s3fs.S3FileSystem.clear_instance_cache()
        from d2m_assets.commands.runner import run_config_file
        from d2m_core.preflight import PreflightError

        with pytest.raises(PreflightError) as failed:  # the output probe: before any state or compute
            run_config_file(_config(tmp_path / "again.yml", shard_dir / "00001.tar", "s3://meta/out", reprocess=True),
                            echo=print)
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    captured = capfd.readouterr()
    instance = DagsterInstance.get()
    assert "output folder s3://meta/out is not writable (cannot write s3://meta/out/.d2m-write-probe-" in str(failed.value)

    traces = {"stdout": done.stdout, "stderr": done.stderr, "failed run output": captured.out + captured.err,
              "S3 objects": objects.decode("latin-1"), "preflight error": str(failed.value)}
    for run_id in instance.get_run_ids():
        traces[f"events of run {run_id}"] = _event_log(instance, run_id)
    assert [where for where, text in traces.items() if SECRET in text] == []
    assert _leaks(tmp_path / "home") == []  # the SQLite files, run storage, compute logs
    assert [where for where, text in traces.items() if ACCESS in text] == []


# --- GPU out of memory: the batch is split, outputs stay in order ---------------------------------------------


class _Limited:
    """A stub model that runs out of memory on batches larger than `limit` samples; outputs depend on the sample."""

    def __init__(self, limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError, ragged: bool = False) -> None:
        self.raw_inputs, self.preprocessors, self.dependencies, self.to_device = ["image"], ["clip-aug"], [], True
        self.output_fields = {"x": RAGGED} if ragged else {"x": 0}
        self.limit, self.error, self.ragged, self.sizes = limit, error, ragged, []

    def __call__(self, pixels: torch.Tensor):
        self.sizes.append(len(pixels))
        if len(pixels) > self.limit:
            raise self.error(f"CUDA out of memory. Tried to allocate {len(pixels)} GiB")
        means = pixels.float().mean(dim=(1, 2, 3))
        return ([[float(m)] * (int(m) % 3) for m in means],) if self.ragged else (means,)


def _engine(model: _Limited, batch_size: int = 8) -> Engine:
    return Engine({"m": model}, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, nworkers=1)


@pytest.fixture(scope="module")
def reference_rows(shard_dir: Path) -> np.ndarray:
    (result,) = _engine(_Limited(limit=10**6)).run([ShardRef("00001", str(shard_dir / "00001.tar"))])
    return result.outputs["m"]["x"]


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_out_of_memory_splits_the_batch_and_keeps_rows_in_order(shard_dir: Path, reference_rows, error, caplog) -> None:
    model = _Limited(limit=2, error=error)
    with caplog.at_level(logging.WARNING, logger="d2m_core.compute.engine"):
        (result,) = _engine(model).run([ShardRef("00001", str(shard_dir / "00001.tar"))])
    assert np.array_equal(result.outputs["m"]["x"], reference_rows) and result.stats.samples_written == 9
    assert model.sizes == [8, 4, 2, 2, 4, 2, 2, 1]
    assert caplog.text.count("batch of 8 split into 4 + 4 after out of memory") == 1
    assert caplog.text.count("batch of 4 split into 2 + 2 after out of memory") == 2


def test_out_of_memory_split_joins_per_sample_lists(shard_dir: Path) -> None:
    whole = _Limited(limit=10**6, ragged=True)
    split = _Limited(limit=3, ragged=True)
    ref = ShardRef("00001", str(shard_dir / "00001.tar"))
    (expected,), (result,) = _engine(whole).run([ref]), _engine(split).run([ref])
    assert result.outputs["m"]["x"] == expected.outputs["m"]["x"] and len(expected.outputs["m"]["x"]) == 9
    assert split.sizes[:4] == [8, 4, 2, 2]


def test_one_sample_that_does_not_fit_fails_with_a_clear_error(shard_dir: Path) -> None:
    with pytest.raises(DeviceOutOfMemoryError, match=r"sample \S+ of shard 00001 does not fit in cpu memory even alone"):
        list(_engine(_Limited(limit=0)).run([ShardRef("00001", str(shard_dir / "00001.tar"))]))


def test_other_errors_are_not_taken_for_out_of_memory(shard_dir: Path) -> None:
    class Broken(_Limited):
        def __call__(self, pixels):
            self.sizes.append(len(pixels))
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model = Broken(limit=0)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        list(_engine(model).run([ShardRef("00001", str(shard_dir / "00001.tar"))]))
    assert model.sizes == [8]

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus

from conftest import BASIC, VENV_BIN, run_cli
from d2m_assets.recovery import mark_abandoned_runs
from d2m_core.engine import RAGGED, DeviceOutOfMemoryError, Engine
from d2m_core.shards import ShardRef
from d2m_core.synth import make_shards

FEATURES = AssetKey("clip_b32_features")
TIMING_KEYS = {"sample time (s)", "loader time (s)", "timings"}


def _config(path: Path, shards: Path, out: Path, **overrides) -> Path:
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


def _comparable(path: Path) -> bytes | dict:
    """A file's bytes, or for json its content without the wall-clock timings."""
    if path.suffix == ".json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
    return path.read_bytes()


# --- kill -9 in the middle of a shard --------------------------------------------------------------------------


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"d2m run ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_kill_9_mid_shard_leaves_no_partial_file_fails_the_run_and_the_rerun_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = tmp_path / "shards"
    make_shards(shards, shards=3, samples=24, max_side=64)
    settings = {"tars_per_wds": 1, "batch_size": 2}  # one run per shard; a shard takes a few seconds on a CPU
    reference_out, out, home = tmp_path / "reference", tmp_path / "metadata", tmp_path / "home"

    # The uninterrupted run, for comparison (its own instance and folder).
    reference = run_cli(["d2m", "run", "--yml", str(_config(tmp_path / "reference.yml", shards, reference_out, **settings))],
                        {"DAGSTER_HOME": str(tmp_path / "reference_home")}, tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    config = _config(tmp_path / "config.yml", shards, out, **settings)
    log = tmp_path / "killed.log"
    env = os.environ | {"DAGSTER_HOME": str(home), "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        proc = subprocess.Popen([str(VENV_BIN / "d2m"), "run", "--yml", str(config)], env=env, cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
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
        time.sleep(1.5)  # models loaded, batches of shard 00001 going through
        assert not (out / ".d2m" / "clip_b32_features" / "00001.npz").exists(), "shard 00001 finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    # No file a reader could trip on; 00000 complete; nothing of 00001 where DataComp's readers look.
    assert _partial_files(out) == []
    finals = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    assert finals == ["00000.json", "00000.npz", "00000.parquet"]
    leftovers = [n for n in _files(out) if n.endswith(".tmp")]  # only if the kill hit a write; swept below

    # The killed run is left STARTED; mark_abandoned_runs reports it failed; its partition is not materialized.
    assert instance.get_run_by_id(killed_run).status == DagsterRunStatus.STARTED
    assert mark_abandoned_runs(instance) == [killed_run]
    failed = instance.get_run_by_id(killed_run)
    assert failed.status == DagsterRunStatus.FAILURE
    (failure,) = instance.all_logs(killed_run, of_type=DagsterEventType.RUN_FAILURE)
    assert "is gone" in failure.message and str(proc.pid) in failure.message
    planned = {e.dagster_event.partition for e in instance.all_logs(killed_run, of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED)}
    assert "00001" in planned  # planned in a failed run and never materialized: the UI shows it failed
    assert instance.get_materialized_partitions(FEATURES) == {"00000"}
    assert mark_abandoned_runs(instance) == []

    # The rerun (reprocess: false) skips 00000, finishes the rest, sweeps leftovers; outputs match the reference.
    rerun = run_cli(["d2m", "run", "--yml", str(config)], {"DAGSTER_HOME": str(home)}, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 shard(s) already materialized, skipped" in rerun.stdout
    assert instance.get_materialized_partitions(FEATURES) == {"00000", "00001", "00002"}
    files, expected = _files(out), _files(reference_out)
    assert sorted(files) == sorted(expected), leftovers
    assert _partial_files(out) == []
    for name, path in files.items():
        assert _comparable(path) == _comparable(expected[name]), name


# --- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as output_metadata_dir (needs root or CAP_SYS_ADMIN); skipped where mounting is refused."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_the_shard_naming_the_file_and_keeps_earlier_outputs(
    shard_dir: Path, small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2m_assets.runner import run_config_file

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
    (failure,) = [e for e in instance.all_logs(full.failed_runs[0], of_type=DagsterEventType.STEP_FAILURE)]
    error = failure.dagster_event.step_failure_data.error.to_string()
    assert f"cannot write {out}/.d2m/clip_b32_features/00001.npz: No space left on device" in error
    assert {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in _files(out).items()} == before
    assert instance.get_materialized_partitions(FEATURES) == {"00000"}

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
        config = _config(tmp_path / "s3.yml", shard_dir / "00001.tar", "s3://meta/out")  # type: ignore[arg-type]

        done = run_cli(["d2m", "run", "--yml", str(config)], aws, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="meta")["Contents"])
        assert {"out/00001.parquet", "out/00001.npz", "out/00001.json"} <= set(keys)
        objects = b"".join(client.get_object(Bucket="meta", Key=k)["Body"].read() for k in keys)

        server.stop()  # S3 goes away: the next run fails, and its errors must not carry the secret either
        monkeypatch.setenv("D2M_IO_ATTEMPTS", "2")
        monkeypatch.setenv("D2M_IO_BACKOFF_S", "0.1")
        s3fs.S3FileSystem.clear_instance_cache()
        from d2m_assets.runner import run_config_file

        failed = run_config_file(_config(tmp_path / "again.yml", shard_dir / "00001.tar", "s3://meta/out",  # type: ignore[arg-type]
                                         reprocess=True), echo=print)
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    assert not failed.ok
    captured = capfd.readouterr()
    instance = DagsterInstance.get()
    (failure,) = instance.all_logs(failed.failed_runs[0], of_type=DagsterEventType.STEP_FAILURE)
    assert "cannot write s3://meta/out/.d2m/clip_b32_features/00001.npz" in failure.dagster_event.step_failure_data.error.to_string()

    traces = {"stdout": done.stdout, "stderr": done.stderr, "failed run output": captured.out + captured.err,
              "S3 objects": objects.decode("latin-1")}
    for run_id in [*instance.get_run_ids(), failed.failed_runs[0]]:
        for entry in instance.all_logs(run_id):
            traces[f"event {run_id}"] = traces.get(f"event {run_id}", "") + repr(entry)
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
    with caplog.at_level(logging.WARNING, logger="d2m_core.engine"):
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

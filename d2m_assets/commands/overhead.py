"""`d2m bench --stage run-overhead`: what a Dagster run costs around its work, measured on a real launch.

The run is created in a fresh instance (a temporary DAGSTER_HOME with the repo's dagster.yaml) and launched
by that instance's run launcher, as the daemon launches one: d2m's WarmRunLauncher, which hands it to a
run worker started ahead of it (`launch="warm"`, the daemon's steady state: the launcher is warmed up and
its spare is ready first) or starts a new `dagster api execute_run` process for it (`launch="new"`: a
daemon's first run, and every run under Slurm or Kubernetes). The worker loads the code location, executes
the run with the definitions' executor and exits. The timeline comes from the run's event log (run and
step events, and d2m's own INFO lines: model build start and done, first batch) and from this process
(launch, process exit), on the same clock.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from d2m_assets.commands import LAUNCHES
from d2m_core.compute.engine import FIRST_BATCH, MODEL_BUILD_DONE, MODEL_BUILD_START
from d2m_core.reading.shards import ShardRef

REPO = Path(__file__).resolve().parents[2]
ASSET_JOB = "__ASSET_JOB"  # Dagster's implicit job of every asset: runs of asset selections are its subsets
WORKER_START = "Started process for run"  # the run worker's first event: Python and dagster are imported
SPARE_READY_S = 300  # how long a warm launch waits for the spare's imports


def _bench_home(home: Path, launch: str) -> None:
    """The repo's dagster.yaml, its launcher keeping one spare worker (warm) or none (new)."""
    instance_yaml = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text(encoding="utf-8"))
    instance_yaml["run_launcher"]["config"] = {"spares": 1 if launch == "warm" else 0}
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml), encoding="utf-8")


def _bench_yml(yml: Path, shards: Sequence[ShardRef], out: Path, target: Path) -> Path:
    """The user's yml, reading `shards` and writing to `out`, computing every shard (one run for them all)."""
    raw = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
    raw |= {"input_tars": [s.url for s in shards], "output_metadata_dir": str(out), "reprocess": True,
            "tars_per_wds": len(shards)}
    target.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return target


def _timeline(instance: Any, run_id: str) -> dict[str, float]:
    """Run id -> the first time each event or d2m line of the timeline was recorded (Unix seconds)."""
    from dagster import DagsterEventType

    wanted = {DagsterEventType.RUN_START: "run_start", DagsterEventType.STEP_START: "step_start",
              DagsterEventType.STEP_SUCCESS: "step_end", DagsterEventType.STEP_FAILURE: "step_end",
              DagsterEventType.RUN_SUCCESS: "run_end", DagsterEventType.RUN_FAILURE: "run_end"}
    lines = {MODEL_BUILD_START: "model_build_start", MODEL_BUILD_DONE: "model_build_done", FIRST_BATCH: "first_batch"}
    found: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None:
            name = wanted.get(event.event_type)
            if event.event_type == DagsterEventType.ENGINE_EVENT and (event.message or "").startswith(WORKER_START):
                name = "worker_start"
        else:
            name = next((n for line, n in lines.items() if entry.user_message.startswith(line)), None)
        if name is not None and name not in found:
            found[name] = entry.timestamp
    return found


def run_overhead(yml: str | Path, shards: Sequence[ShardRef], config_name: str, launch: str = "warm") -> dict[str, Any]:
    """Launch one run over `shards` (all selected shard assets, their checks) and report where its time went."""
    if launch not in LAUNCHES:
        raise ValueError(f"launch must be one of {LAUNCHES}, not {launch!r}")
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.instance.ref import InstanceRef

    from d2m_assets.datasets import Dataset
    from d2m_assets.definitions import build_definitions
    from d2m_assets.commands.runner import RANGE_END, RANGE_START
    from d2m_assets.yml_paths import record_base_dir
    from d2m_core import catalog
    from d2m_core.bench import machine_load
    from d2m_core.config import load_config
    from d2m_core.selection import selected_assets, shard_stats

    yml = Path(yml).resolve()
    with tempfile.TemporaryDirectory(prefix="d2m-run-overhead-") as scratch:
        root = Path(scratch)
        home = root / "home"
        home.mkdir()
        _bench_home(home, launch)
        config_file = _bench_yml(yml, shards, root / "out", root / yml.name)
        env = {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(config_file), "D2M_AUTOMATION": "off"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            record_base_dir(config_file, Path.cwd())  # the yml's other relative paths resolve as the user's do
            config = load_config(config_file, base_dir=Path.cwd())
            dataset = Dataset(name=config.dataset_name, config_path=str(config_file))
            keys = [dataset.key(a) for a in selected_assets(config) if a != catalog.REFERENCE_ASSET]
            instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
            stems = [s.stem for s in shards]
            instance.add_dynamic_partitions(dataset.partitions_name, stems)
            repository = ReconstructableRepository.for_module("d2m_assets", "defs", working_directory=str(REPO))
            job = repository.get_reconstructable_job(ASSET_JOB).get_subset(asset_selection=frozenset(keys))
            # The run worker loads `d2m_assets.defs` from $D2M_CONFIG; here the same definitions are built from the
            # file (this process may hold another config's `defs` already).
            definition = build_definitions(config_file).resolve_job_def(ASSET_JOB).get_subset(asset_selection=set(keys))
            tags = {"dagster/partition": stems[0]} if len(stems) == 1 else {RANGE_START: stems[0], RANGE_END: stems[-1]}
            run = instance.create_run_for_job(definition, run_config={}, tags=tags, asset_selection=frozenset(keys),
                                              job_code_origin=job.get_python_origin())
            launcher = instance.run_launcher
            try:
                if launch == "warm" and not launcher.warm_up(job.get_python_origin().executable_path,
                                                             timeout=SPARE_READY_S):
                    raise RuntimeError(f"the launcher's spare run worker was not ready in {SPARE_READY_S} s")
                launched = time.time()
                instance.launch_run(run.run_id, workspace=None)
                launcher.join(timeout=24 * 3600)
                exited = time.time()
                times = _timeline(instance, run.run_id)
                status = instance.get_run_by_id(run.run_id).status
                if status != DagsterRunStatus.SUCCESS:
                    raise RuntimeError(f"the benchmark run ended {status.value}: its worker's output is above")
                samples = sum(shard_stats(config, stem).samples_written for stem in stems)
            finally:
                instance.dispose()  # ends the spare the launcher started after this run
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def since_launch(name: str) -> float:
        return round(times[name] - launched, 3)

    return {"stage": "run-overhead", "config": config_name, "launch": launch, "executor": definition.executor_def.name,
            "shards": len(stems), "samples": samples,
            "launch_to_worker_start_s": since_launch("worker_start"),
            "launch_to_run_start_s": since_launch("run_start"),
            "launch_to_step_start_s": since_launch("step_start"),
            "launch_to_model_build_start_s": since_launch("model_build_start"),
            "model_build_s": round(times["model_build_done"] - times["model_build_start"], 3),
            "launch_to_first_batch_s": since_launch("first_batch"),
            "work_s": round(times["step_end"] - times["first_batch"], 3),
            "teardown_s": round(exited - times["step_end"], 3),
            "step_end_to_run_end_s": round(times["run_end"] - times["step_end"], 3),
            "launch_to_exit_s": round(exited - launched, 3)} | machine_load()

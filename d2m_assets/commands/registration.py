"""`d2m register`: a yml's shards as partitions of the instance at $DAGSTER_HOME, without running them
(the dagster CLI has no command for it); and Dagster's instance errors said in one sentence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from d2m_assets.datasets import Dataset
from d2m_assets.commands.runner import ensure_instance
from d2m_assets.yml_paths import record_base_dir
from d2m_core.config import load_config
from d2m_core.preflight import check_inputs


class InstanceError(RuntimeError):
    """The Dagster instance d2m should use is not set up; the message says what to set."""


@dataclass(frozen=True)
class Registered:
    home: str
    partitions: str
    stems: list[str]
    added: int


def register_config_shards(yml: str | Path) -> Registered:
    """Add every tar of the yml's input_tars as a partition (idempotent); DAGSTER_HOME must be set, since
    `dagster asset materialize` without it uses a temporary instance that would not see them."""
    if not os.environ.get("DAGSTER_HOME"):
        raise InstanceError("DAGSTER_HOME is not set: set it to the instance folder that `dagster asset materialize`, "
                            "the daemon and the UI use (e.g. export DAGSTER_HOME=$PWD/.dagster_home)")
    config = load_config(yml)
    refs, _ = check_inputs(config)  # only tars that exist become partitions
    stems = [ref.stem for ref in refs]
    dataset = Dataset(name=config.dataset_name, config_path=str(Path(yml).resolve()))
    instance = ensure_instance()
    record_base_dir(yml)
    before = set(instance.get_dynamic_partitions(dataset.partitions_name))
    instance.add_dynamic_partitions(dataset.partitions_name, stems)
    return Registered(os.environ["DAGSTER_HOME"], dataset.partitions_name, stems, len(set(stems) - before))


def dagster_error_message(err: BaseException) -> str | None:
    """One sentence for the Dagster errors a user causes (no instance, an unregistered partition), else None."""
    from dagster._core.errors import DagsterHomeNotSetError, DagsterUnknownPartitionError

    if isinstance(err, DagsterHomeNotSetError):
        return f"the Dagster instance is not usable: {str(err).splitlines()[0]} (set DAGSTER_HOME to a folder)"
    if isinstance(err, DagsterUnknownPartitionError):
        return (f"{str(err).splitlines()[0]}: the shard is not registered in the instance at "
                f"{os.environ.get('DAGSTER_HOME', '(DAGSTER_HOME unset)')}; run `d2m register --yml CFG` first")
    return None

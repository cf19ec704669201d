"""What d2m's run launchers share: configuration from dagster.yaml through a pydantic Config, and the run
worker's command (`dagster api execute_run`, run by the code location's own Python)."""

from __future__ import annotations

from typing import Any, ClassVar

from dagster import Config
from dagster._core.launcher import RunLauncher
from dagster._core.origin import get_python_environment_entry_point
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value


class ConfiguredRunLauncher(RunLauncher, ConfigurableClass):
    """A RunLauncher whose `run_launcher.config` in dagster.yaml is validated by `config_class`."""

    config_class: ClassVar[type[Config]]

    def __init__(self, inst_data: ConfigurableClassData | None = None, **config: Any) -> None:
        self._inst_data = inst_data
        self.config = self.config_class(**config)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls):
        return cls.config_class.to_fields_dict()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict) -> ConfiguredRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def execute_run_argument(self, run: DagsterRun) -> str:
        """The argument of `dagster api execute_run` for `run` (the worker exits 1 when the run fails)."""
        return serialize_value(ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id,
                                              instance_ref=self._instance.get_ref(), set_exit_code_on_failure=True))


def execute_run_command(executable: str, argument: str) -> list[str]:
    """The run worker's command with the code location's Python (the PATH need not hold the venv's `dagster`)."""
    return [*get_python_environment_entry_point(executable), "api", "execute_run", argument]

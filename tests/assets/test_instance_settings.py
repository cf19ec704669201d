"""An instance made before deploy/dagster.yaml said `python_log_level: INFO` is named, with the line to change."""

import logging
from pathlib import Path

import pytest

from d2m_assets.commands.runner import REPO_DAGSTER_YAML, ensure_instance, log_level_hint


def test_an_instance_that_hides_progress_lines_is_named_with_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    home.mkdir()
    old = REPO_DAGSTER_YAML.read_text().replace("python_log_level: INFO", "python_log_level: WARNING")
    (home / "dagster.yaml").write_text(old)
    line = 1 + [row.strip().startswith("python_log_level:") for row in old.splitlines()].index(True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with caplog.at_level(logging.WARNING, logger="d2m_assets.commands.runner"):
        ensure_instance(echo=lambda _: None).dispose()
    assert [r.getMessage() for r in caplog.records if r.name == "d2m_assets.commands.runner"] == [
        f"{home / 'dagster.yaml'} line {line} sets python_log_level: WARNING, which keeps d2m's progress lines out of "
        "the run logs in the Dagster UI: change it to 'python_log_level: INFO' (as deploy/dagster.yaml has it) and "
        "restart dagster dev / the daemon"]
    for name in ("dagster.yaml", "dagster-postgres.yaml", "dagster-slurm.yaml"):  # every shipped template is fine
        assert log_level_hint(REPO_DAGSTER_YAML.parent / name) is None
    quiet = tmp_path / "absent.yaml"
    quiet.write_text("telemetry:\n  enabled: false\n")  # no python_log_level: Dagster passes every level
    assert log_level_hint(quiet) is None

"""A yml's relative paths resolve the same in every process: recorded by `d2m run`/`d2m register`."""

import logging
from pathlib import Path

import pytest

from d2m_assets.yml_paths import base_dir_for, load_recorded_config, record_base_dir

SEED_STYLE = ("models: [oai-clip-vit-b32]\nnworkers: 1\nbatch_size: 2\ndevice: cpu\n"
              "input_tars: ./tests/tar_test_files/00001308.tar\noutput_metadata_dir: ./tests/test_out\n")


def test_recorded_folder_wins_over_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    seed_repo, daemon_cwd = tmp_path / "seed", tmp_path / "daemon"
    (seed_repo / "tests" / "ymls").mkdir(parents=True)
    daemon_cwd.mkdir()
    yml = seed_repo / "tests" / "ymls" / "test_local.yml"
    yml.write_text(SEED_STYLE)
    monkeypatch.chdir(seed_repo)
    record_base_dir("tests/ymls/test_local.yml")  # what `d2m register` / `d2m run` do, from the seed's root
    monkeypatch.chdir(daemon_cwd)
    config = load_recorded_config(yml)
    assert config.input_tars == str(seed_repo / "tests" / "tar_test_files" / "00001308.tar")
    assert config.output_metadata_dir == str(seed_repo / "tests" / "test_out")


def test_unrecorded_relative_yml_resolves_against_cwd_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    yml = tmp_path / "c.yml"
    yml.write_text(SEED_STYLE)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert base_dir_for(yml) == tmp_path
    assert "input_tars, output_metadata_dir" in caplog.text and "d2m register" in caplog.text

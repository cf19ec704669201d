from pathlib import Path

import pytest

from d2m_core.config import ConfigError, load_config, parse_config

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.mark.parametrize("name", ["seed_basic.yml", "seed_datacomp.yml"])
def test_seed_ymls_load_unchanged(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)  # relative paths resolve against the working directory, as in the seed
    config = load_config(DATA / name)
    assert config.models[0] == "oai-clip-vit-b32"
    assert config.device == 0 and config.batch_size == 512 and config.nworkers == 2
    assert config.reprocess is True and config.custom_pypath is None
    assert config.input_tars == str(DATA / "path/to/my/tars/000057{17..19}.tar")
    assert config.additional_fields == ["uid", "url", "caption", "original_width", "original_height", "sha256"]


def _minimal(**extra):
    return {"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 2, "device": "cpu",
            "input_tars": "/x/00000.tar", "output_metadata_dir": "/out"} | extra


def test_every_seed_optional_field_is_accepted() -> None:
    config = parse_config(_minimal(postprocess_columns=None, postprocess_features=["oai-clip-vit-b32-image"],
                                   additional_fields=["uid"], custom_pypath=None, reprocess=False,
                                   use_datacomp_keys=True, tars_per_wds=3, logging=False, warn_and_continue=True))
    assert config.postprocess_columns == [] and config.tars_per_wds == 3 and config.use_datacomp_keys
    assert config.reprocess is False


def test_absent_reprocess_means_false_and_artifacts_default() -> None:
    config = parse_config(_minimal())
    assert config.reprocess is False
    assert config.artifacts_root == "/out/.d2m"


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown field: colour"):
        parse_config(_minimal(colour="blue"))


def test_missing_field_is_named() -> None:
    raw = _minimal()
    del raw["batch_size"]
    with pytest.raises(ConfigError, match="missing required yml field: batch_size"):
        parse_config(raw)


def test_bad_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config(_minimal(batch_size=0))


def test_yaml_objects_are_not_constructed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yml"
    path.write_text("models: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the seed: its tests/ymls/*.yml, run from its repo root, name ./tests/tar_test_files/..."""
    (tmp_path / "tests" / "ymls").mkdir(parents=True)
    path = tmp_path / "tests" / "ymls" / "c.yml"
    path.write_text("models: [oai-clip-vit-b32]\nnworkers: 1\nbatch_size: 2\ndevice: cpu\n"
                    "input_tars: ['./tests/tar_test_files/a.tar', 's3://b/c.tar']\noutput_metadata_dir: ./tests/test_out\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("tests/ymls/c.yml")
    assert config.input_tars == [str(tmp_path / "tests" / "tar_test_files" / "a.tar"), "s3://b/c.tar"]
    assert config.output_metadata_dir == str(tmp_path / "tests" / "test_out")
    assert load_config(path, base_dir=tmp_path / "elsewhere").output_metadata_dir == str(tmp_path / "elsewhere" / "tests" / "test_out")


@pytest.mark.parametrize(("written", "value"), [("off", "off"), ("false", "off"), ("no", "off"), ("on", "on"),
                                                ("true", "on"), ("auto", "auto"), ("'off'", "off")])
def test_on_off_fields_accept_yaml_booleans(written: str, value: str) -> None:
    """`gpu_decode: off`, as the README writes it, is YAML's false."""
    import yaml

    assert parse_config(_minimal(gpu_decode=yaml.safe_load(f"v: {written}")["v"])).gpu_decode == value
    assert parse_config(_minimal(reprocess=yaml.safe_load("v: on")["v"])).reprocess is True


def test_dataset_name_explicit_or_from_the_output_location() -> None:
    assert parse_config(_minimal(dataset="laion_a")).dataset_name == "laion_a"
    a, b = (parse_config(_minimal(output_metadata_dir=d)).dataset_name for d in ("/data/a/meta-data", "/data/b/meta-data"))
    assert a.startswith("meta_data_") and b.startswith("meta_data_") and a != b and len(a) == len("meta_data_") + 6
    assert parse_config(_minimal(output_metadata_dir="/data/a/meta-data/")).dataset_name == a
    assert parse_config(_minimal(output_metadata_dir="s3://bucket")).dataset_name.startswith("bucket_")
    for bad in ("has space", "a/b", "x__y", ""):
        with pytest.raises(ConfigError, match="dataset"):
            parse_config(_minimal(dataset=bad))


def test_reader_processes_auto_uses_the_cores_only_where_readers_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    from d2m_core.compute.pipeline import reader_processes

    base = {"models": ["oai-clip-vit-b32"], "nworkers": 1, "batch_size": 4, "device": "cpu",
            "input_tars": "x/*.tar", "output_metadata_dir": "/tmp/out"}
    assert parse_config(base).reader_processes == "auto"
    assert parse_config(base | {"reader_processes": 6}).reader_processes == 6
    for bad in (0, "many"):
        with pytest.raises(ConfigError, match="reader_processes"):
            parse_config(base | {"reader_processes": bad})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert reader_processes("auto", decode=False) == 2  # reading alone keeps up
    assert reader_processes("auto", decode=True) == 12  # every core but 4
    assert reader_processes(6, decode=True) == 6
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert reader_processes("auto", decode=True) == 2

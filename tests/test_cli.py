"""End to end through the commands users type: `d2m run` and `dagster asset materialize`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import hold_plugin, run_cli, tar_samples


def test_d2m_run_outputs_and_reprocess(shard_dir: Path, write_config, tmp_path: Path) -> None:
    env = {"DAGSTER_HOME": str(tmp_path / "home")}
    config = write_config(shard_dir, tars_per_wds=2)
    first = run_cli(["d2m", "run", "--yml", str(config)], env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "shards done 2/2" in first.stdout and "samples/s" in first.stdout
    out = tmp_path / "metadata"
    for stem in ("00000", "00001"):
        df = pd.read_parquet(out / f"{stem}.parquet")
        npz = np.load(out / f"{stem}.npz")
        log = json.loads((out / f"{stem}.json").read_text())
        samples = [s for s in tar_samples(shard_dir / f"{stem}.tar") if not (stem == "00000" and s["key"] == "000000004")]
        assert len(df) == len(samples) == log["number of samples"] == log["samples_written"]
        assert list(df.columns) == ["oai-clip-vit-b32-score", "uid", "url", "caption", "original_width", "original_height", "sha256"]
        for field in ("uid", "url", "caption", "original_width", "original_height", "sha256"):
            assert df[field].tolist() == [s["json"][field] for s in samples]  # tar order, json values and types
        img, txt = npz["oai-clip-vit-b32-image"], npz["oai-clip-vit-b32-text"]
        assert img.dtype == np.float32 and img.shape == (len(df), 512) and txt.shape == (len(df), 512)
        assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
        assert np.allclose(df["oai-clip-vit-b32-score"].to_numpy(), (img * txt).sum(1), atol=1e-6)
        assert log["weights"]["oai-clip-vit-b32"]["kind"] == "random"
    failed = json.loads((out / "00000.json").read_text())
    assert failed["samples_read"] == 9 and failed["samples_failed"] == 1
    assert failed["failures"][0]["key"] == "000000004" and failed["failures"][0]["uid"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = run_cli(["d2m", "run", "--yml", str(config)], env, tmp_path)
    assert again.returncode == 0 and "already processed" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes

    forced = run_cli(["d2m", "run", "--yml", str(write_config(shard_dir, tars_per_wds=2, reprocess=True))], env, tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (out / "00001.npz").stat().st_mtime_ns > mtimes["00001.npz"]


def test_d2m_run_bad_config_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [oai-clip-vit-b32]\nnworkers: 1\nbatch_size: 1\ndevice: cpu\ninput_tars: x.tar\n")
    result = run_cli(["d2m", "run", "--yml", str(bad)], {"DAGSTER_HOME": str(tmp_path / "h")}, tmp_path)
    assert result.returncode == 2 and "missing required yml field: output_metadata_dir" in result.stderr


def test_dagster_cli_materializes_a_partition(shard_dir: Path, write_config, tmp_path: Path) -> None:
    config = write_config(shard_dir, dataset="pool")
    home = tmp_path / "home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home), "D2M_CONFIG": str(config)}
    unset = run_cli(["d2m", "register", "--yml", str(config)], {"DAGSTER_HOME": ""}, tmp_path)
    assert unset.returncode == 2 and unset.stderr.startswith("d2m: error: DAGSTER_HOME is not set")
    assert len(unset.stderr.splitlines()) == 1
    registered = run_cli(["d2m", "register", "--yml", str(config)], env, tmp_path)  # the README's CI recipe
    assert registered.returncode == 0 and "2 shard(s)" in registered.stdout and "(2 new)" in registered.stdout
    result = run_cli(["dagster", "asset", "materialize", "-m", "d2m_assets", "--select",
                      "pool/clip_b32_features,pool/clip_b32_scores", "--partition", "00001"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = np.load(tmp_path / "metadata" / ".d2m" / "clip_b32_scores" / "00001.npz")["score"]
    features = np.load(tmp_path / "metadata" / "00001.npz")  # each feature stored once: in DataComp's npz
    assert not (tmp_path / "metadata" / ".d2m" / "clip_b32_features").exists()
    image, text = features["oai-clip-vit-b32-image"], features["oai-clip-vit-b32-text"]
    assert scores.shape == (9,) and np.allclose(scores, (image * text).sum(1))


def test_d2m_weights_lists_and_verifies(tmp_path: Path) -> None:
    listing = run_cli(["d2m", "weights", "--dir", str(tmp_path)], {}, tmp_path)
    assert listing.returncode == 0
    assert f"{tmp_path}/ViT-B-32.pt" in listing.stdout and "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af" in listing.stdout
    for name in ("ViT-L-14.pt", "nsfw_torch.pt", "multilingual_debiased-0b549669.ckpt", "isc_ft_v107.pth.tar",
                 "scrfd_10g_bnkps.onnx", "eval_dedup_embeddings.pt", "xlm-roberta-base/",
                 "lid.176.bin", "imagenet21k_wordnet_ids.txt", "in1k_clip_vit_l14_4.pt", "small_centroids_l14.pt"):
        assert name in listing.stdout
    (tmp_path / "ViT-B-32.pt").write_bytes(b"corrupt")
    verify = run_cli(["d2m", "weights", "verify", "--dir", str(tmp_path)], {"D2M_RANDOM_WEIGHTS": ""}, tmp_path)
    assert verify.returncode == 1
    assert "expected 40d36571" in verify.stdout and verify.stdout.count("MISSING") == 7


HEAVY = ("torch", "dagster", "open_clip", "pandas", "pyarrow")


def _in_process(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run d2m's main in a fresh interpreter and print which heavy libraries it imported."""
    code = ("import sys\nfrom d2m_assets.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('heavy:', [m for m in %r if m in sys.modules])\nsys.exit(rc)" % (HEAVY,))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=os.environ | (env or {}))


def test_missing_weights_stop_d2m_run_before_any_shard_and_any_heavy_import(shard_dir: Path, write_config,
                                                                            tmp_path: Path) -> None:
    config = write_config(shard_dir, weights_dir=str(tmp_path / "weights"))
    result = _in_process(["run", "--yml", str(config)], tmp_path,
                         {"DAGSTER_HOME": str(tmp_path / "h"), "D2M_RANDOM_WEIGHTS": ""})
    assert result.returncode == 2 and "heavy: []" in result.stdout  # the file check needs no torch
    assert result.stderr.startswith("d2m: error: oai-clip-vit-b32: weights not found: put "
                                    f"{tmp_path / 'weights' / 'ViT-B-32.pt'} or ")
    assert "`d2m weights download --yml <your yml>` fetches every missing file" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "metadata").exists() and not (tmp_path / "h").exists()


def test_help_and_config_errors_import_no_heavy_library(tmp_path: Path) -> None:
    top = _in_process(["--help"], tmp_path)
    assert top.returncode == 0 and "heavy: []" in top.stdout and "register" in top.stdout
    run_help = _in_process(["run", "--help"], tmp_path)
    assert run_help.returncode == 0 and "heavy: []" in run_help.stdout
    for words in ("DAGSTER_HOME", "D2M_CONFIG", "D2M_WEIGHTS_DIR", "D2M_RANDOM_WEIGHTS", "reprocess: false"):
        assert words in run_help.stdout
    make_help = _in_process(["make-shards", "--help"], tmp_path)
    assert "(default: 32)" in make_help.stdout and "(default: 95)" in make_help.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [oai-clip-vit-b32]\nnworkers: 1\nbatch_size: 1\ndevice: cpu\ninput_tars: x.tar\ngpu_decode: off\n")
    error = _in_process(["run", "--yml", str(bad)], tmp_path)
    assert error.returncode == 2 and "heavy: []" in error.stdout
    verify = _in_process(["weights", "verify", "--dir", str(tmp_path)], tmp_path, {"D2M_RANDOM_WEIGHTS": ""})
    assert verify.returncode == 1 and "heavy: []" in verify.stdout and verify.stdout.count("MISSING") == 7
    assert error.stderr == "d2m: error: missing required yml field: output_metadata_dir\n"


def test_d2m_run_shows_progress_and_a_summary_off_a_terminal(shard_dir: Path, write_config, tmp_path: Path) -> None:
    """Not a terminal: progress lines at the interval, the summary; the run log holds INFO progress lines."""
    home = tmp_path / "home"
    config = write_config(shard_dir, tars_per_wds=2, batch_size=4)
    result = run_cli(["d2m", "run", "--yml", str(config), "--progress-every", "0.2"], {"DAGSTER_HOME": str(home)}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "progress: " in result.stdout and "/2 shards done" in result.stdout
    assert "d2m run: 2 shard(s) processed, 0 skipped (already materialized), 0 failed; 17 samples" in result.stdout
    assert "Model initialized randomly" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings and len(warnings) == len(set(warnings))  # each warning once
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        run = instance.get_runs(limit=1)[0]
        infos = [e.user_message for e in instance.all_logs(run.run_id) if e.level == 20 and "shard 0000" in e.user_message]
    finally:
        del os.environ["DAGSTER_HOME"]
    assert any("shard 00001 done" in m and "samples/s" in m for m in infos), infos


def test_ctrl_c_during_a_run_is_one_line_and_status_130(shard_dir: Path, write_config, tmp_path: Path) -> None:
    """Ctrl-C while a shard runs (Dagster turns it into a failed run): `d2m: interrupted`, exit 130, no abort."""
    import signal

    plugin = hold_plugin(tmp_path)
    plugin.hold.touch()
    started = plugin.started
    config = write_config(shard_dir, models=["hold"], custom_pypath=str(plugin.path), postprocess_columns=["hold-red"],
                          postprocess_features=[], additional_fields=["uid"])
    env = os.environ | {"DAGSTER_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "d2m"), "run", "--yml", str(config)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        plugin.hold.unlink()  # the model returns; the interrupted run stops
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == ("d2m: interrupted (shards already written stay materialized: run it again to "
                                    "continue)")
    assert "terminate called" not in err, err
    # Dagster's compute-log watcher processes share the process group and print their own KeyboardInterrupt.
    assert all("watch_orphans.py" in line for line in err.splitlines() if line.startswith('  File "')), err
    assert "d2m run:" not in out  # no summary claiming failed shards

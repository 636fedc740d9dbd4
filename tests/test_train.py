import csv
import json

import pytest

from tests.conftest import ROOT, TINY, run_cli, tiny_config, wandb_offline_summary
from training.config import load_config
from training.run import train


def test_tiny_model_overfits_tiny_text(tmp_path):
    text = tmp_path / "poem.txt"
    text.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 8)
    summary = train(tiny_config(text, tmp_path / "run", "--trainer.max_epochs", "40", "--stream.enabled", "false"))
    # The first pass (the code) is near uniform; by the 40th epoch the model knows the text.
    assert summary["code/data_bpb"] > 3.0
    assert summary["train/last_epoch_bpb"] < 0.5 * summary["code/data_bpb"]


def test_train_cli_logs_wandb_csv_and_summary(text_file, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("--config", TINY, "--data.path", text_file, "--run_dir", run_dir,
                "--logging.wandb", "true", "--logging.plot", "true", "--logging.progress_bar", "false")
    assert r.returncode == 0, r.stderr
    assert "final train/loss" in r.stdout and "train/bpb" in r.stdout
    assert f"run directory: {run_dir}" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("train/loss", "train/bpb", "code/total_bits", "code/bpb", "code/stream_bits", "baseline/xz_bpb"):
        assert key in summary
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert any(row.get("train/bpb") for row in rows)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B must run offline, inside the run directory"
    wandb_summary = wandb_offline_summary(runs[0])
    assert "train/bpb" in wandb_summary and "code/bpb" in wandb_summary
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000


def test_bad_config_key_is_named_without_traceback(text_file, tmp_path):
    r = run_cli("--config", TINY, "--data.path", text_file, "--model.n_layers", "2", "--run_dir", tmp_path / "r")
    assert r.returncode == 2
    assert "unknown config key model.n_layers (did you mean model.n_layer?)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_bad_config_value_is_named(text_file, tmp_path):
    r = run_cli("--config", TINY, "--data.path", text_file, "--trainer.max_steps", "many")
    assert r.returncode == 2 and "trainer.max_steps: expected an integer, got 'many'" in r.stderr
    r = run_cli("--config", TINY, "--data.path", text_file, "--model.head", "cosine")
    assert r.returncode == 2 and "model.head: 'cosine' is not one of 'linear', 'norm'" in r.stderr


def test_missing_and_empty_data_files_fail_clearly(tmp_path):
    r = run_cli("--config", TINY, "--data.path", tmp_path / "nope.txt", "--run_dir", tmp_path / "r")
    assert r.returncode == 2 and "file not found" in r.stderr and "nope.txt" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()
    (tmp_path / "empty.txt").write_bytes(b"")
    r = run_cli("--config", TINY, "--data.path", tmp_path / "empty.txt")
    assert r.returncode == 2 and "is empty" in r.stderr


TRAINING_CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if p.name != "compare.yaml"]  # that one is a sweep


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_loads_and_validates(path):
    assert load_config(path).name == path.stem

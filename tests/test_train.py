import csv
import json
import re

import pytest

from prequel.alice.session import train
from prequel.checks.settings import Config, ConfigError, load_config
from prequel.cli import commands as cli
from prequel.cli.keys_help import describe_keys
from tests.helpers import ROOT, TINY, run_cli, tiny_config, wandb_offline_summary


def test_tiny_model_overfits_tiny_text(tmp_path):
    text = tmp_path / "poem.txt"
    text.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 8)
    summary = train(tiny_config(text, tmp_path / "run", "--trainer.max_epochs", "40", "--stream.enabled", "false"))
    # The first pass (the code) is near uniform; by the 40th epoch the model knows the text.
    assert summary["code/data_bpb"] > 3.0
    assert summary["train/last_epoch_bpb"] < 0.5 * summary["code/data_bpb"]


def test_train_cli_logs_wandb_csv_and_summary(text_file, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(
        "--config",
        TINY,
        "--data.path",
        text_file,
        "--run_dir",
        run_dir,
        "--logging.wandb",
        "true",
        "--logging.plot",
        "true",
        "--logging.progress_bar",
        "false",
    )
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


TRAINING_CONFIGS = [
    p for p in sorted((ROOT / "configs").rglob("*.yaml")) if p.name != "compare.yaml"
]  # that one is a sweep


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_loads_and_validates(path):
    assert load_config(path).name == path.stem


# --- the command line: one table of commands, every config key in --help ----------------------


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal: compare words


def test_help_lists_the_commands_and_every_config_key(capsys):
    text = _help(capsys, "--help")
    assert "With no command, prequel trains." in text
    for name, command in cli.COMMANDS.items():
        assert f"{name} {command.summary}" in text
    unbroken = re.sub(r"-\s+", "-", text)  # argparse wraps lines after hyphens too (comma-separated)
    for key, type_text, default, meaning in describe_keys(Config):
        assert re.sub(r"-\s+", "-", " ".join(f"--{key} {type_text} {meaning}".split())) in unbroken, key
        assert f"default: {default}" in text, key
        assert meaning, f"{key} has no comment in training/config.py or models/gpt.py for --help"
    assert (
        "--data.batch_size int > 0 sequences per optimizer micro-step (global, across processes) (default: 8)" in text
    )
    assert "--trainer.kernels {native, portable} native = the CPU's fastest kernels" in text  # a comment above
    assert "--model.vocab_size" not in text  # derived from the tokenizer, not settable
    assert _help(capsys, "train", "--help") == text
    assert "--budget.bytes int | null" in _help(capsys, "compare", "--help")


def test_flags_take_dashes_and_their_old_underscore_spellings():
    compress = (
        cli.COMMANDS["compress"]
        .parser()
        .parse_args(
            [
                "--ckpt",
                "run",
                "in",
                "out",
                "--chunk_size",
                "16",
                "--batch-chunks=4",
                "--top_k=3",
                "--kernels",
                "portable",
            ]
        )
    )
    assert (compress.chunk_size, compress.batch_chunks, compress.top_k, compress.kernels) == (16, 4, 3, "portable")
    for spelling in ("--allow-env-mismatch", "--allow_env_mismatch"):
        assert cli.COMMANDS["verify"].parser().parse_args(["run", spelling]).allow_env_mismatch
    args, overrides = cli.COMMANDS["compare"].parser().parse_known_args(["--from_runs", "a", "b", "--sweep_dir", "c"])
    assert args.from_runs == ["a", "b"] and overrides == ["--sweep_dir", "c"]  # a sweep key keeps its YAML spelling


def test_a_misspelt_command_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["verfy", "runs/x"])
    assert e.value.code == 2 and "unknown command 'verfy' (did you mean verify?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.ngram_order", "7", "model.ngram_order: must be in 0..6 (0 = off), got 7"),
        ("model.dropout", "1.0", "model.dropout: must be in [0, 1), got 1.0"),
        ("trainer.max_steps", "0", "trainer.max_steps: must be -1 or > 0, got 0"),
        ("data.batch_size", "0", "data.batch_size: must be > 0, got 0"),
        ("optim.weight_decay", "-1", "optim.weight_decay: must be >= 0, got -1"),
    ],
)
def test_each_limit_is_checked_with_its_field(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, [f"--{key}", value])

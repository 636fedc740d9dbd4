import csv
import json

import pytest
import yaml

import train as cli
from tests.helpers import TINY, run_cli
from tools.compare import Budget, Sweep, parse_sweep, run_sweep, size_config
from training.config import ConfigError

FAST = ["--stream.enabled", "false", "--logging.wandb", "false", "--logging.progress_bar", "false",
        "--trainer.num_threads", "1"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_size_sweep_end_to_end(text_file, tmp_path):
    spec = tmp_path / "compare.yaml"
    spec.write_text(yaml.safe_dump({"base": str(TINY), "sizes": ["nano", "micro"], "budget": {"bytes": 3000}}))
    sweep_dir = tmp_path / "sweep"
    r = run_cli("compare", "--config", spec, "--data.path", text_file, "--sweep_dir", sweep_dir, *FAST)
    assert r.returncode == 0, r.stderr
    assert "[compare 1/2] nano" in r.stdout and "[compare 2/2] micro" in r.stdout and "ETA" in r.stdout
    for name in ("comparison.md", "comparison.csv", "loss_curves.png", "code_vs_params.png"):
        assert (sweep_dir / name).stat().st_size > 500, name

    rows = _rows(sweep_dir / "comparison.csv")
    assert [row["size"] for row in rows] == ["nano", "micro", "gzip -9", "bzip2 -9", "xz -9e", "uniform S0"]
    summaries = [json.loads((sweep_dir / size / "summary.json").read_text()) for size in ("nano", "micro")]
    for row, summary in zip(rows, summaries):
        assert int(row["params"]) == summary["model/params"]
        assert float(row["total_bits"]) == summary["code/total_bits"]  # each row is that run's own code length
        assert int(row["bytes"]) == summary["data/bytes"] == 3000 and row["complete"] == "True"
    assert int(rows[0]["params"]) < int(rows[1]["params"])
    assert float(rows[4]["bpb"]) == summaries[0]["baseline/xz_bpb"] == summaries[1]["baseline/xz_bpb"]
    md = (sweep_dir / "comparison.md").read_text()
    assert "first 3,000 bytes" in md and "| nano | " in md and "| micro | " in md and "| xz -9e |" in md

    # Reading the finished runs gives the same table, without training (the flag's old spelling works too).
    again = tmp_path / "again"
    assert cli.main(["compare", "--from_runs", str(sweep_dir / "nano"), str(sweep_dir / "micro"),
                     "--sweep_dir", str(again)]) == 0
    assert _rows(again / "comparison.csv") == rows


def test_wall_clock_budget_stops_runs_and_says_so(text_file, tmp_path):
    overrides = {"data": {"path": str(text_file)}, "stream": {"enabled": False}, "logging": {"wandb": False,
                 "progress_bar": False, "plot": False}, "trainer": {"num_threads": 1}}
    sweep = Sweep(base=str(TINY), sizes=("nano",), budget=Budget(seconds=1e-6), sweep_dir=str(tmp_path / "sweep"))
    sweep_dir = run_sweep(sweep, overrides)
    (row, *_) = _rows(sweep_dir / "comparison.csv")
    assert row["complete"] == "False" and int(row["tokens"]) == 4 * 32  # stopped after its first batch
    assert json.loads((sweep_dir / "nano" / "compare_run.json").read_text())["stopped_by_clock"]
    assert "wall clock: each run stops after 1e-06 s" in (sweep_dir / "comparison.md").read_text()


def test_sweep_and_preset_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key budget.tokens"):
        parse_sweep({"base": "configs/small.yaml", "budget": {"tokens": 1000}}, "compare.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key size \(did you mean sizes\?\)"):
        parse_sweep({"size": ["nano"]}, "compare.yaml")
    with pytest.raises(ConfigError, match=r"budget.bytes: must be > 0 or null, got -5"):
        parse_sweep({"budget": {"bytes": -5}}, "compare.yaml")
    with pytest.raises(ConfigError, match=r"budget.bytes: expected an integer, got 'lots'"):
        parse_sweep({"budget": {"bytes": "lots"}}, "compare.yaml")
    preset = tmp_path / "wide.yaml"
    preset.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"wide.yaml.*unknown config key model.n_layers \(did you mean model.n_l"):
        size_config(Sweep(base=str(TINY)), str(preset), {}, tmp_path, None)
    config = size_config(Sweep(base=str(TINY), group="g"), "nano", {}, tmp_path / "sw", None)
    assert (config.name, config.run_dir, config.logging.wandb_group) == ("nano", str(tmp_path / "sw" / "nano"), "g")

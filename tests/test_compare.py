import csv
import json

import pytest
import yaml

from prequel.checks.settings import ConfigError
from prequel.cli import commands as cli
from prequel.reports.prefix import FRACTIONS, catch_up, prefix_rows
from prequel.reports.sweep import Budget, Sweep, parse_sweep, run_sweep, size_config
from tests.helpers import TINY, run_cli

FAST = [
    "--stream.enabled",
    "false",
    "--logging.wandb",
    "false",
    "--logging.progress_bar",
    "false",
    "--trainer.num_threads",
    "1",
]


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

    # Prefix code lengths: each is the partial sum of that run's own curve up to its prefix.
    prefixes = _rows(sweep_dir / "prefixes.csv")
    assert [(r["size"], float(r["fraction"])) for r in prefixes] == [
        (s, f) for f in FRACTIONS for s in ("nano", "micro")
    ]
    for size, summary in zip(("nano", "micro"), summaries):
        curve = [(int(r["tokens_seen"]), float(r["bits"])) for r in _rows(sweep_dir / size / "curve.csv")]
        for r in (r for r in prefixes if r["size"] == size):
            assert float(r["sigma_bits"]) == pytest.approx(
                sum(b for seen, b in curve if seen <= int(r["tokens"])), rel=1e-12
            )
            assert int(r["tokens"]) in {seen for seen, _ in curve}  # whole steps: a prefix the code really has
        assert float(prefixes[-2 if size == "nano" else -1]["sigma_bits"]) == pytest.approx(
            summary["code/data_bits"], rel=1e-12
        )
    assert sum(r["shortest"] == "True" for r in prefixes) == len(FRACTIONS)  # one per prefix
    assert (
        "Σ bits of each prefix" in md
        and "Catch-up points:" in md
        and ("micro catches up" in md or "micro never" in md or "micro is ahead" in md)
    )
    assert (sweep_dir / "cumulative_code.png").stat().st_size > 500

    # Reading the finished runs gives the same table, without training (the flag's old spelling works too).
    again = tmp_path / "again"
    assert (
        cli.main(
            ["compare", "--from_runs", str(sweep_dir / "nano"), str(sweep_dir / "micro"), "--sweep_dir", str(again)]
        )
        == 0
    )
    assert _rows(again / "comparison.csv") == rows


def test_wall_clock_budget_stops_runs_and_says_so(text_file, tmp_path):
    overrides = {
        "data": {"path": str(text_file)},
        "stream": {"enabled": False},
        "logging": {"wandb": False, "progress_bar": False, "plot": False},
        "trainer": {"num_threads": 1},
    }
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


def _run(size, params, step_bits, tokens=100):
    curve, seen = [], 0
    for bits in step_bits:
        seen += tokens
        curve.append((seen, float(bits), tokens))
    return {"row": {"size": size, "params": params, "bytes": seen, "tokens": seen, "f_bits": 1000}, "curve": curve}


def test_catch_up_is_where_the_bigger_models_cumulative_code_drops_below_for_good():
    small = _run("small", 10, [300] * 10)
    big = _run("big", 100, [500] * 3 + [200] * 7)  # behind by 600 bits after 300 tokens, level at 900
    point = catch_up(small, big)
    assert point["tokens"] == pytest.approx(900) and point["behind_bits"] == pytest.approx(-100)
    never = catch_up(small, _run("slow", 100, [500] * 3 + [290] * 7))
    assert never["tokens"] is None and never["behind_bits"] == pytest.approx(530)
    assert catch_up(small, _run("better", 100, [299] * 10))["tokens"] == 0
    rows = prefix_rows([small, big], fractions=(0.3, 1.0))
    assert [(r["size"], r["tokens"], r["sigma_bits"], r["shortest"]) for r in rows] == [
        ("small", 300, 900.0, True),
        ("big", 300, 1500.0, False),
        ("small", 1000, 3000.0, False),
        ("big", 1000, 2900.0, True),
    ]
    assert rows[0]["total_bits"] == 1000 + 300 + 900.0  # |f| + n + Σ of the prefix


def test_sweep_with_a_mixture_logs_the_comparison_to_its_wandb_group(text_file, tmp_path):
    """A mixture of the sizes is one more row (its Σ next to each size and its bound); the sizes
    and the comparison share one W&B group, offline, with the prefix table and plots logged."""
    from tests.helpers import wandb_offline_summary

    overrides = {
        "data": {"path": str(text_file)},
        "stream": {"enabled": False},
        "logging": {"wandb": True, "progress_bar": False, "plot": False},
        "trainer": {"num_threads": 1},
    }
    sweep = Sweep(
        base=str(TINY),
        sizes=("nano", "micro"),
        mixture="bayes",
        budget=Budget(bytes=2000),
        group="g1",
        sweep_dir=str(tmp_path / "sweep"),
    )
    sweep_dir = run_sweep(sweep, overrides)
    rows = _rows(sweep_dir / "comparison.csv")
    assert [r["size"] for r in rows[:3]] == ["nano", "micro", "mixture-bayes"]
    mixture = json.loads((sweep_dir / "mixture-bayes" / "summary.json").read_text())
    sizes = [float(r["sigma_bits"]) for r in rows[:2]]
    assert mixture["mixture/member_bits"] == sizes  # its members trained exactly as the sizes alone
    assert float(rows[2]["sigma_bits"]) <= min(sizes) + 1 + 1e-3  # Bayes: within log2 K = 1 bit of the best
    md = (sweep_dir / "comparison.md").read_text()
    assert "mixture-bayes: Σ" in md and "the bound min + log2 K" in md
    assert "mixture-bayes" in {r["size"] for r in _rows(sweep_dir / "prefixes.csv")}
    assert all("mixture" not in (p["small"] + p["big"]) for p in json.loads((sweep_dir / "catch_up.json").read_text()))

    (comparison,) = (sweep_dir / "wandb").glob("offline-run-*")
    summary = wandb_offline_summary(comparison)
    assert summary["compare/catch_up"][0]["big"] == "micro" and summary["_group"] == "g1"
    assert {"compare/prefixes", "compare/cumulative"} <= summary["_history"]  # the table and the plot were logged
    for size in ("nano", "micro", "mixture-bayes"):
        (run,) = (sweep_dir / size / "wandb").glob("offline-run-*")
        size_summary = wandb_offline_summary(run)
        assert "code/bpb" in size_summary and size_summary["_group"] == "g1"

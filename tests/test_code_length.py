"""The code length is the first-pass area under the loss curve, and nothing else."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from prequel.alice.corpus import read_corpus
from prequel.alice.session import train
from prequel.training.curriculum import plan_batches
from prequel.training.data import IGNORE, Tape
from prequel.training.module import PrequelModule
from prequel.training.stream import read_stream
from tests.helpers import ROOT, TINY, run_cli, tiny_config


def hand_written_code_length(config, accumulate: int = 1) -> float:
    """An independent prequential loop: score each batch, then learn it (plain PyTorch)."""
    torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, verbose=False)
    module = PrequelModule(config, vocab_size=256)
    optimizer = module.configure_optimizers()["optimizer"]
    tokens = torch.tensor(list(read_corpus(config.data.path)), dtype=torch.long)
    tape = Tape(tokens, bos_id=256)
    batches = plan_batches(len(tokens), config.model.block_size, config.data.batch_size, "sequential", config.seed)
    bits = 0.0
    for i, spans in enumerate(batches):
        x, y = tape.batch(spans)
        nll = F.cross_entropy(module.model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
        bits += nll.detach().double().sum().item() / math.log(2)
        (nll.sum() / (y != IGNORE).sum() / accumulate).backward()
        if (i + 1) % accumulate == 0 or i + 1 == len(batches):
            optimizer.step()
            optimizer.zero_grad()
    return bits


@pytest.mark.parametrize("accumulate", [1, 4])
def test_sum_equals_an_independent_prequential_loop(text_file, tmp_path, accumulate):
    config = tiny_config(
        text_file, tmp_path / "run", "--stream.enabled", "false", "--trainer.accumulate_grad_batches", str(accumulate)
    )
    summary = train(config)
    expected = hand_written_code_length(config, accumulate)
    assert summary["code/data_bits"] == pytest.approx(expected, rel=1e-6)
    assert summary["data/tokens"] == 4000 and summary["data/complete"]
    total = summary["code/f_bits"] + summary["code/n_bits"] + summary["code/data_bits"]
    assert summary["code/total_bits"] == pytest.approx(total)
    logged = [row for row in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if row["code/bpb"]]
    steps = [int(row["step"]) for row in logged]
    assert steps and len(steps) == len(set(steps)), steps  # one row a log step, accumulating or not


def test_accumulation_changes_learning_not_the_accounting(text_file, tmp_path):
    one = train(tiny_config(text_file, tmp_path / "a", "--stream.enabled", "false"))
    four = train(
        tiny_config(text_file, tmp_path / "b", "--stream.enabled", "false", "--trainer.accumulate_grad_batches", "4")
    )
    # Same tokens, each counted once; per-token bits stay in a sane range (not 4x or 1/4x).
    assert four["data/tokens"] == one["data/tokens"]
    assert 0.8 < four["code/data_bits"] / one["code/data_bits"] < 1.25


def test_only_the_first_pass_is_code_length(text_file, tmp_path):
    one = train(tiny_config(text_file, tmp_path / "a", "--stream.enabled", "false"))
    two = train(tiny_config(text_file, tmp_path / "b", "--stream.enabled", "false", "--trainer.max_epochs", "2"))
    assert two["code/data_bits"] == one["code/data_bits"]
    assert two["code/n_bits"] == one["code/n_bits"]  # (|f| differs by the config's max_epochs)
    assert two["train/last_epoch_bpb"] < one["train/last_epoch_bpb"], "epoch 2 trains on seen data"


def test_partial_pass_says_so(text_file, tmp_path):
    summary = train(tiny_config(text_file, tmp_path / "run", "--trainer.max_steps", "5", "--stream.enabled", "false"))
    assert not summary["data/complete"]
    assert summary["data/tokens"] == 5 * 4 * 32 == summary["data/bytes"]


# State beyond weights and optimizer: compress.yaml's n-gram counts (updated from each coded
# batch, stored sparsely) and replay steps; a mixture's weights (updated from each coded token).
RECIPES = {  # (bytes of text, arguments); a plain GPT: tests/test_reliability.py (SIGKILL at random steps)
    "compress.yaml": (
        12_000,
        [
            "--config",
            ROOT / "configs" / "compress.yaml",
            "--trainer.num_threads",
            "1",
            "--logging.wandb",
            "false",
            "--logging.plot",
            "false",
        ],
    ),
    "mixture": (
        40_000,
        ["--config", TINY, "--mixture.members", "1x2x16@3e-3, 1x2x32@3e-3", "--mixture.weights", "switch"],
    ),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigkill_and_resume_gives_the_same_code_length_and_a_decodable_stream(tmp_path, recipe):
    """Kill a training process right after its first checkpoint, rerun the same command: the
    same Σ and the byte-identical stream as a run never interrupted."""
    size, recipe_args = RECIPES[recipe]
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:size])
    args = [
        *recipe_args,
        "--data.path",
        text,
        "--trainer.checkpoint_every_n_steps",
        "40",
        "--logging.progress_bar",
        "false",
    ]
    reference = run_cli(*args, "--run_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *map(str, args), "--run_dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run_dir / "summary.json").exists(), "the kill must land mid-run"

    resumed = run_cli(*args, "--run_dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads((tmp_path / "reference" / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["code/data_bits"] == pytest.approx(want["code/data_bits"], rel=1e-9)
    assert got["code/total_bits"] == pytest.approx(want["code/total_bits"], rel=1e-9)
    assert got["code/stream_bits"] == want["code/stream_bits"]
    assert (run_dir / "stream.prequel").read_bytes() == (tmp_path / "reference" / "stream.prequel").read_bytes()
    verified = run_cli("verify", run_dir)
    assert verified.returncode == 0, verified.stderr
    assert (run_dir / "stream.decoded").read_bytes() == text.read_bytes()

    again = run_cli(*args, "--run_dir", run_dir)  # a finished run is not trained again
    assert again.returncode == 0 and "already finished" in again.stdout


def test_ddp_two_processes_stream_count_globally_and_verify_in_two_processes(tmp_path):
    """Two gloo processes, each coding its rows of every batch into its own sub-stream, with the
    n-gram counts and replays of the whole batch: Σ is the one-process run's, and verify (two
    processes again, in a separate command) decodes the same bytes and ends in the same weights."""
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:12_000])
    common = [
        "--config",
        TINY,
        "--data.path",
        text,
        "--model.ngram_order",
        "3",
        "--data.replay_steps",
        "1",
        "--logging.progress_bar",
        "false",
    ]
    single = run_cli(*common, "--run_dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    ddp = run_cli(*common, "--run_dir", tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert ddp.returncode == 0, ddp.stderr
    want = json.loads((tmp_path / "single" / "summary.json").read_text())
    got = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert got["data/tokens"] == want["data/tokens"] == 12_000
    assert got["code/data_bits"] == pytest.approx(want["code/data_bits"], rel=1e-4)
    stream = read_stream(tmp_path / "ddp" / "stream.prequel")
    assert [s.batches for s in stream.segments] == [94, 94]  # one segment, a sub-stream per process

    verified = run_cli("verify", tmp_path / "ddp")
    assert verified.returncode == 0, verified.stderr
    assert (tmp_path / "ddp" / "stream.decoded").read_bytes() == text.read_bytes()
    assert "final weights are bitwise equal to the encoder's final checkpoint" in verified.stdout
    assert verified.stdout.count("OK") == 1  # rank 0 reports

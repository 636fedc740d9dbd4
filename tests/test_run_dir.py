"""A run directory is a run of one program on one text: another command on it is refused, two
processes on it are refused, and SIGTERM leaves a resumable checkpoint and a non-zero exit."""

import fcntl
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest

from prequel.alice.fit import IDENTITY_NAME, LOCK_NAME
from prequel.alice.session import train
from prequel.checks.settings import ConfigError
from prequel.training.stream import read_stream
from tests.helpers import ROOT, TINY, run_cli, tiny_config


class _Crash(L.Callback):
    """Dies after `steps` steps, like a killed process, once a checkpoint exists."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            raise KeyboardInterrupt


@pytest.fixture
def interrupted(text_file, tmp_path):
    """A run directory left by a run killed after its first checkpoint."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):  # (Lightning turns the interrupt into exit 1)
        train(tiny_config(text_file, run_dir, "--trainer.checkpoint_every_n_steps", "5"), extra_callbacks=[_Crash(7)])
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / IDENTITY_NAME).exists()
    return text_file, run_dir


def test_resuming_with_other_data_is_refused_naming_it(interrupted, tmp_path):
    text, run_dir = interrupted
    other = tmp_path / "other.txt"
    other.write_bytes(text.read_bytes()[::-1])
    with pytest.raises(ConfigError, match=r"holds a run of other settings or data .*data: the run's sha256"):
        train(tiny_config(other, run_dir, "--trainer.checkpoint_every_n_steps", "5"))
    assert not (run_dir / "summary.json").exists()


def test_resuming_with_other_settings_is_refused_naming_them(interrupted):
    text, run_dir = interrupted
    with pytest.raises(ConfigError, match=r"optim.lr: the run has 0.003, this command 0.001"):
        train(tiny_config(text, run_dir, "--trainer.checkpoint_every_n_steps", "5", "--optim.lr", "0.001"))


def test_the_same_command_resumes_and_a_finished_run_of_other_data_is_not_reported_as_this_one(interrupted, tmp_path):
    text, run_dir = interrupted
    summary = train(tiny_config(text, run_dir, "--trainer.checkpoint_every_n_steps", "5"))
    assert summary["data/complete"]
    other = tmp_path / "other.txt"
    other.write_bytes(text.read_bytes()[::-1])
    with pytest.raises(ConfigError, match="holds a run of other settings or data"):
        train(tiny_config(other, run_dir, "--trainer.checkpoint_every_n_steps", "5"))


def test_a_second_process_on_a_busy_run_directory_is_refused(text_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another training process holds it
    try:
        r = run_cli("--config", TINY, "--data.path", text_file, "--run_dir", run_dir, "--logging.progress_bar", "false")
    finally:
        os.close(fd)
    assert r.returncode == 2 and "is in use by another training process" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (run_dir / "stream.prequel").exists()


def test_sigterm_exits_non_zero_with_a_resumable_checkpoint(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:300_000])
    args = ["--config", TINY, "--data.path", text, "--logging.progress_bar", "false", "--trainer.max_steps", "1500"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *map(str, args), "--run_dir", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # the banner is printed just before training starts (1,500 steps: ~10 s)
        if line.startswith("prequel:"):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted: stopped by SIGTERM after" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "summary.json").exists()
    resumed = run_cli(*args, "--run_dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    reference = run_cli(*args, "--run_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    # The same training bit for bit (the stop seals one more range-coder segment, so the files differ in framing):
    ours, theirs = (read_stream(d / "stream.prequel") for d in (run_dir, tmp_path / "reference"))
    assert ours.trailer["checksums"]["final"] == theirs.trailer["checksums"]["final"]  # tokens and weights
    assert ours.trailer["ideal_bits"] == theirs.trailer["ideal_bits"]
    assert len(ours.segments) == len(theirs.segments) + 1


def test_a_damaged_checkpoint_beside_a_valid_stream_only_skips_the_weight_comparison(text_file, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(text_file, run_dir))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    r = run_cli("verify", run_dir, "--out", tmp_path / "out.txt")
    assert r.returncode == 0, r.stderr
    assert "cannot be read (" in r.stdout and "final weights not compared" in r.stdout and "Traceback" not in r.stderr
    assert (tmp_path / "out.txt").read_bytes() == text_file.read_bytes()

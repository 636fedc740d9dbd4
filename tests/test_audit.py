"""`verify --jobs N` / `--segment K`: a run audited in stretches between its kept checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from prequel.alice.encoder import write_stream
from prequel.training.stream import read_stream
from tests.helpers import ROOT, TINY, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with the n-gram prior and replay (state beyond the weights): 4 stretches."""
    tmp = tmp_path_factory.mktemp("audit")
    text = tmp / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:20_000])
    r = run_cli(
        "--config",
        TINY,
        "--data.path",
        text,
        "--run_dir",
        tmp / "run",
        "--model.ngram_order",
        "3",
        "--data.replay_steps",
        "1",
        "--trainer.checkpoint_every_n_steps",
        "80",
        "--logging.progress_bar",
        "false",
    )
    assert r.returncode == 0, r.stderr
    return tmp / "run", text


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_the_trailer_records_every_checkpoint_and_the_run_keeps_them(run):
    run_dir, _ = run
    boundaries = read_stream(run_dir / "stream.prequel").trailer["boundaries"]
    assert [b["step"] for b in boundaries] == [80, 160, 240, 314]  # 157 batches, each replayed once
    assert [b["batches"] for b in boundaries] == [40, 80, 120, 157]
    assert len({b["state"] for b in boundaries}) == 4
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["last.ckpt", "step=160.ckpt", "step=240.ckpt", "step=314.ckpt", "step=80.ckpt"]
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "step=314.ckpt"


def test_parallel_audit_names_the_stretch_whose_stream_segment_was_altered(run, tmp_path):
    run_dir = copy_of(run[0], tmp_path)
    stream = read_stream(run_dir / "stream.prequel")
    assert [s.batches for s in stream.segments] == [40, 40, 40, 37]
    stream.segments[2].words = stream.segments[2].words.copy()
    stream.segments[2].words[5] ^= 1 << 7  # a forged segment, with the file's checksums made to fit
    write_stream(run_dir / "stream.prequel", stream)

    shutil.copy(run[1], tmp_path / "notes.txt")  # run from elsewhere, with relative paths, as a user may
    r = subprocess.run(
        [sys.executable, ROOT / "train.py", "verify", "run", "--jobs", "2", "--data", "notes.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("stretch 0 (steps 0..80): OK, 40 batches")
    assert lines[1].startswith("stretch 1 (steps 80..160): OK, 40 batches")  # ends in the state stretch 2 starts from
    assert "stretch 2 (steps 160..240): FAILED" in lines[2] and "(stream segment 2) decodes to other tokens" in lines[2]
    assert lines[3].startswith("stretch 3 (steps 240..end): OK, 37 batches")  # with verify's final checks
    assert "4 stretches, 2 at a time (torch threads per job: 1)" in lines[4]
    assert "the audit failed in stretch 2" in r.stderr


def test_one_stretch_refuses_a_checkpoint_whose_counts_were_altered(run, tmp_path):
    run_dir = copy_of(run[0], tmp_path)
    ckpt = run_dir / "checkpoints" / "step=160.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["state_dict"]["model.ngram.counts3_value"][0] += 1  # one n-gram count, one more
    torch.save(state, ckpt)
    r = run_cli("verify", run_dir, "--segment", "2", "--data", run[1])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "step=160.ckpt is not in the state the stream records for step 160" in r.stderr

    good = run_cli("verify", run[0], "--segment", "2", "--data", run[1])
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout.splitlines()[-1].removeprefix("audit-report "))
    assert report["batches"] == 40 and report["states_checked"] == [240] and report["ok"]


def test_missing_checkpoint_wrong_data_and_bad_arguments_are_clear_errors(run, tmp_path):
    run_dir = copy_of(run[0], tmp_path)
    (run_dir / "checkpoints" / "step=80.ckpt").unlink()
    r = run_cli("verify", run_dir, "--jobs", "2")
    assert r.returncode == 3 and "stretch 1 starts from" in r.stderr and "step=80.ckpt, which is missing" in r.stderr
    r = run_cli("verify", run_dir, "--segment", "9")
    assert r.returncode == 3 and "--segment 9: the run has stretches 0..3" in r.stderr
    other = tmp_path / "other.txt"
    other.write_bytes(run[1].read_bytes()[::-1])
    r = run_cli("verify", run_dir, "--segment", "0", "--data", other)
    assert r.returncode == 3 and "is not the data of this run" in r.stderr
    r = run_cli("verify", run_dir, "--data", other)
    assert r.returncode == 2 and "--data is for an audit" in r.stderr
    r = run_cli("verify", run_dir, "--jobs", "2", "--segment", "1")
    assert r.returncode == 2 and "give one of them" in r.stderr

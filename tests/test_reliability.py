"""Reliability: a crash, a full disk or a bad input never loses data or gives a wrong code length.

* Faults: SIGKILL at random steps, re-run the same command, verify in another process.
* (The stream reader under fuzzing: tests/test_stream_fuzz.py.)
* (Config and data errors: tests/test_config_errors.py.)
* Environment mismatch at decode: refused by name, or decoded at the user's risk.
* Unwritable run directory, full disk: a clear error and no partial file that looks finished.
"""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prequel.alice.fit import remove_stale_temps
from prequel.alice.session import SUMMARY_NAME, train
from prequel.files import write_atomic
from prequel.training.stream import Stream, decode_stream, encode_stream
from prequel.verify.verifier import STREAM_NAME
from tests.helpers import ROOT, TINY, files_under, run_cli, run_main, tiny_config

SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()
CHECKPOINT_EVERY = "4"
# The code length, and every number it is made of, must come out the same after a fault.
TOTALS = (
    "code/data_bits",
    "code/total_bits",
    "code/f_bits",
    "code/n_bits",
    "code/stream_bits",
    "data/tokens",
    "data/bytes",
    "data/complete",
    "stream/segments",
    "stream/file_bytes",
)


def totals(run_dir: Path) -> dict:
    summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    return {k: summary[k] for k in TOTALS}


# --- faults: SIGKILL at random steps, resume, verify ---------------------------------------------


def _checkpoint_id(ckpt: Path):
    try:
        st_ = ckpt.stat()
        return st_.st_ino, st_.st_mtime_ns  # each checkpoint is a new file renamed into place
    except FileNotFoundError:
        return None


def kill_after_checkpoint(cmd: list[str], run_dir: Path, n: int, rng: random.Random) -> None:
    """Start a training process and SIGKILL it at a random moment after its n-th checkpoint
    (n = 0: after it has set up its run directory, before the first checkpoint)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline, seen, last = run_dir / "checkpoints" / "last.ckpt", time.time() + 120, 0, None
    try:
        if n == 0:
            while not (run_dir / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
        while seen < n and proc.poll() is None and time.time() < deadline:
            now = _checkpoint_id(ckpt)
            if now is not None and now != last:
                seen, last = seen + 1, now
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next few steps
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def resumes_from_step(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return 0
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.slow
def test_sigkill_at_three_random_steps_resume_and_verify(tmp_path):
    seed = int(os.environ.get("PREQUEL_FAULT_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    text = tmp_path / "text.txt"
    text.write_bytes(SHAKESPEARE[:6000])  # 47 steps of 4 x 32 tokens, a checkpoint every 3
    args = [
        "--config",
        TINY,
        "--data.path",
        text,
        "--trainer.checkpoint_every_n_steps",
        "3",
        "--logging.progress_bar",
        "false",
    ]
    train(tiny_config(text, tmp_path / "uninterrupted", "--trainer.checkpoint_every_n_steps", "3"))
    want, want_stream = totals(tmp_path / "uninterrupted"), (tmp_path / "uninterrupted" / STREAM_NAME).read_bytes()

    faults = sorted(rng.sample(range(0, 12), 3))  # kill after the n-th of 15 checkpoints
    verifying, report = [], []
    for i, n in enumerate(faults):
        run_dir = tmp_path / f"killed{i}"
        cmd = [sys.executable, "train.py", *map(str, args), "--run_dir", str(run_dir)]
        kill_after_checkpoint(cmd, run_dir, n, rng)
        assert not (run_dir / SUMMARY_NAME).exists(), "the kill must land before the run finished"
        step = resumes_from_step(run_dir)
        resumed = run_cli(*args, "--run_dir", run_dir)  # the same command again
        assert resumed.returncode == 0, resumed.stderr
        report.append((n, step))
        # Bob, in a separate process, while the next fault runs.
        with open(tmp_path / f"verify{i}.log", "w") as log:
            verifying.append(
                subprocess.Popen(
                    [sys.executable, "train.py", "verify", str(run_dir)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                )
            )
    survived, bytes_lost = 0, 0
    original = text.read_bytes()
    for i, ((n, step), proc) in enumerate(zip(report, verifying)):
        proc.wait(timeout=300)
        run_dir = tmp_path / f"killed{i}"
        decoded = (run_dir / "stream.decoded").read_bytes() if proc.returncode == 0 else b""
        same = sum(a == b for a, b in zip(decoded, original))
        bytes_lost += len(original) - same
        ok = (
            proc.returncode == 0
            and decoded == original
            and totals(run_dir) == want
            and (run_dir / STREAM_NAME).read_bytes() == want_stream
        )
        survived += ok
        where = "before the first checkpoint" if n == 0 else f"after checkpoint {n}"
        print(
            f"fault {i + 1}: SIGKILL {where}, resumed from step {step}: verify rc {proc.returncode}, "
            f"decoded {len(decoded):,} of {len(original):,} bytes, code length "
            f"{'equal' if totals(run_dir) == want else 'DIFFERENT'} ({totals(run_dir)['code/total_bits']:,.1f} bits)"
        )
        assert proc.returncode == 0, (tmp_path / f"verify{i}.log").read_text()[-2000:]
    print(f"faults injected: {len(report)}, survived: {survived}, bytes lost: {bytes_lost} (seed {seed})")
    assert len(report) == survived == 3 and bytes_lost == 0


def test_kill_before_the_first_checkpoint_starts_cleanly_from_scratch(real, tmp_path):
    """What a kill during start-up leaves: a run directory without last.ckpt, half-written files."""
    run_dir = tmp_path / "partial"
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("half a con")
    (run_dir / "csv" / "metrics.csv").write_text("step,train/lo")
    (run_dir / f".{SUMMARY_NAME}.k1ll3d.tmp").write_bytes(b'{"code/')  # write_atomic's temp files
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / ".last.ckpt.k1ll3d.tmp").write_bytes(b"PK\x03\x04")
    train(tiny_config(real["text"], run_dir, "--trainer.checkpoint_every_n_steps", CHECKPOINT_EVERY))
    assert totals(run_dir) == totals(real["run_dir"])
    assert (run_dir / STREAM_NAME).read_bytes() == real["stream"]
    assert not [p for p in files_under(run_dir) if p.endswith(".tmp")]


def test_kill_after_the_final_checkpoint_before_the_summary_finishes_the_run(real, tmp_path):
    """The last window: training over, final checkpoint saved, stream and summary not yet.
    Lightning skips a finished loop on resume, so the sums and the stream trailer must still come
    out right."""
    run_dir = tmp_path / "final"
    shutil.copytree(real["run_dir"], run_dir)
    for name in (SUMMARY_NAME, STREAM_NAME):
        (run_dir / name).unlink()
    (run_dir / f".{STREAM_NAME}.k1ll3d.tmp").write_bytes(real["stream"][:100])
    train(tiny_config(real["text"], run_dir, "--trainer.checkpoint_every_n_steps", CHECKPOINT_EVERY))
    assert totals(run_dir) == totals(real["run_dir"])
    assert (run_dir / STREAM_NAME).read_bytes() == real["stream"]
    assert not (run_dir / f".{STREAM_NAME}.k1ll3d.tmp").exists()


def test_write_atomic_keeps_the_old_file_whole_when_a_write_fails(tmp_path):
    target = tmp_path / "summary.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):  # not bytes-like: fails inside the write
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and files_under(tmp_path) == {"summary.json"}
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and files_under(tmp_path) == {"summary.json"}
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like open(), not mkstemp's 0600
    (tmp_path / ".x.tmp").write_bytes(b"")
    (tmp_path / "keep.tmp").write_bytes(b"")  # not ours: no leading dot
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".x.tmp"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- environment mismatch at decode ------------------------------------------------------------


def forge_environment(real, directory: Path, **environment) -> Stream:
    """The real stream, as if written where `environment` held (only the header changes)."""
    stream = decode_stream(real["stream"])
    stream.header["environment"].update(environment)
    directory.mkdir(exist_ok=True)
    (directory / STREAM_NAME).write_bytes(encode_stream(stream))
    return stream


def test_thread_count_mismatch_is_refused_then_allowed(real, tmp_path):
    out = tmp_path / "out.txt"
    rc, _, err = run_main("verify", real["run_dir"], "--threads", "2", "--out", out)
    assert rc == 3 and "environment mismatch" in err and "num_threads: stream has 1, here 2" in err
    assert "--allow-env-mismatch" in err and not out.exists()
    # Recorded 2 threads, decoding with 1 (what it really used): allowed, every checksum passes.
    forge_environment(real, tmp_path / "forged", num_threads=2)
    rc, _, err = run_main("verify", tmp_path / "forged", "--out", out)
    assert rc == 3 and "num_threads: stream has 2, here 1" in err and not out.exists()
    rc, stdout, err = run_main("verify", tmp_path / "forged", "--out", out, "--allow-env-mismatch")
    assert rc == 0, err
    assert "warning: environment differs (num_threads: stream has 2, here 1); decoded anyway" in stdout
    assert out.read_bytes() == real["text"].read_bytes()


def test_drift_after_an_allowed_mismatch_is_named_with_its_likely_cause(real, tmp_path):
    stream = forge_environment(real, tmp_path, num_threads=2)
    stream.trailer["checksums"]["5"]["params"] = "0" * 64  # what a bitwise drift of the weights looks like
    (tmp_path / STREAM_NAME).write_bytes(encode_stream(stream))
    rc, _, err = run_main("verify", tmp_path, "--out", tmp_path / "out.txt", "--allow-env-mismatch")
    assert rc == 3 and "parameters differ from the encoder's after batch 5 although the tokens match" in err
    assert "(the environment differs from the encoder's: num_threads: stream has 2, here 1)" in err
    assert files_under(tmp_path) == {STREAM_NAME}


@pytest.mark.slow
def test_real_thread_count_change_decodes_or_names_the_drift(real, tmp_path):
    """2 threads instead of 1, for real, in a separate process. (Passive OpenMP waiting changes no
    bit; it keeps the 2 threads from spinning for minutes where other processes hold the cores.)"""
    run_dir = tmp_path / "short"
    train(tiny_config(real["text"], run_dir, "--trainer.max_steps", "8"))
    r = subprocess.run(
        [sys.executable, "train.py", "verify", str(run_dir), "--threads", "2", "--allow-env-mismatch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if r.returncode == 0:  # 2 threads replayed this tiny model bit for bit, and every checksum says so
        assert "warning: environment differs (num_threads: stream has 1, here 2)" in r.stdout
    else:  # or the checks name the drift and its likely cause; nothing is written
        assert r.returncode == 3, r.stderr
        assert "(the environment differs from the encoder's: num_threads: stream has 1, here 2)" in r.stderr
        assert not (run_dir / "stream.decoded").exists()
    said = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(("warning:", "stream error:"))]
    print(f"verify with 2 threads of a 1-thread stream: exit {r.returncode}: {said[0]}")


def test_torch_version_mismatch_is_refused_then_allowed(real, tmp_path):
    forge_environment(real, tmp_path, torch="0.0.1+other")
    out = tmp_path / "out.txt"
    rc, _, err = run_main("verify", tmp_path, "--out", out)
    assert rc == 3 and f"torch: stream has '0.0.1+other', here '{torch.__version__}'" in err and not out.exists()
    rc, stdout, err = run_main("verify", tmp_path, "--out", out, "--allow-env-mismatch")
    assert rc == 0, err
    assert "warning: environment differs (torch: stream has '0.0.1+other'" in stdout
    assert out.read_bytes() == real["text"].read_bytes()


# --- an unwritable run directory, a full disk --------------------------------------------------


def test_run_dir_under_a_file_or_on_a_file_is_refused(text_file, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    rc, _, err = run_main("--config", TINY, "--data.path", text_file, "--run_dir", tmp_path / "file" / "run")
    assert rc == 2 and f"run_dir: cannot create the directory {tmp_path / 'file' / 'run'}: Not a directory" in err
    rc, _, err = run_main("--config", TINY, "--data.path", text_file, "--run_dir", tmp_path / "file")
    assert rc == 2 and "run_dir: cannot create the directory" in err and "File exists" in err


def test_verify_output_that_cannot_be_written_is_an_error_not_a_traceback(real, tmp_path):
    (tmp_path / "file").write_text("")
    rc, _, err = run_main("verify", real["run_dir"], "--out", tmp_path / "file" / "sub" / "decoded.txt")
    assert rc == 4 and err.startswith("error: Not a directory: ") and "no decoded output was written" in err


def _disk_of(limit: int):
    def limit_file_size():  # a full disk, as the process sees it: writes past `limit` bytes fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def test_full_disk_stops_with_a_clear_error_then_the_same_command_finishes(real, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        TINY,
        "--data.path",
        real["text"],
        "--run_dir",
        run_dir,
        "--logging.progress_bar",
        "false",
        "--trainer.checkpoint_every_n_steps",
        CHECKPOINT_EVERY,
    ]
    r = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_disk_of(100_000),
    )  # a checkpoint is ~280 kB
    assert r.returncode == 4, r.stderr
    assert "error: File too large: " in r.stderr and "checkpoints/step=" in r.stderr and "Traceback" not in r.stderr
    assert "re-run the same command" in r.stderr
    left = files_under(run_dir)
    assert not {SUMMARY_NAME, STREAM_NAME, "checkpoints/last.ckpt"} & left, left
    assert not [p for p in left if p.startswith("checkpoints/step=")], left  # the one it was writing: not there
    assert not [p for p in left if p.endswith(".tmp")], left
    train(tiny_config(real["text"], run_dir, "--trainer.checkpoint_every_n_steps", CHECKPOINT_EVERY))
    assert totals(run_dir) == totals(real["run_dir"])
    assert (run_dir / STREAM_NAME).read_bytes() == real["stream"]

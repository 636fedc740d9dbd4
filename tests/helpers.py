"""What several test files share: paths, the tiny config, running train.py as a user does.

Imported after tests/conftest.py, which pins the kernels before anything here imports torch.
"""

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

from prequel.checks.settings import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"  # the corpora the benches use, when this checkout has them
TINY = ROOT / "configs" / "tiny.yaml"
LMIC_TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:1000]  # one batch of 32 chunks (tiny.yaml)


def tiny_config(data_path: Path, run_dir: Path, *overrides: str):
    return load_config(
        TINY, ["--data.path", str(data_path), "--run_dir", str(run_dir), "--logging.progress_bar", "false", *overrides]
    )


def assert_refused(r: subprocess.CompletedProcess, code: int, *messages: str, nothing_at: Path) -> None:
    """A CLI run refused with one clear line: its exit code, the messages, no traceback, and no
    output (nor a temp file of one) at `nothing_at`."""
    assert r.returncode == code, r.stdout + r.stderr
    for message in messages:
        assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line
    assert not nothing_at.exists()
    assert not list(nothing_at.parent.glob(f".{nothing_at.name}.*")), "a temp file was left behind"


def trained_tiny_model(tmp: Path) -> Path:
    """A tiny byte model (a few steps on real text, no stream): a run directory with a checkpoint."""
    from prequel.alice.session import train

    text = tmp / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:4000])
    train(tiny_config(text, tmp / "run", "--trainer.max_steps", "15", "--stream.enabled", "false"))
    return tmp / "run"


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py in a separate process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def wandb_offline_summary(run_dir: Path) -> dict:
    """The summary W&B recorded in an offline run (wandb-core keeps it in the .wandb log only),
    with the run's group under "_group" and the keys it logged under "_history"."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("*.wandb")
    data, pos, buf, summary = log.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):  # LevelDB-style log: 32 KiB blocks of [crc u32][len u16][type u8][bytes]
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a FULL record, or the LAST fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                summary["_group"] = record.run.run_group
            if record.WhichOneof("record_type") == "history":  # logged keys, under "_history"
                summary.setdefault("_history", set()).update(
                    item.key or item.nested_key[0] for item in record.history.item
                )
            if record.WhichOneof("record_type") == "summary":
                summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    return summary


def run_main(*args) -> tuple[int, str, str]:
    """The CLI's entry point in this process (no interpreter start-up): exit code, stdout, stderr."""
    import contextlib
    import io

    from prequel.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def files_under(directory: Path) -> set[str]:
    """Every path under `directory`, relative to it."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


ADDRESS_SPACE = 4 << 30  # what a hostile-input test's CLI process may map: a late check fails it with MemoryError


def limited_cli(*args, env: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a process that cannot map more than 4 GB (nor, with `fsize`,
    write a file larger than that many bytes)."""

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
        preexec_fn=limits,
    )

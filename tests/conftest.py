import os
import subprocess
import sys
from pathlib import Path

from training import environment

# Every test computes with portable kernels, so golden values and fixtures hold on any x86-64
# machine (AVX2 or AVX-512, Intel or AMD). The pins act when torch starts: set them before it
# does, for this process and (inherited) for the train.py processes the tests start.
if "torch" in sys.modules and not environment.pinned("portable"):
    raise RuntimeError("torch was imported before tests/conftest.py could pin its kernels")
for _name in environment.KERNEL_VARIABLES:
    os.environ.pop(_name, None)
os.environ.update(environment.PORTABLE_PINS)

import pytest  # noqa: E402

from training.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """4 kB of real English (the head of the bundled corpus)."""
    path = tmp_path / "text.txt"
    path.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:4000])
    return path


def tiny_config(data_path: Path, run_dir: Path, *overrides: str):
    return load_config(TINY, [
        "--data.path", str(data_path), "--run_dir", str(run_dir), "--logging.progress_bar", "false", *overrides,
    ])


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py in a separate process, as a user runs it."""
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def wandb_offline_summary(run_dir: Path) -> dict:
    """The summary W&B recorded in an offline run (wandb-core keeps it in the .wandb log only)."""
    import json
    import struct

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
            if record.WhichOneof("record_type") == "summary":
                summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    return summary

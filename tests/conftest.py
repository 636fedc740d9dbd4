"""Pytest fixtures. Helpers that test files import (tiny_config, run_cli, paths) are in tests/helpers.py."""

import os
import sys
import tempfile
from pathlib import Path

from prequel.training import environment

# Every test computes with portable kernels, so golden values and fixtures hold on any x86-64
# machine (AVX2 or AVX-512, Intel or AMD). The pins act when torch starts: set them before it
# does, for this process and (inherited) for the train.py processes the tests start.
if "torch" in sys.modules and not environment.pinned("portable"):
    raise RuntimeError("torch was imported before tests/conftest.py could pin its kernels")
for _name in environment.KERNEL_VARIABLES:
    os.environ.pop(_name, None)
os.environ.update(environment.PORTABLE_PINS)
# The suite runs tests side by side (pytest -n 2) and tests start train.py processes: OpenMP
# threads that spin while they wait would slow every process sharing the cores 4-8x. No bit changes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Token shards (and named datasets) go to a cache of the suite's own, never the user's.
os.environ["PREQUEL_CACHE"] = tempfile.mkdtemp(prefix="prequel-test-cache-")

import pytest  # noqa: E402

from tests.helpers import LMIC_TEXT, ROOT, tiny_config, trained_tiny_model  # noqa: E402  (imports torch: after the pins)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """4 kB of real English (the head of the bundled corpus)."""
    path = tmp_path / "text.txt"
    path.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:4000])
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One tiny finished run with the stream on (checkpoints every 4 steps): the reference that
    fault and fuzz tests compare with."""
    from prequel.alice.session import train
    from prequel.verify.verifier import STREAM_NAME

    root = tmp_path_factory.mktemp("reliability")
    text = root / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:3000])
    run_dir = root / "reference"
    train(tiny_config(text, run_dir, "--trainer.checkpoint_every_n_steps", "4"))
    return {"root": root, "text": text, "run_dir": run_dir, "stream": (run_dir / STREAM_NAME).read_bytes()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained byte model (no stream): the frozen model the compress tests use."""
    return trained_tiny_model(tmp_path_factory.mktemp("lmic"))


@pytest.fixture(scope="module")
def packed(run_dir, tmp_path_factory) -> Path:
    """LMIC_TEXT (1,000 bytes: one batch of 32 chunks) compressed with the tiny model."""
    from prequel.compress.codec import compress

    tmp = tmp_path_factory.mktemp("packed")
    (tmp / "in.txt").write_bytes(LMIC_TEXT)
    compress(run_dir, tmp / "in.txt", tmp / "in.prq")
    return tmp / "in.prq"

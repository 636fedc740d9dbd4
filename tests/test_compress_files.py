"""prequel compress / decompress and their files: an output never replaces what the command reads
(the input, the checkpoint, its run's files) nor an existing file unasked; unwritable places, a full
disk, devices and oversized inputs are refused by name with nothing left behind. (Headers that lie
about their sizes: tests/test_compress_hostile.py.)"""

import os
import re
from pathlib import Path

import pytest

from prequel.checks.memory import MEMORY_ENV
from prequel.checks.settings import ConfigError
from prequel.compress.codec import compress, decompress
from prequel.training.data import DataError
from prequel.training.stream import read_stream
from tests.helpers import LMIC_TEXT as ORIGINAL
from tests.helpers import ROOT, assert_refused, limited_cli

PER_BATCH = 32 * 256  # tiny.yaml's block_size (the default chunk) times the default batch_chunks


# --- item 6: an output never replaces what the command reads, nor an existing file unasked --------


def test_an_existing_output_is_kept_unless_forced(run_dir, packed, tmp_path):
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    out = tmp_path / "out.prq"
    out.write_bytes(b"precious")
    r = limited_cli("compress", "--ckpt", run_dir, tmp_path / "in.txt", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: output {out} already exists; pass --force to replace it, or give another path" in r.stderr
    assert out.read_bytes() == b"precious"
    r = limited_cli("compress", "--ckpt", run_dir, tmp_path / "in.txt", out, "--force")
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.txt"
    back.write_bytes(b"precious")
    r = limited_cli("decompress", "--ckpt", run_dir, out, back)
    assert r.returncode == 2 and f"error: output {back} already exists; pass --force" in r.stderr, r.stderr
    assert back.read_bytes() == b"precious"
    r = limited_cli("decompress", "--ckpt", run_dir, out, back, "--force")
    assert r.returncode == 0 and back.read_bytes() == ORIGINAL, r.stderr


@pytest.mark.parametrize("command", [compress, decompress], ids=["compress", "decompress"])
def test_the_checkpoint_and_the_input_are_never_written_even_when_forced(run_dir, packed, tmp_path, command):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    source = tmp_path / "in.txt" if command is compress else packed
    before = {p: p.read_bytes() for p in (ckpt, run_dir / "config.yaml", source)}
    (tmp_path / "link").symlink_to(ckpt)
    os.link(source, tmp_path / "hard")
    cases = [
        (ckpt, f"output {ckpt} is the checkpoint: refusing to write onto it, even with --force"),
        (tmp_path / "link", f"output {tmp_path / 'link'} is the checkpoint, {ckpt}: refusing"),
        (run_dir / "config.yaml", f"output {run_dir / 'config.yaml'} is the run's config: refusing"),
        (source, f"output {source} is the input: refusing to write onto it, even with --force"),
        (tmp_path / "hard", f"output {tmp_path / 'hard'} is the input, {source}: refusing"),
    ]
    for out, message in cases:
        for ckpt_arg in (run_dir, ckpt):
            with pytest.raises(ConfigError, match=re.escape(message)):
                command(ckpt_arg, source, out, overwrite=True)
    assert before == {p: p.read_bytes() for p in before}


def test_compress_onto_its_own_checkpoint_is_refused(run_dir, packed, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    (tmp_path / "x.txt").write_bytes(ORIGINAL)
    r = limited_cli("compress", "--ckpt", run_dir, tmp_path / "x.txt", ckpt)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        f"error: output {ckpt} is the checkpoint: refusing to write onto it, even with "
        "--force; give another output path"
    )
    r = limited_cli("decompress", "--ckpt", run_dir, packed, packed, "--force")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: output {packed} is the input: refusing to write onto it, even with --force; give another output path"
    ), r.stderr
    assert ckpt.read_bytes() == before and read_stream(packed).header["tokens"] == len(ORIGINAL)


@pytest.mark.parametrize("out, kind", [("dir", "a directory"), ("/dev/null", "a character device")])
def test_an_output_that_is_not_a_file_is_refused_even_when_forced(run_dir, tmp_path, out, kind):
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    out = tmp_path if out == "dir" else Path(out)
    r = limited_cli("compress", "--ckpt", run_dir, tmp_path / "in.txt", out, "--force")
    assert r.returncode == 2 and f"error: output: {out} is {kind}, not a regular file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# --- item 9: unwritable places, devices as input, chunk sizes --------------------------------------


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_an_unwritable_output_is_named_and_nothing_is_resumed(run_dir, packed, tmp_path, command):
    if os.access("/sys", os.W_OK) and os.geteuid() != 0 or not Path("/sys").is_dir():
        pytest.skip("needs /sys, where no one may create files")
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    source = tmp_path / "in.txt" if command == "compress" else packed
    out = Path("/sys") / f"prequel-test-{os.getpid()}.out"
    r = limited_cli(command, "--ckpt", run_dir, source, out)
    assert_refused(r, 4, f"error: cannot write the output {out}: ", "(nothing was written;", nothing_at=out)
    assert "resume" not in r.stderr and ".tmp" not in r.stderr


def test_a_full_disk_is_named_and_leaves_nothing(run_dir, packed, tmp_path):
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, packed, out, fsize=len(ORIGINAL) // 2)
    assert_refused(r, 4, f"error: cannot write the output {out}: File too large (nothing was written;", nothing_at=out)
    assert "resume" not in r.stderr


@pytest.fixture
def fifo(tmp_path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.mark.parametrize("command", [compress, decompress], ids=["compress", "decompress"])
@pytest.mark.parametrize(
    "source, kind",
    [
        ("/dev/zero", "a character device"),
        ("/dev/urandom", "a character device"),
        ("fifo", "a named pipe (FIFO)"),
        ("dir", "a directory"),
    ],
)
def test_a_device_as_input_is_refused_before_reading(request, run_dir, tmp_path, command, source, kind):
    path = request.getfixturevalue("fifo") if source == "fifo" else tmp_path if source == "dir" else Path(source)
    message = f"input: {path} is {kind}, not a regular file; give a regular file"
    with pytest.raises(DataError, match=re.escape(message)):
        command(run_dir, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, source", [("compress", "/dev/zero"), ("decompress", "fifo")])
def test_a_device_as_input_through_the_cli(request, run_dir, tmp_path, command, source):
    path = request.getfixturevalue("fifo") if source == "fifo" else Path(source)
    out = tmp_path / "out"
    r = limited_cli(command, "--ckpt", run_dir, path, out)
    kind = "a named pipe (FIFO)" if source == "fifo" else "a character device"
    assert_refused(r, 2, f"error: input: {path} is {kind}, not a regular file; give a regular file", nothing_at=out)


def test_an_input_larger_than_the_limit_allows_is_refused_unread(run_dir, tmp_path):
    huge, out = tmp_path / "huge.bin", tmp_path / "out.prq"
    with open(huge, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GB that cost no disk
    r = limited_cli("compress", "--ckpt", run_dir, huge, out)
    assert_refused(
        r,
        2,
        f"error: input: {huge} is 8.6 GB, more than the 1 GB allowed (compress holds about 16 bytes "
        f"per byte of input, and the memory limit is 16 GB: raise it with {MEMORY_ENV}",
        nothing_at=out,
    )
    r = limited_cli("decompress", "--ckpt", run_dir, huge, out)
    assert_refused(
        r, 2, f"error: input: {huge} is 8.6 GB, more than the 4 GB allowed (decompress holds its input", nothing_at=out
    )
    assert limited_cli("compress", "--ckpt", run_dir, "missing.txt", out).stderr.strip() == (
        "error: input: file not found: missing.txt"
    )


@pytest.mark.parametrize(
    "option, message",
    [
        ({"chunk_size": 0}, "--chunk-size must be in 1..32 (the model's block_size), got 0"),
        ({"chunk_size": 33}, "--chunk-size must be in 1..32 (the model's block_size), got 33"),
        ({"batch_chunks": 0}, "--batch-chunks must be >= 1, got 0"),
        ({"threads": 0}, "--threads must be >= 1, got 0"),
        ({"threads": 10**6}, "--threads must be in 1..1024, got 1000000"),
        ({"top_k": -1}, "--top-k must be >= 0, got -1"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_option_values_out_of_range_are_refused(run_dir, tmp_path, option, message):
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    with pytest.raises(ConfigError, match=re.escape(message)):
        compress(run_dir, tmp_path / "in.txt", tmp_path / "out.prq", **option)
    assert not (tmp_path / "out.prq").exists()


def test_a_batch_beyond_the_memory_limit_is_refused(run_dir, tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[: 4 * PER_BATCH])
    monkeypatch.setenv(MEMORY_ENV, "0.002")  # 2 MB: the model's run config fits, 256 chunks at once do not
    with pytest.raises(
        ConfigError, match=re.escape("--batch-chunks 256 (chunks coded at once) and the 32,768-byte input need about ")
    ) as e:
        compress(run_dir, tmp_path / "in.txt", tmp_path / "out.prq")
    assert str(e.value).endswith(
        f"more than the limit of 2 MB; if this machine has the memory, raise the limit: "
        f"{MEMORY_ENV}=1, or lower --batch-chunks"
    )
    compress(run_dir, tmp_path / "in.txt", tmp_path / "out.prq", batch_chunks=8)  # 8 chunks at a time fit
    assert read_stream(tmp_path / "out.prq").header["batch_chunks"] == 8


def test_a_zero_chunk_size_is_refused_not_replaced(run_dir, tmp_path):
    (tmp_path / "in.txt").write_bytes(ORIGINAL)
    out = tmp_path / "out.prq"
    r = limited_cli("compress", "--ckpt", run_dir, tmp_path / "in.txt", out, "--chunk_size", "0")
    assert_refused(r, 2, "error: --chunk-size must be in 1..32 (the model's block_size), got 0", nothing_at=out)

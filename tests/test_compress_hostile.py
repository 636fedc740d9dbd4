"""train.py compress / decompress against hostile files and paths: a header that lies about its
sizes, an output that is the input or the model, a device as input, a place nobody can write.

Each is refused with one clear line (no traceback) and the exit code train.py maps its kind to
(2 config/data, 3 stream, 4 OS), and no output file is left behind. The CLI runs in its own
process under a 4 GB address-space limit, so a check that comes after a large allocation fails
the test with a MemoryError instead of the message."""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import constriction
import numpy as np
import pytest

from prequel.checks.memory import MEMORY_ENV
from prequel.checks.settings import ConfigError
from prequel.compress.chunks import BudgetedDecoder, payload_capacity_bits
from prequel.compress.codec import compress, decompress
from prequel.compress.frozen import CompressError
from prequel.training.data import DataError
from prequel.training.stream import StreamError, encode_stream, read_stream
from tests.helpers import ROOT, assert_refused, trained_tiny_model

ADDRESS_SPACE = 4 << 30
ORIGINAL = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:1000]
PER_BATCH = 32 * 256  # tiny.yaml's block_size (the default chunk) times the default batch_chunks


def limited_cli(*args, env: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    """train.py as a user runs it, in a process that cannot map more than 4 GB (nor, with
    `fsize`, write a file larger than that many bytes)."""

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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_tiny_model(tmp_path_factory.mktemp("hostile-lmic"))


@pytest.fixture(scope="module")
def packed(run_dir, tmp_path_factory) -> Path:
    """ORIGINAL (1,000 bytes: one batch of 32 chunks) compressed with the tiny model."""
    tmp = tmp_path_factory.mktemp("packed")
    (tmp / "in.txt").write_bytes(ORIGINAL)
    compress(run_dir, tmp / "in.txt", tmp / "in.prq")
    return tmp / "in.prq"


def forge(packed: Path, tmp_path: Path, batches: int | None = None, words=None, **header) -> Path:
    """The compressed file with header fields (and the segment's batch count or words) edited;
    `encode_stream` recomputes the checksums, so only the reader's own checks can catch it."""
    stream = read_stream(packed)
    stream.header.update(header)
    if batches is not None:
        stream.segments[0].batches = batches
    if words is not None:
        stream.segments[0].words = words(stream.segments[0].words.copy())
    path = tmp_path / "forged.prq"
    path.write_bytes(encode_stream(stream))
    return path


# --- item 4: decompress does no more work than the file's own sizes justify ------------------------


def payload_words(packed: Path) -> int:
    return len(read_stream(packed).segments[0].words)


@pytest.mark.parametrize("tokens", [2**28, 10**9])
def test_a_token_count_the_payload_cannot_hold_is_refused_before_decoding(run_dir, packed, tmp_path, tokens):
    forged = forge(packed, tmp_path, tokens=tokens, original_bytes=tokens, batches=-(-tokens // PER_BATCH))
    out = tmp_path / "out.txt"
    started = time.perf_counter()
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(
        r,
        3,
        f"stream error: {forged}: header corrupted: tokens = {tokens:,}, but its payload of "
        f"{payload_words(packed):,} words can hold at most",
        nothing_at=out,
    )
    assert time.perf_counter() - started < 60


def test_a_token_count_beyond_the_memory_limit_is_refused(run_dir, packed, tmp_path):
    forged = forge(packed, tmp_path, tokens=10**12, original_bytes=10**12)
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(
        r,
        3,
        "the file's header asks for more memory than allowed: tokens = 1,000,000,000,000",
        f"raise the limit: {MEMORY_ENV}=",
        nothing_at=out,
    )


@pytest.mark.parametrize(
    "edits, message",
    [
        (
            {"tokens": 2**28},
            "header corrupted: tokens = 268,435,456 for original_bytes = 1,000 (every token stands for "
            "at least one byte)",
        ),
        (
            {"original_bytes": 1001},
            "header corrupted: original_bytes = 1,001 from tokens = 1,000 (a bytes token stands for at most 1 byte(s))",
        ),
        (
            {"tokens": 10**6, "original_bytes": 10**6},
            "header corrupted: tokens = 1,000,000 in batches of 8,192 make 123 batches, but the payload codes 1",
        ),
        (
            {"tokens": 0, "original_bytes": 0},
            "header corrupted: tokens = 0 (an empty original), but the file carries a payload",
        ),
        ({"chunk_size": 64, "batches": 1}, "header corrupted: chunk_size = 64, more than the model's block_size 32"),
    ],
    ids=["tokens>bytes", "bytes>tokens", "batches", "empty", "chunk_size"],
)
def test_sizes_that_disagree_are_refused_before_decoding(run_dir, packed, tmp_path, edits, message):
    forged = forge(packed, tmp_path, **edits)
    with pytest.raises(CompressError) as e:
        decompress(run_dir, forged, tmp_path / "out.txt")
    assert str(e.value) == f"{forged}: {message}"
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize(
    "edits, message",
    [
        (
            {"original_bytes": 2**40},
            "original_bytes = 1,099,511,627,776 need about 17.6 TB, more than the limit of 16 GB",
        ),
        (
            {"batch_chunks": 2**21, "tokens": 2**26, "original_bytes": 2**26, "batches": 1},
            "batch_chunks = 2,097,152 (chunks decoded at once) need about",
        ),
    ],
    ids=["original_bytes", "batch_chunks"],
)
def test_sizes_beyond_the_memory_limit_are_refused_before_decoding(run_dir, packed, tmp_path, edits, message):
    forged = forge(packed, tmp_path, **edits)
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(
        r,
        3,
        f"stream error: {forged}: the file's header asks for more memory than allowed: " + message,
        f"raise the limit: {MEMORY_ENV}=",
        nothing_at=out,
    )


CORRUPTED = (
    "the payload ran out",
    "the range coder met words that do not decode",
    "words left over",
    "decoded bytes do not match",
)  # what decoding a forged payload can meet first


@pytest.mark.parametrize("tokens", [8192, 10**6])
def test_a_token_count_the_bound_allows_stops_within_the_first_batch(run_dir, packed, tmp_path, tokens):
    """A count the payload could hold at best, with another batch layout: the first batch decodes
    garbage, and stops as soon as the coder or the payload's budget says so."""
    forged = forge(packed, tmp_path, tokens=tokens, original_bytes=tokens, batches=-(-tokens // PER_BATCH))
    out = tmp_path / "out.txt"
    started = time.perf_counter()
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(r, 3, f"stream error: {forged}: batch 1 (tokens 0..8,192): ", "(no output written)", nothing_at=out)
    assert any(what in r.stderr for what in CORRUPTED), r.stderr
    assert time.perf_counter() - started < 60


def test_more_batches_than_the_payload_codes_stop_when_its_words_run_out(run_dir, tmp_path):
    """One full batch compressed, three claimed: the first decodes as it was coded, the second
    finds the words spent (the coder alone would decode on from zeros)."""
    (tmp_path / "in.bin").write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:PER_BATCH])
    compress(run_dir, tmp_path / "in.bin", tmp_path / "in.prq")
    forged = forge(tmp_path / "in.prq", tmp_path, tokens=3 * PER_BATCH, original_bytes=3 * PER_BATCH, batches=3)
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(
        r,
        3,
        f"stream error: {forged}: batch 2 (tokens 8,192..16,384): the payload ran out: its "
        f"{payload_words(tmp_path / 'in.prq'):,} words",
        "the header claims more tokens than the file holds, or the payload is corrupted (no output written)",
        nothing_at=out,
    )


def test_a_payload_word_altered_with_its_crc_recomputed_is_reported(run_dir, packed, tmp_path):
    def alter(words):
        words[5] ^= 0xDEADBEEF
        return words

    forged = forge(packed, tmp_path, words=alter)
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(r, 3, f"stream error: {forged}: ", "corrupted", nothing_at=out)
    assert any(what in r.stderr for what in CORRUPTED), r.stderr


def test_the_payload_bound_never_refuses_a_real_stream():
    """What the budget counts is a lower bound of what the encoder spent, for any distribution:
    skewed, flat, degenerate (all mass on one symbol), unnormalised, two symbols or thousands."""
    model = constriction.stream.model.Categorical(perfect=False)
    rng = np.random.default_rng(0)
    for trial in range(300):
        alphabet, n = int(rng.choice([2, 3, 17, 256, 2000])), int(rng.integers(1, 300))
        logits = rng.normal(size=(n, alphabet)) * rng.choice([0.1, 1, 5, 30])
        logits[:, trial % alphabet] += 40 * (trial % 3 == 0)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        if trial % 7 == 0:
            probs[:, 1:], probs[:, 0] = 0, 1
        probs *= rng.uniform(0.5, 2) if trial % 5 == 0 else 1
        symbols = (probs.argmax(1) if trial % 2 else rng.integers(0, alphabet, n)).astype(np.int32)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(symbols, model, probs)
        decoder = BudgetedDecoder(encoder.get_compressed())
        assert decoder.code(None, probs).numpy().tolist() == symbols.tolist()
        assert decoder.bits <= decoder.capacity_bits == payload_capacity_bits(len(encoder.get_compressed()))


def test_decoding_past_the_last_word_runs_out():
    """constriction decodes on past the end of its words as if there were more; the budget does not."""
    model = constriction.stream.model.Categorical(perfect=False)
    probs = np.full((1, 256), 1 / 256)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(np.arange(100, dtype=np.int32), model, np.repeat(probs, 100, axis=0))
    decoder = BudgetedDecoder(encoder.get_compressed())
    with pytest.raises(StreamError, match="the payload ran out"):
        for _ in range(10**4):
            decoder.code(None, probs)


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

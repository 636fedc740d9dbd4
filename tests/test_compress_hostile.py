"""prequel compress / decompress against a header that lies about its sizes (files, paths and
devices: tests/test_compress_files.py).

Each is refused with one clear line (no traceback) and the exit code train.py maps its kind to
(2 config/data, 3 stream, 4 OS), and no output file is left behind. The CLI runs in its own
process under a 4 GB address-space limit, so a check that comes after a large allocation fails
the test with a MemoryError instead of the message."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prequel.alice.encoder import Encoder
from prequel.checks.memory import MEMORY_ENV
from prequel.compress.chunks import BudgetedDecoder, payload_capacity_bits
from prequel.compress.codec import compress, decompress
from prequel.compress.frozen import CompressError
from prequel.training.stream import StreamError, encode_stream, read_stream
from tests.helpers import ROOT, assert_refused, limited_cli

PER_BATCH = 32 * 256  # tiny.yaml's block_size (the default chunk) times the default batch_chunks


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


@pytest.mark.parametrize("tokens", [2**28, 2**29])
def test_a_token_count_at_odds_with_the_payloads_lanes_is_refused_before_decoding(run_dir, packed, tmp_path, tokens):
    forged = forge(packed, tmp_path, tokens=tokens, original_bytes=tokens, batches=-(-tokens // PER_BATCH))
    out = tmp_path / "out.txt"
    started = time.perf_counter()
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(
        r,
        3,
        f"stream error: {forged}: header corrupted: tokens = {tokens:,} in chunks of 32, 256 at a time, make "
        "256 rows, but the payload codes 32 lanes",
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
    "a lane's state is out of range",
    "but the segment codes",
    "words left over",
    "decoded bytes do not match",
)  # what decoding a forged payload can meet first


@pytest.mark.parametrize("tokens", [8192, 10**6])
def test_a_token_count_the_bound_allows_stops_within_the_first_batch(run_dir, packed, tmp_path, tokens):
    """A count the payload could hold at best, with another batch layout: the first batch decodes
    garbage, and stops as soon as the coder or the payload's budget says so."""
    layout = {"batch_chunks": 32, "batches": -(-tokens // 1024)}  # the payload's 32 lanes: one per chunk
    forged = forge(packed, tmp_path, tokens=tokens, original_bytes=tokens, **layout)
    out = tmp_path / "out.txt"
    started = time.perf_counter()
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(r, 3, f"stream error: {forged}: batch 1 (tokens 0..1,024): ", "(no output written)", nothing_at=out)
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
        words[5] ^= 0xBEEF
        return words

    forged = forge(packed, tmp_path, words=alter)
    out = tmp_path / "out.txt"
    r = limited_cli("decompress", "--ckpt", run_dir, forged, out)
    assert_refused(r, 3, f"stream error: {forged}: ", "corrupted", nothing_at=out)
    assert any(what in r.stderr for what in CORRUPTED), r.stderr


def test_the_payload_bound_never_refuses_a_real_stream():
    """What the budget counts never exceeds what the words hold, for any distribution: skewed,
    flat, degenerate (all mass on one symbol), unnormalised, two symbols or thousands, one lane or many."""
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
        probs = torch.from_numpy(probs).float()
        symbols = torch.from_numpy(probs.argmax(1).numpy() if trial % 2 else rng.integers(0, alphabet, n))
        width = int(rng.choice([1, 4, 64]))  # lanes: a column of `width` rows at a time
        lanes = np.arange(n) % width
        encoder = Encoder()
        encoder.code(probs, symbols, lanes)
        decoder = BudgetedDecoder(encoder.words(), encoder.lanes)
        for at in range(0, n, width):
            rows = slice(at, at + width)
            assert decoder.code(probs[rows], None, lanes[rows]).tolist() == symbols[rows].tolist()
        assert decoder.exhausted() and decoder.bits <= payload_capacity_bits(len(encoder.words()))
        assert decoder.capacity_bits == payload_capacity_bits(len(encoder.words())) + 32 * encoder.lanes


def test_decoding_past_the_last_word_runs_out():
    """A sure symbol costs almost nothing, so rANS alone could decode on for a long time; the budget stops it."""
    uniform = torch.full((1, 256), 1 / 256)
    encoder = Encoder()
    encoder.code(uniform.expand(100, 256), torch.arange(100), np.zeros(100, dtype=np.int64))
    decoder = BudgetedDecoder(encoder.words(), 1)
    with pytest.raises(StreamError, match="the payload ran out"):
        for _ in range(10**4):
            decoder.code(uniform, None, np.zeros(1, dtype=np.int64))

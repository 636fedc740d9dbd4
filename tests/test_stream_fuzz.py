"""The stream reader under fuzzing and forgery: only `StreamError`, bounded time and memory, no output.

Every truncation and bit flip of a real stream, random bytes, forged counts and lengths with valid
checksums, and headers forged field by field are refused by name, and `verify` of a damaged stream
writes nothing. (Faults during training and resume: tests/test_reliability.py.)
"""

import re
import shutil
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prequel.training.stream import (
    MAGIC,
    MAX_JSON_BYTES,
    VERSION,
    StreamError,
    decode_stream,
    encode_stream,
    read_stream,
)
from prequel.verify.verifier import STREAM_NAME
from tests.helpers import files_under, run_main

# --- the stream reader under fuzzing ---------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def rejected(data: bytes) -> str:
    """decode_stream must refuse `data` with StreamError, within bounded memory; returns the message."""
    tracemalloc.start()
    try:
        decode_stream(data)
    except StreamError as e:
        return str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 4 * len(data) + (1 << 20), f"decode_stream allocated {peak:,} bytes for {len(data):,}"
    raise AssertionError("a damaged stream was accepted")


def sections(data: bytes) -> dict[str, int]:
    """Byte offsets of each part of a stream file (to aim at its boundaries)."""
    at = {"version": 8, "header length": 10}
    n = struct.unpack_from("<I", data, 10)[0]
    at["header"], at["header crc"], at["segment count"] = 14, 14 + n, 18 + n
    pos = 22 + n
    for i in range(struct.unpack_from("<I", data, 18 + n)[0]):
        at[f"segment {i} framing"], at[f"segment {i} words"] = pos, pos + 20
        pos += 20 + 2 * struct.unpack_from("<Q", data, pos + 12)[0]
    at["payload crc"], at["trailer length"] = pos, pos + 4
    at["trailer"] = pos + 8
    at["trailer crc"] = pos + 8 + struct.unpack_from("<I", data, pos + 4)[0]
    return at


def test_every_truncation_is_refused_and_names_what_is_missing(real):
    data = real["stream"]
    text = " | ".join({rejected(data[:n]) for n in range(len(data))})
    at = sections(data)
    assert len(at) > 12 and all(0 < v < len(data) for v in at.values())
    for what in (
        "magic needs",
        "version needs",
        "header length needs",
        "header needs",
        "header checksum needs",
        "segment count needs",
        "segments cannot fit",
        r"segment \d+ batches needs",
        r"segment \d+ lanes needs",
        r"segment \d+ length needs",
        r"segment \d+ claims \d+ words",
        "payload checksum needs",
        "trailer length needs",
        "trailer needs",
        "trailer checksum needs",
    ):
        assert re.search(what, text), f"no truncation was refused at '{what}'"
    print(f"{len(data):,} truncations refused, {len(at)} section boundaries")


def test_every_single_bit_flip_is_refused(real):
    data = bytearray(real["stream"])
    for bit in range(8 * len(data)):
        data[bit // 8] ^= 1 << bit % 8
        try:
            decode_stream(bytes(data))
        except StreamError:
            pass
        else:
            raise AssertionError(f"flipping bit {bit} went unnoticed")
        data[bit // 8] ^= 1 << bit % 8
    print(f"{8 * len(data):,} single-bit flips refused")


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data):
    rejected(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_after_a_valid_magic_are_refused(tail):
    rejected(MAGIC + struct.pack("<H", VERSION) + tail)


@FUZZ
@given(st.data())
def test_bit_flips_truncations_and_splices_of_a_real_stream_are_refused(real, data):
    raw = bytearray(real["stream"])
    at = sections(bytes(raw))
    for bit in data.draw(st.lists(st.integers(0, 8 * len(raw) - 1), min_size=0, max_size=8, unique=True)):
        raw[bit // 8] ^= 1 << bit % 8
    boundary = data.draw(st.sampled_from(sorted(at.values()) + [len(raw)]))
    cut = max(0, min(len(raw), boundary + data.draw(st.integers(-5, 5))))
    tail = data.draw(st.binary(max_size=32))
    mutated = bytes(raw[:cut]) + tail
    if mutated == real["stream"]:
        return
    rejected(mutated)


def forged(
    header: bytes, table: list[tuple[int, int, int, bytes]], count: int | None, trailer: bytes, crc_ok: bool
) -> bytes:
    """A stream with any framing numbers, its checksums recomputed so only the framing can fail."""
    payload = struct.pack("<I", len(table) if count is None else count)
    payload += b"".join(struct.pack("<QIQ", b, lanes, n) + words for b, lanes, n, words in table)
    crc = zlib.crc32(payload) if crc_ok else zlib.crc32(payload) ^ 1
    sec = lambda body: struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))  # noqa: E731
    return MAGIC + struct.pack("<H", VERSION) + sec(header) + payload + struct.pack("<I", crc) + sec(trailer)


U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
JSONISH = st.one_of(
    st.just(b"{}"),
    st.just(b'{"a":1}'),
    st.just(b"[]"),
    st.just(b"null"),
    st.just(b"\xff\xfe"),
    st.just(b"[" * 50_000 + b"]" * 50_000),
    st.just(b'{"a":' * 50_000),
    st.binary(max_size=64),
)


@FUZZ
@given(
    JSONISH,
    st.lists(st.tuples(U64, U32, U64, st.binary(max_size=64)), max_size=6),
    st.one_of(st.none(), U32),
    JSONISH,
    st.booleans(),
)
def test_forged_counts_and_lengths_with_valid_checksums_fail_cleanly(header, table, count, trailer, crc_ok):
    data = forged(header, table, count, trailer, crc_ok)
    tracemalloc.start()
    try:
        stream = decode_stream(data)
    except StreamError:
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 4 * len(data) + (1 << 20), f"decode_stream allocated {peak:,} bytes for {len(data):,}"
    # Accepted: then it was a consistent file, and it round-trips.
    again = decode_stream(encode_stream(stream))
    assert again.header == stream.header and again.trailer == stream.trailer
    assert [(s.batches, s.lanes, s.words.tolist()) for s in again.segments] == [
        (s.batches, s.lanes, s.words.tolist()) for s in stream.segments
    ]


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty file", b"", "stream truncated: magic needs 8 bytes but only 0 remain"),
        (
            "u32 max segment count",
            lambda: forged(b"{}", [], 2**32 - 1, b"{}", True),
            "4,294,967,295 segments cannot fit",
        ),
        (
            "u64 max segment length",
            lambda: forged(b"{}", [(1, 1, 2**64 - 1, b"abcd")], None, b"{}", True),
            "segment 0 claims 18,446,744,073,709,551,615 words",
        ),
        (
            "segment of 0 batches",
            lambda: forged(b"{}", [(0, 1, 2, b"abcdefgh")], None, b"{}", True),
            "segment 0 codes 0 batches",
        ),
        (
            "segment of 0 lanes",
            lambda: forged(b"{}", [(1, 0, 2, b"abcdefgh")], None, b"{}", True),
            "segment 0 codes 1 batches on 0 lanes",
        ),
        (
            "lanes without their states",
            lambda: forged(b"{}", [(1, 3, 2, b"abcdefgh")], None, b"{}", True),
            "every lane's state takes four words",
        ),
        (
            "header length 4 GiB",
            MAGIC + struct.pack("<HI", VERSION, 2**32 - 1),
            f"claims 4294967295 bytes (limit {MAX_JSON_BYTES})",
        ),
        (
            "JSON nested 100,000 deep",
            lambda: forged(b"[" * 100_000 + b"]" * 100_000, [], None, b"{}", True),
            "header corrupted: not valid JSON",
        ),
        ("header a JSON list", lambda: forged(b"[1]", [], None, b"{}", True), "header corrupted: not a JSON object"),
        ("header not UTF-8", lambda: forged(b"\xff\xfe", [], None, b"{}", True), "header corrupted: not valid JSON"),
        (
            "bytes after the trailer",
            lambda: forged(b"{}", [], None, b"{}", True) + b"\0",
            "1 unexpected bytes after the trailer",
        ),
    ],
)
def test_forged_framing_is_refused_by_name(name, data, message):
    data = data() if callable(data) else data
    assert message in rejected(data)


def test_read_stream_refuses_a_wrong_file_before_reading_it_all(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # sparse: 1 GiB that costs no disk
        f.truncate(1 << 30)
    tracemalloc.start()
    with pytest.raises(StreamError, match="not a prequel stream"):
        read_stream(big)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    with pytest.raises(StreamError, match="no stream file"):
        read_stream(tmp_path)


@settings(max_examples=40, deadline=None, database=None)
@given(st.data())
def test_verify_of_a_damaged_stream_writes_nothing(real, data):
    """Through the CLI's entry point: exit code 3, the reason, no decoded file, no temp file."""
    raw = bytearray(real["stream"])
    kind = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if kind == "flip":
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        raw[bit // 8] ^= 1 << bit % 8
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw = bytearray(data.draw(st.binary(max_size=256)))
    bad = real["root"] / "damaged"
    shutil.rmtree(bad, ignore_errors=True)
    bad.mkdir()
    (bad / STREAM_NAME).write_bytes(bytes(raw))
    rc, out, err = run_main("verify", bad)
    assert rc == 3 and err.startswith("stream error: "), (rc, out, err)
    assert files_under(bad) == {STREAM_NAME}


def test_verify_of_a_stream_whose_trailer_lies_decodes_but_writes_nothing(real, tmp_path):
    stream = decode_stream(real["stream"])
    stream.trailer["data_sha256"] = "0" * 64
    (tmp_path / STREAM_NAME).write_bytes(encode_stream(stream))
    rc, _, err = run_main("verify", tmp_path, "--out", tmp_path / "out.txt")
    assert rc == 3 and "decoded bytes do not match the original's sha256" in err
    assert files_under(tmp_path) == {STREAM_NAME}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data_tokens", "4000", "header corrupted: data_tokens must be a count of tokens, got '4000'"),
        (
            "data_tokens",
            10**30,
            "header corrupted: data_tokens must be a count of tokens, got 1000000000000000000000000000000",
        ),
        ("data_tokens", 2**47, "the header claims 140,737,488,355,328 tokens: more than this machine can hold"),
        ("environment", [1], "header corrupted: environment and tokenizer must be JSON objects"),
        ("tokenizer", {"name": "bytes", "blob": 7}, "header corrupted: tokenizer: "),
        ("tokenizer", {"name": "bpe", "blob": "00ff"}, "header corrupted: tokenizer: "),
        ("config", {"model": {"n_layer": -1}}, "header corrupted: model.n_layer: must be > 0, got -1"),
    ],
)
def test_a_header_forged_with_valid_checksums_is_refused_before_decoding(real, tmp_path, field, value, message):
    """The checksums only catch accidents; a consistent-looking header must still be checked."""
    stream = decode_stream(real["stream"])
    stream.header[field] = value
    (tmp_path / STREAM_NAME).write_bytes(encode_stream(stream))
    rc, _, err = run_main("verify", tmp_path)
    assert rc == 3 and message in err, err
    assert files_under(tmp_path) == {STREAM_NAME}

"""The code length is a fact: a real stream, decoded in another process, gives the bytes back."""

import json

import pytest
import torch

from prequel.alice.encoder import Encoder, encode_known
from prequel.alice.session import train
from prequel.training.coding import Decoder, code_batch, intervals, logit_intervals
from prequel.training.data import IGNORE
from prequel.training.stream import decode_stream, encode_stream, read_stream
from tests.helpers import run_cli, tiny_config

# Words of the stream for a fixed batch: a change that alters bits must change this on purpose.
# fmt: off
GOLDEN_WORDS = [
    86, 25825, 31692, 55022, 10, 30082, 33019, 52736, 5, 45862, 30042, 42705,
    60920, 13333, 59054, 17480, 40424, 7872, 49832, 38533, 0, 54282, 0, 0,
]
# fmt: on


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 256, generator=g) * 3
    targets = torch.randint(0, 256, (3, 5), generator=g)
    targets[2, 3:] = IGNORE  # a short last span
    return logits, targets


def round_trip(logits: torch.Tensor, targets: torch.Tensor) -> Encoder:
    """Encode column by column, decode into placeholders, check; the encoder, for its words."""
    encoder = Encoder()
    code_batch(lambda t: logits[:, t], targets.clone(), encoder)
    decoded = torch.where(targets == IGNORE, IGNORE, 0)
    decoder = Decoder(encoder.words(), encoder.lanes)
    code_batch(lambda t: logits[:, t], decoded, decoder)
    assert torch.equal(decoded, targets) and decoder.exhausted()
    return encoder


def test_coder_golden_words_and_round_trip():
    logits, targets = fixed_batch()
    encoder = round_trip(logits, targets)
    assert encoder.lanes == 3 and encoder.words().tolist() == GOLDEN_WORDS


def test_known_logits_code_in_one_pass_to_the_same_words_as_the_column_loop():
    logits, targets = fixed_batch()
    encoder = Encoder()
    spans = logit_intervals(logits.flatten(0, 1), targets.flatten()).view(3, 5, 2)  # Alice's: every row at once
    encode_known(spans, targets, encoder)
    assert encoder.words().tolist() == GOLDEN_WORDS
    rows = torch.randn(64, 256) * 4  # the premise: a row's interval ignores the other rows
    probs, symbols = torch.softmax(rows, -1), torch.randint(0, 256, (64,))
    assert torch.equal(intervals(probs, symbols)[5:9], intervals(torch.softmax(rows[5:9], -1), symbols[5:9]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with the stream on, shared by the tests below."""
    root = tmp_path_factory.mktemp("stream")
    text = root / "text.txt"
    text.write_bytes(open("data/tinyshakespeare.txt", "rb").read()[:4000])
    summary = train(tiny_config(text, root / "run", "--trainer.checkpoint_every_n_steps", "10"))
    return root, text, summary


def test_verify_in_a_separate_process_gives_back_the_bytes_and_weights(trained):
    root, text, summary = trained
    out = root / "decoded.txt"
    r = run_cli("verify", root / "run", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text.read_bytes()
    assert "final weights are bitwise equal to the encoder's final checkpoint" in r.stdout
    assert "by checked single steps: 32; by f's full forwards: 0\n" in r.stdout  # prequel/verify/fast_decode.py
    n, ideal, actual = summary["data/tokens"], summary["code/data_bits"], summary["code/stream_bits"]
    assert summary["stream/segments"] == 4  # sealed at each of 3 checkpoints and at the end
    assert actual - ideal <= summary["stream/padding_bits"] + 1e-3 * n
    assert actual <= n + ideal
    assert f"{actual:,} bits" in r.stdout


def corrupt(trained, name: str, edit) -> tuple:
    root, _, _ = trained
    data = bytearray((root / "run" / "stream.prequel").read_bytes())
    bad = root / name
    bad.mkdir(exist_ok=True)
    (bad / "stream.prequel").write_bytes(bytes(edit(data)))
    out = bad / "decoded.txt"
    return run_cli("verify", bad, "--out", out), out


def _flip(data: bytearray, at: int) -> bytearray:
    data[at] ^= 0x10
    return data


def _first_payload_byte(data: bytearray) -> int:
    header_len = int.from_bytes(data[10:14], "little")
    return 14 + header_len + 4 + 4 + 20  # header, its crc, segment count, segment framing


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("truncated", lambda d: d[: len(d) // 2], "stream truncated"),
        ("payload_flip", lambda d: _flip(d, _first_payload_byte(d) + 9), "payload corrupted"),
        ("header_flip", lambda d: _flip(d, 40), "header corrupted"),
        ("version", lambda d: d[:8] + b"\x09\x00" + d[10:], "stream format version 9"),
        ("version_1", lambda d: d[:8] + b"\x01\x00" + d[10:], "commit 50e249a is the last that verifies it"),
        ("not_a_stream", lambda d: b"hello world" + d, "not a prequel stream"),
    ],
)
def test_bad_streams_fail_with_their_own_error_and_no_output(trained, name, edit, message):
    r, out = corrupt(trained, name, edit)
    assert r.returncode == 3, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_thread_count_mismatch_is_refused_and_named(trained):
    root, _, _ = trained
    out = root / "threads.txt"
    r = run_cli("verify", root / "run", "--threads", "2", "--out", out)
    assert r.returncode == 3
    assert "environment mismatch" in r.stderr and "num_threads: stream has 1, here 2" in r.stderr
    assert not out.exists()


def test_payload_tampering_that_passes_the_crc_is_caught_by_decoding(trained):
    """Re-encode the stream with one payload word changed (a valid file, wrong content)."""
    root, _, _ = trained
    stream = read_stream(root / "run" / "stream.prequel")
    stream.segments[0].words[5] ^= 1 << 4
    forged = root / "forged"
    forged.mkdir()
    (forged / "stream.prequel").write_bytes(encode_stream(stream))
    r = run_cli("verify", forged, "--out", forged / "out.txt")
    assert r.returncode == 3
    assert "decoded tokens differ from the encoder's by batch 5" in r.stderr
    assert not (forged / "out.txt").exists()


def test_stream_header_records_what_changes_bits(trained):
    root, _, _ = trained
    stream = decode_stream((root / "run" / "stream.prequel").read_bytes())
    env = stream.header["environment"]
    for key in ("torch", "num_threads", "device", "lightning", "numpy"):
        assert key in env
    assert env["num_threads"] == 1 and env["torch"] == torch.__version__
    assert stream.header["config"]["seed"] == 1337 and stream.header["data_tokens"] == 4000
    assert "run_dir" not in stream.header["config"]
    assert stream.trailer["coded_tokens"] == 4000
    assert len(stream.header["code_hash"]) == 64
    assert json.dumps(stream.header)  # plain JSON, readable by any tool


@pytest.mark.parametrize("procedure", ["full", "incremental"])
def test_ngram_replay_and_both_procedures_decode_in_another_process(text_file, tmp_path, procedure):
    run_dir = tmp_path / procedure
    summary = train(
        tiny_config(
            text_file,
            run_dir,
            "--model.ngram_order",
            "3",
            "--data.replay_steps",
            "1",
            "--stream.procedure",
            procedure,
            "--trainer.checkpoint_every_n_steps",
            "20",
        )
    )
    out = tmp_path / "out.txt"
    r = run_cli("verify", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text_file.read_bytes()
    assert summary["code/stream_bits"] - summary["code/data_bits"] <= summary["stream/padding_bits"] + 4


def test_context_before_each_chunk_with_ngram_and_replay_decodes_in_another_process(text_file, tmp_path):
    run_dir = tmp_path / "context"
    summary = train(
        tiny_config(
            text_file,
            run_dir,
            "--model.ngram_order",
            "3",
            "--data.replay_steps",
            "1",
            "--data.context",
            "4",
            "--data.curriculum",
            "strided",
            "--trainer.checkpoint_every_n_steps",
            "20",
        )
    )
    out = tmp_path / "out.txt"
    r = run_cli("verify", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text_file.read_bytes()
    assert summary["code/stream_bits"] - summary["code/data_bits"] <= summary["stream/padding_bits"] + 4

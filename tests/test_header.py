"""The typed stream headers: the JSON layout of real headers survives a round trip (f's
`TrainingHeader.from_dict`), and a forged header is refused by the checks (prequel/checks/stream_header.py
`checked_header`), naming what is wrong."""

import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from prequel.alice.corpus import order_labels
from prequel.alice.difficulty import labels_to_header
from prequel.alice.encoder import write_stream
from prequel.alice.fit import environment, stream_header
from prequel.alice.tokenizing import build_tokenizer
from prequel.checks import stream_header as headers
from prequel.checks.stream_header import CompressHeader
from prequel.compress.codec import compress
from prequel.models.gpt import GPT, GPTConfig
from prequel.program import code_hash
from prequel.training.header import TrainingHeader
from prequel.training.stream import Stream, StreamError, read_stream
from tests.helpers import ROOT, tiny_config

TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:4000]


def through_a_file(header: dict, tmp_path) -> dict:
    """The header as a reader gets it: written to a stream file and read back."""
    write_stream(tmp_path / "s.prequel", Stream(header, [], {}))
    return read_stream(tmp_path / "s.prequel").header


@pytest.fixture(scope="module")
def bpe_difficulty(tmp_path_factory):
    """A real training header with every field, the transmitted order included."""
    tmp = tmp_path_factory.mktemp("header")
    config = tiny_config(
        tmp / "text.txt",
        tmp / "run",
        "--data.tokenizer",
        "bpe",
        "--data.vocab_size",
        "300",
        "--data.curriculum",
        "difficulty",
        "--data.difficulty_levels",
        "8",
    )
    tokenizer = build_tokenizer("bpe", data=TEXT, vocab_size=300)
    tokens = tokenizer.encode(TEXT)
    labels = order_labels(config.data, config.model.block_size, tokenizer, tokens)
    return config, tokenizer, len(tokens), labels


def test_training_header_keeps_the_stream_layout(bpe_difficulty, tmp_path):
    config, tokenizer, n_tokens, labels = bpe_difficulty
    d = through_a_file(stream_header(config, tokenizer, n_tokens, labels), tmp_path)
    # The layout every stream written so far has: new code must still read old streams.
    assert set(d) == {"config", "tokenizer", "data_tokens", "code_hash", "environment", "precision", "compile", "order"}
    assert d["tokenizer"] == {"name": "bpe", "blob": tokenizer.serialize().hex()}
    assert d["data_tokens"] == n_tokens and d["code_hash"] == code_hash() and d["environment"] == environment(config)
    assert (d["precision"], d["compile"], d["order"]) == ("32-true", False, labels_to_header(labels))

    header = TrainingHeader.from_dict(d)
    assert header.to_dict() == d
    assert header.tokenizer_blob == tokenizer.serialize() and header.data_tokens == n_tokens
    assert header.program().data.curriculum == "difficulty" and torch.equal(header.labels(), labels)
    assert header.tokenizer().serialize() == tokenizer.serialize()


def test_a_header_without_an_order_has_no_order_key(text_file, tmp_path):
    config = tiny_config(text_file, tmp_path / "run")
    d = through_a_file(stream_header(config, build_tokenizer("bytes"), 4000), tmp_path)
    assert "order" not in d and d["tokenizer"] == {"name": "bytes", "blob": ""}
    header = headers.checked_header(d)
    assert header.order is None and header.labels() is None and header.to_dict() == d


def test_the_committed_stream_header_round_trips():
    d = read_stream(ROOT / "tests" / "fixtures" / "portable.prequel").header
    assert headers.checked_header(d).to_dict() == d


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data_tokens", "4000", "header corrupted: data_tokens must be a count of tokens, got '4000'"),
        ("data_tokens", 0, "header corrupted: data_tokens must be a count of tokens, got 0"),
        ("data_tokens", True, "header corrupted: data_tokens must be a count of tokens, got True"),
        ("environment", [1], "header corrupted: environment and tokenizer must be JSON objects"),
        ("tokenizer", "bytes", "header corrupted: environment and tokenizer must be JSON objects"),
        ("tokenizer", {"name": "bytes", "blob": 7}, "header corrupted: tokenizer: blob: must be a hex string, got 7"),
        ("tokenizer", {"name": "bytes", "blob": "zz"}, "header corrupted: tokenizer: blob: not hex"),
        ("tokenizer", {"blob": ""}, "header corrupted: tokenizer: name: missing"),
        ("code_hash", None, "header corrupted: code_hash: missing"),  # (None: the key deleted)
        ("code_hash", "ABC", "header corrupted: code_hash: must be a sha256 hex digest, got 'ABC'"),
        ("precision", 32, "header corrupted: precision: must be a string, got 32"),
        ("compile", "no", "header corrupted: compile: must be true or false, got 'no'"),
        ("config", [], "header corrupted: config: must be a JSON object, got []"),
        ("config", {"model": {"n_layer": -1}}, "header corrupted: model.n_layer: must be > 0, got -1"),
        ("order", 5, "header corrupted: order: must be a base64 string, got 5"),
        ("order", "AAAA", "header corrupted: order: transmitted order is not valid"),
        ("order", None, "header corrupted: a difficulty order needs its transmitted levels (header['order'])"),
    ],
)
def test_a_forged_training_header_is_refused_naming_the_field(bpe_difficulty, field, value, message):
    d = stream_header(*bpe_difficulty)
    if value is None:
        del d[field]
    else:
        d[field] = value
    with pytest.raises(StreamError) as e:
        headers.checked_header(d)
    assert str(e.value).startswith(message), str(e.value)


def test_a_tokenizer_blob_that_does_not_parse_is_refused_when_built(bpe_difficulty):
    d = stream_header(*bpe_difficulty)
    d["tokenizer"]["blob"] = "00ff"
    header = headers.checked_header(d)  # hex, and only the tokenizer can read its content
    with pytest.raises(StreamError, match="^header corrupted: tokenizer: "):
        headers.checked_tokenizer(header)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict:
    """A real compressed file's header: an untrained tiny byte model compresses a few bytes."""
    tmp = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
    gpt = GPT(config)
    state = {f"model.{k}": v for k, v in gpt.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": asdict(config)}}, tmp / "model.ckpt")
    (tmp / "in.bin").write_bytes(TEXT[:100])
    compress(tmp / "model.ckpt", tmp / "in.bin", tmp / "in.prq", batch_chunks=3, top_k=5)
    return read_stream(tmp / "in.prq").header


def test_compress_header_keeps_the_file_layout(compressed):
    assert set(compressed) == {
        "kind",
        "format",
        "original_bytes",
        "tokens",
        "chunk_size",
        "batch_chunks",
        "top_k",
        "model",
        "tokenizer",
        "environment",
        "dtype",
    }
    assert set(compressed["model"]) == {"checkpoint", "sha256"} and set(compressed["tokenizer"]) == {"name", "sha256"}
    header = CompressHeader.from_dict(compressed)
    assert header.to_dict() == compressed
    assert (header.kind, header.original_bytes, header.tokens, header.chunk_size) == ("compress", 100, 100, 16)
    assert (header.batch_chunks, header.top_k, header.model_checkpoint, header.dtype) == (3, 5, "model.ckpt", "float32")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kind", None, "not a compressed file (a training stream? use prequel verify)"),
        ("tokens", -1, "header corrupted: tokens: must be in 0..2**48 - 1, got -1"),
        ("original_bytes", 2**60, "header corrupted: original_bytes: must be in 0..2**48 - 1, got 1152921504606846976"),
        ("chunk_size", 0, "header corrupted: chunk_size: must be in 1..2**48 - 1, got 0"),
        ("top_k", "5", "header corrupted: top_k: must be an integer, got '5'"),
        ("format", 1.0, "header corrupted: format: must be an integer, got 1.0"),
        ("model", {"checkpoint": "model.ckpt"}, "header corrupted: model: sha256: missing"),
        (
            "tokenizer",
            {"name": "bytes", "sha256": "0" * 63},
            "header corrupted: tokenizer: sha256: must be a sha256 hex",
        ),
        ("environment", [1], "header corrupted: environment: must be a JSON object, got [1]"),
        ("dtype", None, "header corrupted: dtype: missing"),
    ],
)
def test_a_forged_compress_header_is_refused_naming_the_field(compressed, field, value, message):
    d = {**compressed, field: value}
    if value is None:
        del d[field]
    with pytest.raises(StreamError) as e:
        CompressHeader.from_dict(d)
    assert str(e.value).startswith(message), str(e.value)


def test_reading_a_header_needs_no_torch():
    code = "import sys, training.header; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

"""Hostile inputs: a forged stream header, a device as data, a setting that would exhaust the
machine. Each is refused with one clear line naming what is wrong, before anything large is
allocated: the CLI runs in its own process under a 4 GB address-space limit, so a check that
comes after the allocation fails the test (with a MemoryError, not the message)."""

import base64
import os
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from prequel.alice.corpus import read_corpus
from prequel.alice.difficulty import labels_to_header
from prequel.checks.memory import DEFAULT_MAX_MEMORY_GB, MEMORY_ENV, MemoryLimitError, check_memory, parameter_count
from prequel.checks.settings import ConfigError, load_config
from prequel.models.gpt import GPT, GPTConfig
from prequel.training.data import DataError
from prequel.training.orders import labels_from_header
from prequel.training.stream import Stream, encode_stream, read_stream
from tests.helpers import ROOT, TINY, assert_refused, limited_cli

FIXTURE = ROOT / "tests" / "fixtures" / "portable.prequel"  # tiny.yaml, sequential, 3,000 byte tokens
FIXTURE_CHUNKS = -(-3000 // 32)  # ceil(data_tokens / block_size) = 94 levels a difficulty order would carry


def forge(tmp_path: Path, **edits) -> Path:
    """The committed stream with header fields edited (config__model__n_layer: a nested key);
    `encode_stream` recomputes the checksums, so only the header's own checks can catch it."""
    stream = read_stream(FIXTURE)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("__")
        node = stream.header
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "forged.prequel"
    path.write_bytes(encode_stream(stream))
    return path


def verify_forged(tmp_path: Path, env: dict | None = None, **edits) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "decoded.txt"
    return limited_cli("verify", forge(tmp_path, **edits), "--out", out, env=env), out


# --- item 2: the transmitted order is decompressed only as far as the header's sizes allow -------


def zlib_bomb(gib: int) -> str:
    """A valid zlib stream of `gib` GiB of zeros (~1 MB per GiB), base64 as in a header. Built from
    one full-flushed block repeated (each starts with an empty window), with the true adler32."""
    zero = bytes(1 << 20)
    z = zlib.compressobj(9)
    first = z.compress(zero) + z.flush(zlib.Z_FULL_FLUSH)  # (with the 2-byte zlib header)
    again = z.compress(zero) + z.flush(zlib.Z_FULL_FLUSH)
    end = z.flush()[:-4]
    n = gib << 30
    adler = (n % 65521) << 16 | 1  # adler32 of n zero bytes: a stays 1, b = n
    return base64.b64encode(first + again * ((gib << 10) - 1) + end + struct.pack(">I", adler)).decode()


@pytest.fixture(scope="module")
def bomb() -> str:
    return zlib_bomb(4)  # 4 GiB once expanded: more than the whole address space allowed


def test_the_bomb_is_what_it_claims():
    inflater, data, size = zlib.decompressobj(), base64.b64decode(zlib_bomb(1)), 0
    while not inflater.eof:  # all 1 GiB, 64 MB at a time (the adler32 is checked at the end)
        part = inflater.decompress(data, 64 << 20)
        data, size = inflater.unconsumed_tail, size + len(part)
        assert not part.strip(b"\0")
    assert size == 1 << 30


def test_an_order_for_a_curriculum_without_one_is_refused_unread(bomb, tmp_path):
    r, out = verify_forged(tmp_path, order=bomb)
    assert_refused(
        r,
        3,
        "header corrupted: order: the sequential curriculum transmits no order (only data.curriculum: difficulty does)",
        nothing_at=out,
    )


def test_a_difficulty_order_is_expanded_only_to_its_chunk_count(bomb, tmp_path):
    r, out = verify_forged(tmp_path, order=bomb, config__data__curriculum="difficulty")
    assert_refused(
        r,
        3,
        "header corrupted: order: transmitted order is not valid: it decompresses to more than "
        f"the {4 * FIXTURE_CHUNKS} bytes of 4-byte levels for {FIXTURE_CHUNKS} chunks",
        nothing_at=out,
    )


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            torch.zeros(FIXTURE_CHUNKS - 1, dtype=torch.long),
            f"{4 * (FIXTURE_CHUNKS - 1)} bytes of levels, expected {4 * FIXTURE_CHUNKS} ({FIXTURE_CHUNKS} chunks × 4)",
        ),
        # a level of 2**32 - 1 would make order_bits' bincount allocate 32 GB
        (
            torch.tensor([2**32 - 1] + [0] * (FIXTURE_CHUNKS - 1)),
            "a chunk has level 4294967295, but there are only 4 levels",
        ),
    ],
)
def test_a_difficulty_order_must_fit_the_chunks_and_levels(tmp_path, labels, message):
    r, out = verify_forged(tmp_path, order=labels_to_header(labels), config__data__curriculum="difficulty")
    assert_refused(r, 3, "header corrupted: order: transmitted order is not valid: " + message, nothing_at=out)


def test_labels_from_header_bounds_itself_without_a_count():
    labels = torch.arange(10) % 3
    assert torch.equal(labels_from_header(labels_to_header(labels), 10, 3), labels)
    with pytest.raises(ValueError, match="decompresses to more than the 67,108,864 bytes"):
        labels_from_header(zlib_bomb(1))  # no count given: MAX_UNSIZED_LEVELS levels at most
    with pytest.raises(ValueError, match="truncated or has bytes after its end"):
        labels_from_header(base64.b64encode(zlib.compress(bytes(40))[:-6]).decode())


# --- item 3: every size in a header (or a config) is held to the memory limit -------------------

TOO_BIG = [  # (header edits, the setting the refusal names)
    ({"config__model__n_layer": 100000}, "model.n_layer = 100000: training would need about "),
    ({"config__model__n_embd": 2**22}, "model.n_embd = 4194304: training would need about "),
    ({"config__model__block_size": 2**31}, "model.block_size = 2147483648: training would need about "),
    ({"config__data__replay_steps": 10**12}, "data.replay_steps = 1000000000000: training would need about "),
    (
        {"config__data__tokenizer": "bpe", "config__data__vocab_size": 65536, "config__model__ngram_order": 6},
        "model.ngram_order = 6: training would need about ",
    ),
]


@pytest.mark.parametrize("edits, message", TOO_BIG, ids=lambda v: "+".join(v) if isinstance(v, dict) else None)
def test_a_header_beyond_the_memory_limit_is_refused_naming_the_setting(tmp_path, edits, message):
    r, out = verify_forged(tmp_path, **edits)
    assert_refused(
        r,
        3,
        "stream error: the stream's header asks for more memory than allowed: " + message,
        f"more than the limit of {DEFAULT_MAX_MEMORY_GB:g} GB",
        f"raise the limit: {MEMORY_ENV}=",
        nothing_at=out,
    )


def test_a_header_claiming_more_tokens_than_the_limit_allows_is_refused(tmp_path):
    r, out = verify_forged(tmp_path, data_tokens=2**47)
    assert_refused(
        r,
        3,
        "stream error: the header claims 140,737,488,355,328 tokens: more than this machine can hold: "
        "decoding them needs 140.7 TB of disk in ",
        "(set TMPDIR to a larger disk)",
        nothing_at=out,
    )


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"config__trainer__num_threads": 100000}, "header corrupted: trainer.num_threads: must be in 0..1024"),
        (
            {"environment__num_threads": 100000},
            "header corrupted: environment: num_threads: must be an integer in 1..1024",
        ),
    ],
)
def test_a_header_thread_count_is_bounded(tmp_path, edits, message):
    r, out = verify_forged(tmp_path, **edits)
    assert_refused(r, 3, message, nothing_at=out)


def test_a_compressed_files_token_count_is_held_to_the_limit(tmp_path):
    header = {
        "kind": "compress",
        "format": 1,
        "original_bytes": 2**46,
        "tokens": 2**46,
        "chunk_size": 64,
        "batch_chunks": 256,
        "top_k": 0,
        "model": {"checkpoint": "last.ckpt", "sha256": "0" * 64},
        "tokenizer": {"name": "bytes", "sha256": "0" * 64},
        "environment": {"num_threads": 1},
        "dtype": "float32",
    }
    packed, out = tmp_path / "forged.pqz", tmp_path / "out.bin"
    packed.write_bytes(encode_stream(Stream(header, [], {"data_sha256": "0" * 64})))
    r = limited_cli("decompress", "--ckpt", tmp_path / "none.ckpt", packed, out)
    assert_refused(
        r,
        3,
        "the file's header asks for more memory than allowed: tokens = 70,368,744,177,664 need about",
        nothing_at=out,
    )


def test_the_limit_is_the_users_to_raise(monkeypatch, text_file, tmp_path):
    check_memory(load_config(TINY), 10**6)  # every shipped config is far below the default limit
    monkeypatch.setenv(MEMORY_ENV, "0.001")  # 1 MB
    with pytest.raises(
        MemoryLimitError, match="more than the limit of 1 MB; .* raise the limit: PREQUEL_MAX_MEMORY_GB=1"
    ):
        load_config(TINY)
    monkeypatch.setenv(MEMORY_ENV, "200")
    assert load_config(TINY, ["--model.n_layer", "100000"]).model.n_layer == 100000  # nothing was allocated
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ConfigError, match="PREQUEL_MAX_MEMORY_GB: expected a number of gigabytes > 0, got 'lots'"):
        load_config(TINY)
    r = limited_cli("--config", TINY, "--data.path", text_file, "--run_dir", tmp_path / "r", env={MEMORY_ENV: "0.001"})
    assert_refused(r, 2, "training would need about", "more than the limit of 1 MB", nothing_at=tmp_path / "r")


@pytest.mark.parametrize(
    "model",
    [
        GPTConfig(vocab_size=300, block_size=16, n_layer=3, n_head=2, n_embd=24),
        GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True, tie_embeddings=False),
        GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, positions="rope", ngram_order=3),
    ],
)
def test_the_estimate_counts_the_parameters_the_model_has(model):
    assert parameter_count(model, model.vocab_size) == GPT(model).num_params()


# --- item 5: only regular files are read, and only as much as the limit allows --------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        yield path


@pytest.mark.parametrize(
    "source, kind",
    [
        ("/dev/zero", "a character device"),
        ("/dev/urandom", "a character device"),
        ("fifo", "a named pipe (FIFO)"),
        ("unix_socket", "a socket"),
    ],
)
def test_a_device_as_data_is_refused_before_reading(request, tmp_path, source, kind):
    path = Path(source) if source.startswith("/") else request.getfixturevalue(source)
    r = limited_cli("--config", TINY, "--data.path", path, "--run_dir", tmp_path / "r")
    assert_refused(r, 2, f"error: data.path: {path} is {kind}, not a regular file", nothing_at=tmp_path / "r")


@pytest.mark.parametrize("source, kind", [("dir", "a directory"), ("fifo", "a named pipe (FIFO)")])
def test_a_config_file_that_is_not_a_file_is_refused(request, tmp_path, source, kind):
    path = tmp_path if source == "dir" else request.getfixturevalue(source)
    r = limited_cli("--config", path, "--run_dir", tmp_path / "r")
    assert_refused(r, 2, f"error: config file: {path} is {kind}, not a regular file", nothing_at=tmp_path / "r")


def test_a_corpus_read_into_memory_is_refused_past_the_limit_unread(tmp_path, monkeypatch):
    # (Training reads its corpus into token shards on disk, at any size: tests/test_shards.py.
    # What reads one into memory, compress and a size sweep's baselines, still has the limit.)
    (tmp_path / "docs").mkdir()
    for name in "ab":
        (tmp_path / "docs" / name).write_bytes(bytes(600_000))
    monkeypatch.setenv(MEMORY_ENV, "0.016")  # a 1 MB corpus at most
    with pytest.raises(DataError, match="the 2 files of .*docs are 1.2 MB in all, more than the 1 MB allowed"):
        read_corpus(str(tmp_path / "docs"))
    assert len(read_corpus(str(tmp_path / "docs" / "a"))) == 600_000


# --- item 7: float spellings, thread counts, strategies and devices -------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1e-3", 1e-3), ("1E-3", 1e-3), ("1e+3", 1e3), (".5", 0.5), ("2", 2.0), ("3.0e-4", 3e-4), ("+1.5E2", 150.0)],
)
def test_every_float_spelling_is_a_float(text, value, tmp_path):
    assert load_config(TINY, ["--optim.lr", text]).optim.lr == value
    (tmp_path / "c.yaml").write_text(f"optim:\n  lr: {text}\n  eps: {text}\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.optim.lr, config.optim.eps) == (value, value)


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("optim.lr", "inf", "optim.lr: expected a finite number, got 'inf'"),
        ("optim.lr", "-inf", "optim.lr: expected a finite number, got '-inf'"),
        ("optim.lr", ".nan", "optim.lr: expected a finite number, got nan"),
        ("optim.lr", "1e-3x", "optim.lr: expected a number, got '1e-3x'"),
        ("optim.lr", "-1e-3", "optim.lr: must be > 0, got '-1e-3'"),
        ("data.batch_size", "1e3", "data.batch_size: expected an integer, got '1e3'"),  # floats only
    ],
)
def test_what_is_not_a_finite_float_is_still_refused(key, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"--{key}", text])
    assert str(e.value) == message


def test_a_string_field_keeps_a_float_spelling():
    config = load_config(TINY, ["--name", "1e-3", "--data.path", "1E+3"])
    assert (config.name, config.data.path) == ("1e-3", "1E+3")


def test_thread_counts_are_bounded(tmp_path, text_file):
    assert load_config(TINY, ["--trainer.num_threads", "1024"]).trainer.num_threads == 1024
    r = limited_cli(
        "--config", TINY, "--data.path", text_file, "--trainer.num_threads", "100000", "--run_dir", tmp_path / "r"
    )
    assert_refused(
        r,
        2,
        "error: trainer.num_threads: must be in 0..1024 (one OS thread each), got 100000",
        nothing_at=tmp_path / "r",
    )


def test_ddp_spawn_with_a_stream_is_refused_before_the_run_directory(tmp_path, text_file):
    r = limited_cli(
        "--config", TINY, "--data.path", text_file, "--trainer.strategy", "ddp_spawn", "--run_dir", tmp_path / "r"
    )
    assert_refused(
        r,
        2,
        "error: trainer.strategy: ddp_spawn cannot write a stream",
        "use trainer.strategy: ddp",
        nothing_at=tmp_path / "r",
    )
    assert (
        load_config(TINY, ["--trainer.strategy", "ddp_spawn", "--stream.enabled", "false"]).trainer.strategy
        == "ddp_spawn"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_run_without_a_gpu_is_refused_before_the_run_directory(tmp_path, text_file):
    r = limited_cli(
        "--config", TINY, "--data.path", text_file, "--trainer.accelerator", "gpu", "--run_dir", tmp_path / "r"
    )
    assert_refused(
        r,
        2,
        "error: trainer.accelerator: gpu, but torch sees no CUDA device on this machine (use trainer.accelerator: cpu)",
        nothing_at=tmp_path / "r",
    )


def test_a_header_cannot_make_verify_replay_without_bound(tmp_path):
    r, out = verify_forged(tmp_path, config__trainer__max_epochs=10**12)
    assert_refused(r, 3, "header corrupted: trainer.max_epochs: must be in 1..1000, got 1000000000000", nothing_at=out)


def test_a_header_carries_a_config_checked_as_trainings_is(tmp_path):
    """config_from_dict (verify's) and load_config (training's) run the same checks."""
    r, out = verify_forged(tmp_path, config__trainer__strategy="ddp_spawn")
    assert_refused(r, 3, "header corrupted: trainer.strategy: ddp_spawn cannot write a stream", nothing_at=out)

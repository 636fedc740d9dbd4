"""train.py compress / decompress: a frozen model + arithmetic coding, exact bytes back."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from prequel.alice.encoder import write_stream
from prequel.alice.session import train
from prequel.compress.codec import compress, decompress
from prequel.compress.frozen import CompressError, load_frozen
from prequel.models.gpt import GPT, GPTConfig
from prequel.models.kv_cache import KVCache
from prequel.training.stream import Stream, read_stream
from tests.helpers import ROOT, SHARED_CORPORA, run_cli, tiny_config

CHUNK = 32  # configs/tiny.yaml block_size


def round_trip(run_dir: Path, tmp_path: Path, data: bytes, **options) -> dict:
    original, packed, back = tmp_path / "in.bin", tmp_path / "in.prq", tmp_path / "out.bin"
    original.write_bytes(data)
    report = compress(run_dir, original, packed, **options)
    decompress(run_dir / "checkpoints" / "last.ckpt", packed, back)
    assert back.read_bytes() == data
    return report


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_steps_match_the_full_forward(positions):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, head="norm", positions=positions)
    ).eval()
    idx = torch.randint(0, 51, (3, 16))
    cache = KVCache(model.config, batch=3)
    steps = torch.stack([model.forward_step(idx[:, t], cache) for t in range(16)], dim=1)
    torch.testing.assert_close(steps, model(idx), rtol=1e-4, atol=1e-5)  # close, not bitwise (DESIGN.md)
    with pytest.raises(ValueError, match="KV cache is full"):
        model.forward_step(idx[:, 0], cache)


@pytest.mark.parametrize(
    "name, data",
    [
        ("empty", b""),
        ("one byte", b"\x00"),
        ("random bytes", os.urandom(3000)),
        ("not a multiple of the chunk size", b"To be, or not to be: " * 10 + b"xyz"),
    ],
)
def test_round_trip_exact(run_dir, tmp_path, name, data):
    report = round_trip(run_dir, tmp_path, data)
    assert report["original_bytes"] == len(data)
    assert report["chunks"] == -(-len(data) // CHUNK)


def test_round_trip_many_batches_short_chunks_and_top_k(run_dir, tmp_path):
    data = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[5000:6001] + os.urandom(99)
    full = round_trip(run_dir, tmp_path, data, chunk_size=13, batch_chunks=7)
    assert full["chunks"] == -(-len(data) // 13)
    for k in (1, 5, 255):  # k = 1: escapes everywhere; 255: the escape path has one symbol left
        top_k = round_trip(run_dir, tmp_path, data, chunk_size=13, batch_chunks=7, top_k=k)
        assert top_k["top_k"] == k
    assert top_k["payload_bytes"] <= full["payload_bytes"] + 64  # nothing is lost, up to quantisation


def test_round_trip_shared_corpus_file(run_dir, tmp_path):
    alice = SHARED_CORPORA / "canterbury" / "alice29.txt"
    if not alice.is_file():
        pytest.skip(f"{alice} not present")
    data = alice.read_bytes()[:30_000]
    report = round_trip(run_dir, tmp_path, data)
    assert report["raw_rate"] < 1.0, "a model trained on English compresses English a little"
    assert report["adjusted_rate"] == pytest.approx((report["compressed_bytes"] + report["param_bytes"]) / len(data))
    assert report["param_bytes"] == 4 * load_frozen(run_dir).gpt.num_params()  # fp32, tied matrix once
    assert {"gzip_rate", "bzip2_rate", "xz_rate", "compress_MBps", "bits_per_byte"} <= report.keys()


def test_wrong_checkpoint_is_named_and_leaves_no_output(run_dir, tmp_path):
    (tmp_path / "in.bin").write_bytes(b"hello world")
    compress(run_dir, tmp_path / "in.bin", tmp_path / "in.prq")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["model.ln_f.weight"] += 1e-3
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CompressError, match="wrong checkpoint: .*compressed with last.ckpt.*other.ckpt"):
        decompress(other, tmp_path / "in.prq", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(CompressError, match="no checkpoint at"):
        decompress(tmp_path / "missing.ckpt", tmp_path / "in.prq", tmp_path / "out.bin")


def test_older_checkpoint_without_model_hyperparameters_uses_the_run_config(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = {"vocab_size": 256}
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "old" / "checkpoints" / "last.ckpt")
    with pytest.raises(CompressError, match="does not say which model it holds"):
        load_frozen(tmp_path / "old")
    (tmp_path / "old" / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    assert load_frozen(tmp_path / "old").model_sha256 == load_frozen(run_dir).model_sha256


def test_truncated_and_corrupted_files_fail_clearly(run_dir, tmp_path):
    (tmp_path / "in.bin").write_bytes(os.urandom(500))
    compress(run_dir, tmp_path / "in.bin", tmp_path / "in.prq")
    good = (tmp_path / "in.prq").read_bytes()
    bad = tmp_path / "bad.prq"
    cases = {
        "truncated": (good[:-7], "truncated"),
        "payload byte flipped": (good[:-200] + bytes([good[-200] ^ 1]) + good[-199:], "corrupted"),
        "header byte flipped": (good[:30] + bytes([good[30] ^ 1]) + good[31:], "corrupted"),
        "not a prequel file": (b"hello, I am a text file", "not a prequel stream"),
    }
    for name, (data, message) in cases.items():
        bad.write_bytes(data)
        with pytest.raises(CompressError, match=message):
            decompress(run_dir, bad, tmp_path / "out.bin")
        assert not (tmp_path / "out.bin").exists(), name


def test_refuses_training_streams_and_other_environments(run_dir, tmp_path):
    write_stream(tmp_path / "train.prequel", Stream({"config": {}}, [], {}))
    with pytest.raises(CompressError, match="not a compressed file.*verify"):
        decompress(run_dir, tmp_path / "train.prequel", tmp_path / "out.bin")
    (tmp_path / "in.bin").write_bytes(b"some bytes")
    compress(run_dir, tmp_path / "in.bin", tmp_path / "in.prq")
    stream = read_stream(tmp_path / "in.prq")
    stream.header["environment"]["torch"] = "0.0.1"
    write_stream(tmp_path / "elsewhere.prq", stream)
    with pytest.raises(CompressError, match="environment mismatch.*torch"):
        decompress(run_dir, tmp_path / "elsewhere.prq", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    r = decompress(run_dir, tmp_path / "elsewhere.prq", tmp_path / "out.bin", allow_env_mismatch=True)
    assert r["environment_differences"] and (tmp_path / "out.bin").read_bytes() == b"some bytes"


def test_bpe_model_round_trip_with_top_k(tmp_path):
    """A BPE checkpoint without a stream: its tokenizer is retrained from the run's corpus."""
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:6000])
    train(
        tiny_config(
            text,
            tmp_path / "run",
            "--trainer.max_steps",
            "3",
            "--stream.enabled",
            "false",
            "--data.tokenizer",
            "bpe",
            "--data.vocab_size",
            "300",
        )
    )
    data = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[9000:10000] + bytes(range(256))
    for k in (0, 4):
        report = round_trip(tmp_path / "run", tmp_path, data, top_k=k)
        assert report["tokens"] < len(data) and report["tokenizer_bytes"] > 0


def test_cli_round_trip_and_wrong_checkpoint(run_dir, tmp_path):
    data = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:2000]
    (tmp_path / "in.txt").write_bytes(data)
    r = run_cli("compress", "--ckpt", run_dir, tmp_path / "in.txt", tmp_path / "in.prq", "--chunk_size", "16")
    assert r.returncode == 0, r.stderr
    assert "adjusted rate" in r.stdout and "xz -9e" in r.stdout and "MB/s" in r.stdout
    r = run_cli("decompress", "--ckpt", run_dir, tmp_path / "in.prq", tmp_path / "out.txt")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(data).hexdigest() in r.stdout and (tmp_path / "out.txt").read_bytes() == data
    r = run_cli("decompress", "--ckpt", tmp_path / "in.txt", tmp_path / "in.prq", tmp_path / "again.txt")
    assert r.returncode == 3 and "is not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "again.txt").exists()

"""Data at any size: streamed corpora, token shards on disk, their cache (prequel/alice/shards.py,
training/tokens.py), and a run on a corpus larger than the memory limit that is killed, resumed and verified."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from prequel.alice.shards import MANIFEST, open_corpus, safe_cut, token_shards
from prequel.alice.tokenizing import train_bpe
from prequel.checks.memory import MEMORY_ENV
from prequel.training.bpe import BPETokenizer
from prequel.training.tokenizer import ByteTokenizer
from prequel.training.tokens import TokenShards, dtype_for
from prequel.verify.verifier import STREAM_NAME
from tests.helpers import ROOT, TINY, run_cli
from tests.test_reliability import kill_after_checkpoint, resumes_from_step

SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()


def _hostile_text(n: int, seed: int = 0) -> bytes:
    """English, then bytes of every class in runs: spaces, newlines, digits, UTF-8, invalid bytes."""
    rng = random.Random(seed)
    parts = [SHAKESPEARE[: n // 2]]
    alphabet = [b" ", b"  ", b"\n", b"\n\n ", b"\t", b"42", b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"!?", b"word", b"'s"]
    while sum(map(len, parts)) < n:
        parts.append(rng.choice(alphabet))
    return b"".join(parts)[:n]


def test_pieces_cut_where_bpe_cuts_so_tokens_and_merges_equal_the_whole(tmp_path):
    data = _hostile_text(60_000)
    (tmp_path / "a.txt").write_bytes(data[:25_000])
    (tmp_path / "b.txt").write_bytes(data[25_000:])  # two files: a piece may span their seam
    corpus = open_corpus(str(tmp_path))
    pieces = list(corpus.pieces(size=97))  # tiny blocks: hundreds of cuts
    assert len(pieces) > 300 and b"".join(pieces) == data
    assert corpus.sha256() == __import__("hashlib").sha256(data).hexdigest()
    whole = train_bpe(data, 400)
    streamed = train_bpe(corpus, 400)  # counted piece by piece
    assert streamed.merges == whole.merges
    bpe = BPETokenizer(whole.merges)
    joined = torch.cat([bpe.encode(p) for p in pieces])
    assert torch.equal(joined, bpe.encode(data))
    assert safe_cut(b"aaaa") == 0 and safe_cut(b"ab 12") == 2 and safe_cut(b"x\n y") == 1


def test_shards_read_and_write_across_their_boundaries(tmp_path):
    assert [dtype_for(v).itemsize for v in (256, 257, 65_536, 65_537, 200_000)] == [1, 2, 2, 4, 4]
    ids = np.random.default_rng(0).integers(0, 50_000, 1_000)
    shards = TokenShards.create(tmp_path, len(ids), dtype_for(50_000), shard_tokens=64)
    assert len(shards.arrays) == 16 and len(shards.arrays[-1]) == 1_000 - 15 * 64
    shards[np.arange(1_000)] = ids
    shards.flush()
    again = TokenShards.open(tmp_path, 1_000, dtype_for(50_000), shard_tokens=64)
    pos = torch.randint(0, 1_000, (7, 33))  # spread over many shards
    assert torch.equal(again[pos], torch.from_numpy(ids)[pos])
    assert torch.equal(again[60:200], torch.from_numpy(ids[60:200]))
    assert torch.equal(torch.cat(list(again.slices(step=300))), torch.from_numpy(ids))
    cow = again.copy_on_write()
    cow[torch.tensor([0, 999])] = torch.tensor([7, 7])
    assert cow[torch.tensor([0, 999])].tolist() == [7, 7]
    assert TokenShards.open(tmp_path, 1_000, dtype_for(50_000), 64)[torch.tensor([0])].item() == ids[0]  # untouched


def test_the_cache_tokenises_once_and_a_damaged_shard_is_rebuilt_with_a_notice(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("PREQUEL_CACHE", str(tmp_path / "cache"))  # (other tests may have cached this text)
    path = tmp_path / "text.txt"
    path.write_bytes(SHAKESPEARE[:20_000])
    corpus, tokenizer = open_corpus(str(path)), ByteTokenizer()
    first = token_shards(corpus, tokenizer, shard_tokens=4_096)
    assert "tokenising" in capfd.readouterr().err
    assert len(first) == 20_000 and len(first.arrays) == 5 and first.dtype == np.uint8
    assert bytes(first[0:20_000].numpy().astype(np.uint8)) == SHAKESPEARE[:20_000]
    second = token_shards(open_corpus(str(path)), tokenizer, shard_tokens=4_096)
    assert capfd.readouterr().err == ""  # from the cache: not tokenised again
    assert second.directory == first.directory
    shard = first.directory / "00002.bin"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    rebuilt = token_shards(open_corpus(str(path)), tokenizer, shard_tokens=4_096)
    notice = [line for line in capfd.readouterr().err.splitlines() if "token cache" in line]
    assert notice == [
        f"prequel: token cache {first.directory}: shard 00002.bin is missing or truncated; tokenising again"
    ]
    assert torch.equal(
        rebuilt[0:20_000], torch.from_numpy(np.frombuffer(SHAKESPEARE[:20_000], np.uint8).astype(np.int64))
    )
    flipped = bytearray(shard.read_bytes())
    flipped[5] ^= 1  # the same length, one bit off
    shard.write_bytes(bytes(flipped))
    token_shards(open_corpus(str(path)), tokenizer, shard_tokens=4_096)
    assert "shard 00002.bin does not match its sha256 (damaged)" in capfd.readouterr().err
    (first.directory / MANIFEST).unlink()  # a build killed before its manifest
    token_shards(open_corpus(str(path)), tokenizer, shard_tokens=4_096)
    assert "it has no manifest (a build was interrupted)" in capfd.readouterr().err


def test_a_run_on_a_corpus_larger_than_the_memory_limit_is_killed_resumed_and_verifies(tmp_path):
    """36 MB of data under a 30 MB limit: trained for 12 steps, SIGKILLed after a checkpoint, the
    same command resumes it, and the partial pass's stream decodes in another process."""
    rng = np.random.default_rng(1)
    words = np.array([b"the ", b"king ", b"of ", b"wind ", b"and ", b"sea\n", b"night, "], dtype=object)
    text = tmp_path / "big.txt"
    with open(text, "wb") as f:
        for _ in range(12):
            f.write(b"".join(words[rng.integers(0, len(words), 700_000)]))
    size = text.stat().st_size
    assert size > 30e6
    env = {**os.environ, MEMORY_ENV: "0.03"}
    run_dir = tmp_path / "run"
    args = ["--config", TINY, "--data.path", text, "--trainer.max_steps", "12"]
    args += ["--trainer.checkpoint_every_n_steps", "3", "--logging.progress_bar", "false", "--run_dir", run_dir]
    cmd = [sys.executable, "train.py", *map(str, args)]
    os.environ[MEMORY_ENV] = "0.03"  # (inherited by the processes the helpers start)
    try:
        kill_after_checkpoint(cmd, run_dir, 2, random.Random(0))
        assert resumes_from_step(run_dir) >= 3
        resumed = run_cli(*args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "prequel: tokenising" not in resumed.stderr  # the same command again: from the cache
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["data/tokens"] == 12 * 4 * 32 and not summary["data/complete"]
        verify = subprocess.run(
            [sys.executable, "train.py", "verify", str(run_dir / STREAM_NAME)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert verify.returncode == 0, verify.stderr[-3000:]
    finally:
        os.environ.pop(MEMORY_ENV)


def test_a_zipped_named_dataset_is_extracted_checked_and_cached(tmp_path, monkeypatch):
    """enwik8/enwik9 come as zips: the member is extracted to the cache and its sha256 checked
    (a stand-in zip served in place of the network, which tests never touch)."""
    import hashlib
    import io
    import zipfile

    from prequel.alice import corpus as corpus_module
    from prequel.training.data import DataError

    data = SHAKESPEARE[:50_000]
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", data)
    monkeypatch.setenv("PREQUEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        corpus_module.DATASETS, "enwik8", ("http://x/enwik8.zip", hashlib.sha256(data).hexdigest(), "enwik8")
    )
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(archive.read_bytes()))
    corpus = open_corpus("dataset:enwik8")
    assert corpus.size == len(data) and b"".join(corpus.blocks()) == data
    assert (tmp_path / "cache" / "enwik8").read_bytes() == data
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"not a zip"))
    assert open_corpus("dataset:enwik8").size == len(data)  # cached: not downloaded again
    (tmp_path / "cache" / "enwik8").unlink()
    with pytest.raises(DataError, match="dataset 'enwik8' from http://x/enwik8.zip is not a zip holding enwik8"):
        open_corpus("dataset:enwik8")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind

"""Corpora, tokenizers and curriculum orders: exact bytes, every token once, costs in |f|."""

import math
import os
import urllib.error
from pathlib import Path

import pytest
import torch

from prequel.alice.corpus import fetch_dataset, read_corpus, read_documents
from prequel.alice.difficulty import difficulty_labels, labels_to_header, order_bits
from prequel.alice.tokenizing import build_tokenizer
from prequel.checks.settings import BPE_MAX_VOCAB, ConfigError, load_config
from prequel.program import f_parts, packed_bits
from prequel.training.bpe import ALPHABET, BPETokenizer
from prequel.training.curriculum import CURRICULA, PACINGS, chunk_spans, plan_batches, with_replay
from prequel.training.data import DataError, Tape, context_known
from prequel.training.orders import labels_from_header, pace
from prequel.training.tokenizer import TokenizerError
from tests.helpers import SHARED_CORPORA, TINY, run_cli, tiny_config

TEXT = (Path(__file__).parents[1] / "data" / "tinyshakespeare.txt").read_bytes()[:20000]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return build_tokenizer("bpe", data=TEXT, vocab_size=400)


# --- corpora ---------------------------------------------------------------------------------


def test_file_is_read_byte_exact(tmp_path):
    raw = b"line one\r\nline two\n\xff\xfe not utf-8 \x00\x80"
    (tmp_path / "f.bin").write_bytes(raw)
    assert read_corpus(str(tmp_path / "f.bin")) == raw


def test_directory_and_glob_keep_documents_whole_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second\n")
    (tmp_path / "a.txt").write_bytes(b"first\r\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"third")
    (tmp_path / ".hidden").write_bytes(b"never")
    docs = read_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/c.txt"]
    assert read_corpus(str(tmp_path)) == b"first\r\nsecond\nthird"
    assert read_corpus(str(tmp_path / "*.txt")) == b"first\r\nsecond\n"
    assert read_corpus(str(tmp_path / "**" / "*.txt")) == b"first\r\nsecond\nthird"


def test_bad_corpora_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found.*nope.txt"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no files"):
        read_corpus(str(tmp_path / "*.none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no files"):
        read_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "zero.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        read_corpus(str(tmp_path / "empty"))
    locked = tmp_path / "locked.txt"
    locked.write_bytes(b"secret")
    real_read = Path.read_bytes

    def read_bytes(self):  # tests run as root, where chmod 000 does not stop reading
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match="cannot read .*locked.txt: Permission denied"):
        read_corpus(str(locked))


def test_corpus_shorter_than_one_sequence_fails_clearly(tmp_path):
    from prequel.alice.session import train

    (tmp_path / "short.txt").write_bytes(b"too short")
    with pytest.raises(DataError, match="less than one sequence"):
        train(tiny_config(tmp_path / "short.txt", tmp_path / "run"))


def test_named_dataset_offline_error_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREQUEL_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)  # never touch the network in tests
    with pytest.raises(DataError, match="cannot download dataset 'alice29'.*offline.*data.path"):
        read_corpus("dataset:alice29")
    with pytest.raises(DataError, match="unknown dataset 'nope' \\(known: alice29"):
        read_corpus("dataset:nope")
    # A cached copy with the right sha256 is used without the network; a wrong one is not.
    bundled = read_corpus(None)
    (tmp_path / "cache").mkdir(exist_ok=True)  # (the failed download made it)
    (tmp_path / "cache" / "tinyshakespeare").write_bytes(bundled)
    assert read_corpus("dataset:tinyshakespeare") == bundled
    (tmp_path / "cache" / "tinyshakespeare").write_bytes(bundled[:-1])
    with pytest.raises(DataError, match="offline"):
        fetch_dataset("tinyshakespeare")


# --- tokenizers ------------------------------------------------------------------------------


def test_bytes_tokenizer_round_trips_and_costs_nothing():
    raw = os.urandom(4096)
    tok = build_tokenizer("bytes")
    assert tok.decode(tok.encode(raw)) == raw
    assert tok.serialize() == b"" and f_parts(None, "", tok.serialize())["tokenizer"] == 0


def test_bpe_round_trips_random_bytes_exactly(bpe):
    assert len(set(ALPHABET)) == 256
    torch.manual_seed(0)
    for raw in [os.urandom(50_000), bytes(range(256)) * 4, b"", b"\x00", b" \n\n  x\xc3\x28\xed\xa0\x80 "]:
        ids = bpe.encode(raw)
        assert bpe.decode(ids) == raw
        assert int(bpe.nbytes_per_id()[ids].sum()) == len(raw)


def test_bpe_round_trips_every_shared_corpus(bpe):
    files = sorted(p for p in SHARED_CORPORA.rglob("*") if p.is_file()) if SHARED_CORPORA.is_dir() else []
    if not files:
        pytest.skip(f"no shared corpora at {SHARED_CORPORA}")
    for path in files:
        raw = path.read_bytes()
        ids = bpe.encode(raw)
        assert bpe.decode(ids) == raw, path
        assert len(ids) < len(raw) or len(raw) < 100, path  # it does compress text
        assert int(bpe.nbytes_per_id()[ids].sum()) == len(raw)


def test_bpe_training_is_deterministic_and_restores_from_its_serialisation(bpe):
    again = build_tokenizer("bpe", data=TEXT, vocab_size=400)
    assert again.serialize() == bpe.serialize()
    restored = build_tokenizer("bpe", serialized=bpe.serialize())
    assert restored.vocab_size == bpe.vocab_size == 400
    assert torch.equal(restored.encode(TEXT), bpe.encode(TEXT))
    assert torch.equal(restored.nbytes_per_id(), bpe.nbytes_per_id())


def test_bpe_part_of_f_is_its_compressed_serialisation(bpe):
    import bz2
    import lzma

    blob = bpe.serialize()
    xz = lzma.compress(
        blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    )
    smaller = min(8 * len(xz), 8 * len(bz2.compress(blob, 9)))
    assert f_parts(None, "", blob)["tokenizer"] == packed_bits(blob) == 1 + smaller
    assert 0 < packed_bits(blob) < 8 * len(blob)


def test_pretrained_tokenizer_file(tmp_path, bpe):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        [TEXT.decode()],
        trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("bpe", vocab_size=256, pretrained=str(tmp_path / "tokenizer.json"))
    raw = TEXT + os.urandom(1000)
    assert tok.decode(tok.encode(raw)) == raw and tok.vocab_size == 300
    assert build_tokenizer("bpe", serialized=tok.serialize()).serialize() == tok.serialize()
    hf = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    hf.save(str(tmp_path / "words.json"))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        build_tokenizer("bpe", pretrained=str(tmp_path / "words.json"))
    with pytest.raises(TokenizerError, match="cannot read"):
        build_tokenizer("bpe", pretrained=str(tmp_path / "nope.json"))


def test_impossible_vocabularies_fail_clearly():
    with pytest.raises(TokenizerError, match="larger than BPE can learn.*choose at most"):
        build_tokenizer("bpe", data=b"abababab abab", vocab_size=5000)
    with pytest.raises(TokenizerError, match="256 < vocab_size"):
        build_tokenizer("bpe", data=TEXT, vocab_size=256)
    with pytest.raises(ConfigError, match="bytes tokenizer has exactly 256"):
        load_config(TINY, ["--data.vocab_size", "512"])
    with pytest.raises(ConfigError, match="bpe needs 256 < vocab_size"):
        load_config(TINY, ["--data.tokenizer", "bpe"])
    with pytest.raises(ConfigError, match="bpe needs 256 < vocab_size"):
        load_config(TINY, ["--data.tokenizer", "bpe", "--data.vocab_size", str(BPE_MAX_VOCAB + 1)])
    with pytest.raises(ConfigError, match="tokenizer_file needs data.tokenizer: bpe"):
        load_config(TINY, ["--data.tokenizer_file", "t.json"])


# --- curriculum ------------------------------------------------------------------------------


def _labels(n_tokens: int, seq_len: int, levels: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chunks = [
        bytes(torch.randint(0, 1 + 255 * (i % 3 == 0), (seq_len,), generator=g).tolist())
        for i in range(len(chunk_spans(n_tokens, seq_len)))
    ]
    return difficulty_labels(chunks, "zlib", levels)


def _plan(curriculum: str, n: int = 1003, seq_len: int = 16, batch: int = 4, seed: int = 7, **options):
    labels = _labels(n, seq_len) if curriculum == "difficulty" else None
    return plan_batches(n, seq_len, batch, curriculum, seed, labels=labels, **options)


@pytest.mark.parametrize("curriculum", CURRICULA)
@pytest.mark.parametrize("pacing", PACINGS)
def test_every_order_trains_each_token_exactly_once_and_is_reproducible(curriculum, pacing):
    n, seq_len, batch = 1003, 16, 4
    batches = _plan(curriculum, n, seq_len, batch, pacing=pacing, warmup_tokens=500)
    seen = torch.zeros(n, dtype=torch.long)
    for spans in batches:
        assert spans.shape[1] == 2 and 1 <= len(spans) <= batch
        assert int(spans[:, 1].min()) >= 1 and int(spans[:, 1].max()) <= seq_len
        for start, length in spans.tolist():
            seen[start : start + length] += 1
    assert torch.all(seen == 1), "a permutation of the data: every token exactly once"
    again = _plan(curriculum, n, seq_len, batch, pacing=pacing, warmup_tokens=500)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_strided_rows_continue_the_rows_of_the_batch_before_and_read_them_as_context():
    n, seq_len, batch, context = 1003, 16, 4, 5
    batches = _plan("strided", n, seq_len, batch)
    for before, after in zip(batches, batches[1:]):  # row r continues row r of the batch before
        ends = before[: len(after), 0] + before[: len(after), 1]
        assert torch.equal(after[:, 0], ends)
    steps = with_replay(batches, 2, 0, seed=3)
    known = context_known(steps, n, context)
    for (spans, fresh), rows in zip(steps, known):  # replays read what their first pass read
        for (start, _), k in zip(spans.tolist(), rows.tolist()):
            first_batch_of_part = any(start == int(b) for b in batches[0][:, 0])
            assert k == (0 if first_batch_of_part else context + 1), (start, fresh)
    tape = Tape(torch.arange(n) % 200, bos_id=256, context=context)
    spans = batches[3]
    x, y = tape.batch(spans, known[next(i for i, (s, fresh) in enumerate(steps) if fresh and torch.equal(s, spans))])
    assert x.shape == (len(spans), context + seq_len) and torch.equal(x[:, context + 1 :], y[:, :-1])
    for row, (start, _) in zip(x, spans.tolist()):  # the context: the tokens right before the span
        assert torch.equal(row[: context + 1], tape.tokens[start - context - 1 : start])
    tape.context = 0
    assert torch.equal(tape.batch(spans)[0][:, 0], torch.full((len(spans),), 256))  # no context: BOS


def test_shuffle_and_difficulty_draw_from_the_seed():
    for curriculum in ("shuffle", "difficulty"):
        a, b = _plan(curriculum, seed=1), _plan(curriculum, seed=2)
        assert not all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("pacing", PACINGS)
def test_length_warmup_grows_per_pacing(pacing):
    n, seq_len, warmup, start = 5000, 32, 2000, 0.125
    batches = plan_batches(n, seq_len, 4, "length_warmup", 0, pacing=pacing, pacing_start=start, warmup_tokens=warmup)
    lengths = [int(b[:, 1].max()) for b in batches]
    for spans, length in zip(batches[:-1], lengths):  # the last batch ends with the data
        expected = round(seq_len * pace(int(spans[0, 0]) / warmup, pacing, start))
        assert length == max(1, min(seq_len, expected))
    assert lengths[0] == 4 and lengths[:-1] == sorted(lengths[:-1]) and lengths[-2] == seq_len
    distinct = sorted(set(lengths[:-1]))
    if pacing == "step":
        assert distinct == [4, 11, 18, 25, 32]  # 4 equal jumps from 1/8 of the context
    else:
        assert len(distinct) > 10
    halfway = next(length for spans, length in zip(batches, lengths) if int(spans[0, 0]) >= warmup // 2)
    assert abs(halfway - {"linear": 18, "root": 24, "step": 18}[pacing]) <= 1  # root opens faster


def test_difficulty_goes_easy_to_hard_and_its_cost_is_log2_of_the_orders():
    n, seq_len = 4000, 16
    labels = _labels(n, seq_len, levels=4)
    assert torch.bincount(labels).tolist() == [63, 62, 63, 62]  # equal levels, fixed by N and K
    # pacing_start 0: each batch is the next easiest chunks, so levels never go down.
    batches = plan_batches(n, seq_len, 4, "difficulty", 0, labels=labels, pacing_start=0.0)
    chunk_of = {s: i for i, s in enumerate(chunk_spans(n, seq_len)[:, 0].tolist())}
    levels = [[int(labels[chunk_of[s]]) for s in b[:, 0].tolist()] for b in batches]
    assert all(max(a) <= min(b) for a, b in zip(levels, levels[1:]))
    # The default pacing opens a pool: easy first on average, not strictly.
    batches = plan_batches(n, seq_len, 4, "difficulty", 0, labels=labels)
    flat = [int(labels[chunk_of[s]]) for b in batches for s in b[:, 0].tolist()]
    third = len(flat) // 3
    assert sum(flat[:third]) / third < 1.0 < 2.0 < sum(flat[-third:]) / third
    # Cost: log2(N! / prod n_k!) <= N log2 K; a full ranking costs log2 N!; one level is free.
    N = len(labels)
    expected = (math.lgamma(N + 1) - sum(math.lgamma(c + 1) for c in (63, 62, 63, 62))) / math.log(2)
    assert order_bits(labels) == math.ceil(expected) <= N * 2
    full = _labels(n, seq_len, levels=10**6)
    assert order_bits(full) == math.ceil(math.lgamma(N + 1) / math.log(2))
    assert order_bits(_labels(n, seq_len, levels=1)) == 0 and order_bits(None) == 0
    assert torch.equal(labels_from_header(labels_to_header(labels)), labels)


def test_difficulty_scores():
    chunks = [b"a" * 64, os.urandom(64), b"ab" * 32, b"short"]
    assert difficulty_labels(chunks, "zlib", 4).tolist() == [0, 2, 1, 3]  # 5 bytes do not compress at all
    assert difficulty_labels(chunks, "length", 2).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="unknown score"):
        difficulty_labels(chunks, "vibes", 2)


def test_curriculum_keys_from_the_command_line():
    config = load_config(
        TINY,
        [
            "--data.curriculum",
            "length_warmup",
            "--data.pacing",
            "root",
            "--data.warmup_tokens",
            "1000",
            "--data.pacing_start",
            "0.25",
        ],
    )
    assert (config.data.curriculum, config.data.pacing, config.data.warmup_tokens) == ("length_warmup", "root", 1000)
    with pytest.raises(ConfigError, match="data.curriculum: 'easy_first' is not one of"):
        load_config(TINY, ["--data.curriculum", "easy_first"])
    with pytest.raises(ConfigError, match="data.pacing_start: must be in \\[0, 1\\]"):
        load_config(TINY, ["--data.pacing_start", "2"])
    with pytest.raises(ConfigError, match="data.difficulty_levels: must be > 0"):
        load_config(TINY, ["--data.difficulty_levels", "0"])


# --- end to end: Bob rebuilds the tokenizer and the order from the stream alone ---------------


def test_bpe_and_difficulty_train_then_verify_in_a_separate_process(tmp_path):
    from prequel.alice.corpus import order_labels
    from prequel.alice.encoder import write_stream
    from prequel.alice.session import train
    from prequel.training.stream import StreamError, read_stream
    from prequel.verify.verifier import verify

    (tmp_path / "text.txt").write_bytes(TEXT[:4000])
    config = tiny_config(
        tmp_path / "text.txt",
        tmp_path / "run",
        "--data.tokenizer",
        "bpe",
        "--data.vocab_size",
        "300",
        "--data.curriculum",
        "difficulty",
        "--data.difficulty_levels",
        "8",
    )
    summary = train(config)
    assert summary["data/complete"] and summary["data/bytes"] == 4000
    stream = read_stream(tmp_path / "run" / "stream.prequel")
    tok = build_tokenizer("bpe", serialized=bytes.fromhex(stream.header["tokenizer"]["blob"]))
    assert summary["code/f_bits/tokenizer"] == packed_bits(tok.serialize()) > 0
    labels = order_labels(config.data, config.model.block_size, tok, tok.encode(TEXT[:4000]))
    assert summary["code/f_bits/order"] == order_bits(labels) > 0
    assert torch.equal(labels_from_header(stream.header["order"]), labels)

    r = run_cli("verify", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert (tmp_path / "run" / "stream.decoded").read_bytes() == TEXT[:4000]

    # Bob plans batches before he has any data: without the transmitted order he must refuse.
    del stream.header["order"]
    write_stream(tmp_path / "no_order.prequel", stream)
    with pytest.raises(StreamError, match="transmitted levels"):
        verify(tmp_path / "no_order.prequel")


def test_length_warmup_trains_and_verifies(tmp_path):
    from prequel.alice.session import train
    from prequel.verify.verifier import verify

    (tmp_path / "text.txt").write_bytes(TEXT[:3000])
    summary = train(
        tiny_config(
            tmp_path / "text.txt", tmp_path / "run", "--data.curriculum", "length_warmup", "--data.pacing", "step"
        )
    )
    assert summary["data/complete"] and summary["code/f_bits/order"] == 0
    report = verify(tmp_path / "run")
    assert report["complete"] and Path(report["output"]).read_bytes() == TEXT[:3000]

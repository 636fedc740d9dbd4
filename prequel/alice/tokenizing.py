"""Building a tokenizer: Alice's (training/tokenizer.py and bpe.py hold the tokenizers Bob restores).

A byte-level BPE is trained with HF `tokenizers` on the training data, or read from a pretrained
tokenizer file; either way only its merges are kept, and their serialisation is counted in |f|.
"""

import collections
import json
import sys

from prequel.training.bpe import ALPHABET, BPETokenizer, _to_text, _words
from prequel.training.tokenizer import ByteTokenizer, TokenizerError, restore_tokenizer

BPE_MAX_VOCAB = 1 << 16  # a sane upper bound: the embedding and softmax grow with it


def train_bpe(data, vocab_size: int) -> BPETokenizer:
    """Deterministic: the trainer breaks count ties by pair id, and the alphabet is fixed. `data`
    is bytes or a streamed `Corpus` (prequel/alice/shards.py): the words are counted piece by
    piece, in memory that grows with the distinct words, not the corpus."""
    from tokenizers import Tokenizer, models, trainers

    if not 256 < vocab_size <= BPE_MAX_VOCAB:
        raise TokenizerError(f"data.vocab_size: BPE needs 256 < vocab_size <= {BPE_MAX_VOCAB}, got {vocab_size}")
    hf = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=sys.stderr.isatty(), initial_alphabet=ALPHABET)
    counts, size = collections.Counter(), 0
    if isinstance(data, bytes):
        counts.update(_words(data))
        size = len(data)
    else:
        from prequel.alice.shards import progress_bar

        with progress_bar(data.size, "counting BPE words") as bar:
            for piece in data.pieces():
                counts.update(_words(piece))  # (pieces cut where words split: the counts of the whole)
                size += len(piece)
                bar.update(len(piece))
    # Without a pre-tokenizer each item is one word, so a word is fed once per occurrence.
    hf.train_from_iterator(([_to_text(w)] * n for w, n in counts.items()), trainer)
    tokenizer = BPETokenizer([tuple(m) for m in _merges_of(json.loads(hf.to_str()))])
    if tokenizer.vocab_size < vocab_size:
        raise TokenizerError(
            f"data.vocab_size {vocab_size} is larger than BPE can learn from this corpus "
            f"({size:,} bytes give only {tokenizer.vocab_size} tokens); choose at most {tokenizer.vocab_size}"
        )
    return tokenizer


def bpe_from_file(path: str) -> BPETokenizer:
    """A pretrained HF tokenizer.json whose model is a byte-level BPE (GPT-2 style). Only its
    merges are kept: our splitter and byte table make the round trip exact for any bytes."""
    try:
        spec = json.loads(open(path, encoding="utf-8").read())
    except OSError as e:
        raise TokenizerError(f"data.tokenizer_file: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TokenizerError(f"data.tokenizer_file: {path} is not a tokenizer JSON file: {e}") from None
    model = spec.get("model", {}) if isinstance(spec, dict) else {}
    if model.get("type") != "BPE" or not all(c in model.get("vocab", {}) for c in ALPHABET):
        raise TokenizerError(
            f"data.tokenizer_file: {path} is not a byte-level BPE tokenizer "
            "(need model.type BPE with all 256 byte-level characters in its vocab)"
        )
    return BPETokenizer([tuple(m) for m in _merges_of(spec)])


def _merges_of(spec: dict) -> list:
    """HF stores merges as ["a", "b"] pairs (new) or "a b" strings (old)."""
    return [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]


def build_tokenizer(
    name: str,
    data: bytes | None = None,
    serialized: bytes | None = None,
    *,
    vocab_size: int = 256,
    pretrained: str | None = None,
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer named in the config: restored from `serialized` (the decoder, from the
    stream header), read from a `pretrained` file, or trained on `data` at `vocab_size`."""
    if name != "bpe" or serialized is not None:
        return restore_tokenizer(name, serialized or b"")
    if pretrained is not None:
        tokenizer = bpe_from_file(pretrained)
        if vocab_size not in (256, tokenizer.vocab_size):
            raise TokenizerError(
                f"data.vocab_size {vocab_size} differs from the {tokenizer.vocab_size} tokens of "
                f"data.tokenizer_file {pretrained}; leave vocab_size unset"
            )
        return tokenizer
    if data is None:
        raise TokenizerError("a BPE tokenizer needs training data, a serialised tokenizer or a tokenizer file")
    return train_bpe(data, vocab_size)

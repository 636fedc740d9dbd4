"""Byte-level BPE as Bob restores it from a stream header: ids to bytes and back, exactly.

Exactness for *any* bytes, invalid UTF-8 included, comes from never decoding the data as text:
each byte is mapped to one printable character of GPT-2's byte-level alphabet (a bijection), BPE
runs on those characters, and ids are turned back into bytes through a per-id bytes table. Every
one of the 256 characters is in the vocabulary, so nothing is ever unknown or dropped. Training
one, or reading a pretrained file, is Alice's (prequel/alice/tokenizing.py). Only a `bpe` run has this
module in f (prequel/program.py).
"""

import re

import numpy as np
import torch

from prequel.training.tokenizer import TokenizerError

_FORMAT = "prequel-bpe 1"  # first line of a serialised BPE; bump if the layout changes


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → character bijection: printable bytes keep their Latin-1 character, the
    others (controls, space, 0x7f-0xa0, 0xad) move to U+0100 and up, so every byte is one
    visible non-space character that no normaliser or splitter treats specially."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, moved = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + moved)
            moved += 1
    return [chars[b] for b in range(256)]


ALPHABET = _byte_alphabet()
_TO_CHARS = {b: c for b, c in enumerate(ALPHABET)}  # for str.translate on latin-1 text
_TO_BYTE = {c: b for b, c in enumerate(ALPHABET)}


# GPT-2-like word splitting on the raw bytes: an optional space joins the word after it;
# letters (and UTF-8 bytes >= 0x80) stay together, as do digits and punctuation; a run of
# whitespace leaves its last space to the next word. Every byte falls in one alternative, so
# the words always concatenate back to the input. BPE never merges across words.
_WORDS = re.compile(rb" ?[A-Za-z\x80-\xff]+| ?[0-9]+| ?[^\sA-Za-z0-9\x80-\xff]+|\s+(?!\S)|\s+")


def _words(data: bytes) -> list[bytes]:
    words = _WORDS.findall(data)
    if sum(map(len, words)) != len(data):  # cannot happen (see _WORDS); never lose a byte silently
        raise AssertionError("BPE word splitting lost bytes")
    return words


def _to_text(data: bytes) -> str:
    return data.decode("latin-1").translate(_TO_CHARS)


class BPETokenizer:
    """Byte-level BPE defined by its ordered merges; ids 0-255 are the single bytes."""

    name = "bpe"

    def __init__(self, merges: list[tuple[str, str]]):
        from tokenizers import Tokenizer, models

        vocab = {c: i for i, c in enumerate(ALPHABET)}
        for a, b in merges:
            if any(ch not in _TO_BYTE for ch in a + b):
                raise TokenizerError(f"BPE merge {a!r} {b!r} uses characters outside the byte-level alphabet")
            vocab.setdefault(a + b, len(vocab))  # two merges may spell the same token
        try:
            model = models.BPE(vocab=vocab, merges=list(merges))
        except Exception as e:  # tokenizers raises its own exception types
            raise TokenizerError(f"BPE merges are not consistent (each part must be an earlier token): {e}") from None
        self._hf = Tokenizer(model)  # no pre-tokenizer: it is handed one word at a time
        self.merges = list(merges)
        self.vocab_size = len(vocab)
        self._bytes = [bytes(_TO_BYTE[ch] for ch in token) for token in vocab]  # vocab is in id order

    def encode(self, data: bytes) -> torch.Tensor:
        # Split in Python (C regex, ~10x faster than the tokenizers splitter here), encode each
        # distinct word once, then gather: corpora repeat a few thousand words a million times.
        words = _words(data)
        distinct = list(dict.fromkeys(words))
        if not distinct:
            return torch.zeros(0, dtype=torch.long)
        index = {w: i for i, w in enumerate(distinct)}
        encoded = self._hf.encode_batch([_to_text(w) for w in distinct], add_special_tokens=False)
        flat = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encoded])
        lengths = np.asarray([len(e.ids) for e in encoded], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        which = np.asarray([index[w] for w in words], dtype=np.int64)
        n = lengths[which]
        out_starts = np.cumsum(n) - n
        pos = np.arange(n.sum()) - np.repeat(out_starts - starts[which], n)
        return torch.from_numpy(flat[pos])

    def decode(self, ids: torch.Tensor) -> bytes:
        table = self._bytes
        return b"".join([table[i] for i in ids.tolist()])

    def nbytes_per_id(self) -> torch.Tensor:
        return torch.tensor([len(b) for b in self._bytes], dtype=torch.long)

    def serialize(self) -> bytes:
        """A version line, then one merge per line ("a b"; the alphabet has no space)."""
        return "\n".join([_FORMAT, *(f"{a} {b}" for a, b in self.merges)]).encode()

    @classmethod
    def deserialize(cls, blob: bytes) -> "BPETokenizer":
        try:
            lines = blob.decode().split("\n")
        except UnicodeDecodeError:
            raise TokenizerError("serialised BPE is not UTF-8 text: the stream header is corrupted") from None
        if lines[0] != _FORMAT:
            raise TokenizerError(f"serialised BPE has format {lines[0]!r}, expected {_FORMAT!r}")
        return cls([tuple(line.split(" ")) for line in lines[1:]])

"""Tokenizers map corpus bytes to ids and back, exactly, for any input bytes.

`bytes` is the identity on bytes (m = 256) and costs nothing in |f|. `bpe` is a byte-level BPE
(training/bpe.py) trained with HF `tokenizers` on the training data (or read from a pretrained
tokenizer file; both Alice's: prequel/alice/tokenizing.py); it is part of the program f, so its compressed
serialisation is counted in |f|.
"""

import numpy as np
import torch

from prequel.training.data import DataError


class TokenizerError(DataError):
    """A tokenizer that cannot be built as configured; the message says what to change."""


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256

    def encode(self, data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def decode(self, ids: torch.Tensor) -> bytes:
        return ids.to(torch.uint8).numpy().tobytes()

    def nbytes_per_id(self) -> torch.Tensor | None:
        return None  # one byte per token

    def serialize(self) -> bytes:
        return b""  # nothing to transmit: the byte alphabet is part of the code


def restore_tokenizer(name: str, blob: bytes):
    """The tokenizer a stream header names (a ByteTokenizer or a training.bpe.BPETokenizer), from its
    serialisation (prequel/alice/tokenizing.py builds one)."""
    if name == "bytes":
        return ByteTokenizer()
    if name != "bpe":
        raise TokenizerError(f"data.tokenizer: unknown tokenizer {name!r} (known: bytes, bpe)")
    from prequel.training.bpe import BPETokenizer  # (only a bpe run needs it in f: prequel/program.py)

    return BPETokenizer.deserialize(blob)

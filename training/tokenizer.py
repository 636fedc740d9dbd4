"""Tokenizers map corpus bytes to ids and back, exactly, for any input bytes.

`bytes` is the identity on bytes (m = 256) and costs nothing in |f|. A tokenizer that was
trained on the data is part of the program f and its compressed serialisation is counted.
"""

import numpy as np
import torch


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


def build_tokenizer(name: str, data: bytes | None = None, serialized: bytes | None = None) -> ByteTokenizer:
    """The tokenizer named in the config; trained on `data`, or restored from `serialized`."""
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r}")

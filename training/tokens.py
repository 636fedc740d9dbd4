"""Token ids at any corpus size: fixed-size shard files, memory-mapped, of the narrowest dtype.

A corpus of n tokens is `ceil(n / shard_tokens)` files, shard i holding tokens
``[i * shard_tokens, (i + 1) * shard_tokens)`` as raw little-endian uint8, uint16 or uint32
(`dtype_for` the vocabulary). Only the pages a batch reads are brought in, so memory stays flat
in corpus size. Alice's are a read-only cache (prequel/alice/shards.py tokenises into them); Bob
decodes into writable ones (`create`) of the same layout; an audit writes over a copy-on-write
view of Alice's (`open(..., mode="c")`). `in_memory` wraps a small array the same way (tests,
benches, compress).
"""

from pathlib import Path

import numpy as np
import torch

SHARD_TOKENS = 1 << 26  # tokens per shard file: 64 Mi (128 MiB as uint16)


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype).newbyteorder("<")
    raise ValueError(f"vocabulary of {vocab_size:,} ids does not fit in uint32")


def shard_names(n_tokens: int, shard_tokens: int = SHARD_TOKENS) -> list[str]:
    return [f"{i:05d}.bin" for i in range(max(1, -(-n_tokens // shard_tokens)))]


class TokenShards:
    """n token ids over shard arrays (memmaps or arrays) of `shard_tokens` each, the last shorter.

    Indexing takes integer position arrays (numpy or torch) and gives int64 torch tensors;
    assignment writes ids back (a writable or copy-on-write store)."""

    def __init__(self, arrays: list[np.ndarray], shard_tokens: int, directory: Path | None = None):
        self.arrays, self.shard_tokens = arrays, shard_tokens
        self.directory = directory  # where the shard files are (None: in memory)
        self.dtype = arrays[0].dtype
        self.n = sum(len(a) for a in arrays)

    @classmethod
    def in_memory(cls, tokens) -> "TokenShards":
        array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        return cls([array], max(len(array), 1))

    @classmethod
    def open(cls, directory: Path, n_tokens: int, dtype, shard_tokens: int = SHARD_TOKENS, mode: str = "r"):
        """The shards under `directory` (`shard_names`), each checked to have its length."""
        arrays = []
        for i, name in enumerate(shard_names(n_tokens, shard_tokens)):
            length = min(shard_tokens, n_tokens - i * shard_tokens)
            arrays.append(np.memmap(Path(directory) / name, dtype=dtype, mode=mode, shape=(length,)))
        return cls(arrays, shard_tokens, Path(directory))

    @classmethod
    def create(cls, directory: Path, n_tokens: int, dtype, shard_tokens: int = SHARD_TOKENS) -> "TokenShards":
        """Zero-filled writable shards (sparse files: only what is written takes disk)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        if n_tokens == 0:
            return cls([np.zeros(0, dtype=dtype)], shard_tokens)
        return cls.open(directory, n_tokens, dtype, shard_tokens, mode="w+")

    def __len__(self) -> int:
        return self.n

    def copy_on_write(self) -> "TokenShards":
        """The same ids, writable without touching the files: writes stay in this process."""
        arrays = [
            np.memmap(a.filename, dtype=a.dtype, mode="c", shape=a.shape) if isinstance(a, np.memmap) else a.copy()
            for a in self.arrays
        ]
        return TokenShards(arrays, self.shard_tokens)

    def _split(self, pos: np.ndarray):
        """(shard, index within it, mask) per shard the positions fall in."""
        which = pos // self.shard_tokens
        first = int(which.min()) if pos.size else 0
        if not pos.size or first == int(which.max()):  # the common case: one shard
            yield first, pos - first * self.shard_tokens, None
            return
        for shard in np.unique(which).tolist():
            mask = which == shard
            yield shard, pos[mask] - shard * self.shard_tokens, mask

    def __getitem__(self, pos) -> torch.Tensor:
        if isinstance(pos, slice):
            start, stop, _ = pos.indices(self.n)
            return self.slice(start, stop)
        pos = _positions(pos)
        out = np.empty(pos.shape, dtype=np.int64)
        for shard, index, mask in self._split(pos):
            if mask is None:
                out[...] = self.arrays[shard][index] if pos.size else 0
            else:
                out[mask] = self.arrays[shard][index]
        return torch.from_numpy(out)

    def __setitem__(self, pos, values) -> None:
        pos = _positions(pos)
        values = (values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)).astype(self.dtype)
        for shard, index, mask in self._split(pos):
            self.arrays[shard][index] = values if mask is None else values[mask]

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Ids [start, stop) as int64, read shard by shard."""
        parts = []
        while start < stop:
            shard, offset = divmod(start, self.shard_tokens)
            take = min(stop - start, self.shard_tokens - offset)
            parts.append(np.asarray(self.arrays[shard][offset : offset + take], dtype=np.int64))
            start += take
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    def slices(self, step: int = 1 << 22):
        """The ids in order, as int64 tensors of at most `step`."""
        for start in range(0, self.n, step):
            yield self.slice(start, min(start + step, self.n))

    def flush(self) -> None:
        for array in self.arrays:
            if isinstance(array, np.memmap):
                array.flush()


def _positions(pos) -> np.ndarray:
    if isinstance(pos, torch.Tensor):
        return pos.cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(pos, dtype=np.int64)

"""Corpus → token tape → batches of spans, in an order both encoder and decoder can rebuild.

The DataLoader yields only *where* each batch lies in the corpus (spans of the tape), never
its content. The encoder's tape holds the real tokens; the decoder's starts empty and is
filled by arithmetic decoding just before each training step. Both then run the very same
`training_step`, which reads its inputs from the tape.
"""

import hashlib
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.curriculum import plan_batches

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
BUNDLED_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
IGNORE = -100  # target id of padding positions


class DataError(ValueError):
    """A corpus problem a person must fix; the message names the file and the problem."""


def read_corpus(path: str | None) -> bytes:
    """The corpus as exact bytes (no newline or encoding conversion)."""
    if path is None:
        data = BUNDLED_CORPUS.read_bytes()
        if hashlib.sha256(data).hexdigest() != BUNDLED_SHA256:
            raise DataError(f"bundled corpus {BUNDLED_CORPUS} does not match its sha256; reinstall prequel")
        return data
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: file not found: {p}")
    if p.is_dir():
        raise DataError(f"data.path: {p} is a directory; give a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"data.path: cannot read {p}: {e.strerror}") from None
    if not data:
        raise DataError(f"data.path: {p} is empty")
    return data


class Tape:
    """The corpus as one row of token ids, plus how many bytes each token id stands for."""

    def __init__(self, tokens: torch.Tensor, bos_id: int, nbytes_per_id: torch.Tensor | None = None):
        self.tokens = tokens
        self.bos_id = bos_id
        self.nbytes_per_id = nbytes_per_id  # None: one byte per token

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions (B, L) of each span and the mask of those that exist."""
        spans = spans.cpu()
        offsets = torch.arange(int(spans[:, 1].max()))
        valid = offsets[None, :] < spans[:, 1:2]
        return (spans[:, :1] + offsets[None, :]).clamp(max=len(self) - 1), valid

    def batch(self, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x = BOS + span[:-1] and targets y = span (IGNORE where the span ended)."""
        pos, valid = self.positions(spans)
        y = torch.where(valid, self.tokens[pos], IGNORE)
        return self.inputs(y), y

    def inputs(self, y: torch.Tensor) -> torch.Tensor:
        """x = BOS + y[:, :-1]: position t sees only targets before t."""
        bos = torch.full_like(y[:, :1], self.bos_id)
        return torch.cat([bos, y[:, :-1].clamp(min=0)], dim=1)  # pad inputs are never attended to

    def nbytes(self, spans: torch.Tensor) -> int:
        pos, valid = self.positions(spans)
        if self.nbytes_per_id is None:
            return int(valid.sum())
        return int(self.nbytes_per_id[self.tokens[pos][valid]].sum())


class _Batches(Dataset):
    def __init__(self, batches: list[torch.Tensor], rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batches[i][self.rank :: self.world_size]  # this process's rows of global batch i


class _ResumableSampler(Sampler[int]):
    """Batches in plan order; after a mid-epoch resume the first pass skips what was trained."""

    def __init__(self, n: int, skip: int = 0):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - self.skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(range(skip, self.n))


class PrequelDataModule(L.LightningDataModule):
    def __init__(self, tape: Tape, seq_len: int, batch_size: int, curriculum: str, seed: int):
        super().__init__()
        self.tape = tape
        self.batches = plan_batches(len(tape), seq_len, batch_size, curriculum, seed)
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done)

    def train_dataloader(self) -> DataLoader:
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.trainer.current_epoch:
            skip = self._resume_at[1]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = _ResumableSampler(len(self.batches), skip)
        # batch_size=None: each item is already a batch; workers would prefetch past the
        # decoder, which must fill the tape first, so data loading stays in-process.
        return DataLoader(_Batches(self.batches, rank, world), batch_size=None, sampler=sampler)

    def state_dict(self) -> dict:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["epoch"], state["batches_done"])

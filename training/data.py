"""Token tape → batches of spans, in an order both encoder and decoder can rebuild.

The DataLoader yields only *where* each batch lies in the corpus (spans of the tape), never
its content. The encoder's tape holds the real tokens; the decoder's starts empty and is
filled by arithmetic decoding just before each training step. Both then run the very same
`training_step`, which reads its inputs from the tape. Reading a corpus is Alice's
(tools/data.py).
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.curriculum import plan_batches, with_replay

IGNORE = -100  # target id of padding positions


class DataError(ValueError):
    """A corpus problem a person must fix; the message names the file and the problem."""


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
        offsets = torch.arange(max(1, int(spans[:, 1].max())))
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


class _Steps(Dataset):
    def __init__(self, steps: list[tuple[torch.Tensor, bool]], rank: int, world_size: int):
        self.steps, self.rank, self.world_size = steps, rank, world_size

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict:
        spans, fresh = self.steps[i]
        rows = spans[self.rank :: self.world_size]  # this process's rows of global batch i
        # A short last batch may leave a process no row; it still steps (DDP syncs every
        # backward), on an empty span that contributes no token and no gradient. What is learnt
        # by counting (the n-gram counts) and the stream's checks see the whole batch: "all_spans".
        return {"spans": rows if len(rows) else torch.zeros(1, 2, dtype=torch.long), "all_spans": spans,
                "fresh": fresh}


class _ResumableSampler(Sampler[int]):
    """Batches in plan order; after a mid-epoch resume the first pass skips what was trained."""

    def __init__(self, n: int, skip: int = 0):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n  # Lightning counts a resumed epoch from its restored progress up to this

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(range(skip, self.n))


def plan_options(data) -> dict:
    """The `plan_batches` keywords that a `DataConfig` sets."""
    return {"pacing": data.pacing, "pacing_start": data.pacing_start, "warmup_tokens": data.warmup_tokens,
            "replay_steps": data.replay_steps, "replay_window": data.replay_window}


class PrequelDataModule(L.LightningDataModule):
    """Yields {"spans": this process's rows (b, 2), "all_spans": (B, 2), "fresh": bool}: fresh
    batches are the first pass (coded), the others replay already-coded chunks (see
    `curriculum.with_replay`)."""

    def __init__(self, tape: Tape, seq_len: int, batch_size: int, curriculum: str, seed: int,
                 replay_steps: int = 0, replay_window: int = 0, **plan_options):
        super().__init__()
        self.tape = tape
        self.batches = plan_batches(len(tape), seq_len, batch_size, curriculum, seed, **plan_options)
        self.steps = with_replay(self.batches, replay_steps, replay_window, seed)
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done)

    def train_dataloader(self) -> DataLoader:
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == self.trainer.current_epoch:
            skip = self._resume_at[1]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = _ResumableSampler(len(self.steps), skip)
        # batch_size=None: each item is already a batch; workers would prefetch past the
        # decoder, which must fill the tape first, so data loading stays in-process.
        return DataLoader(_Steps(self.steps, rank, world), batch_size=None, sampler=sampler)

    def state_dict(self) -> dict:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (state["epoch"], state["batches_done"])
